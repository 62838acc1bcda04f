"""Our top-level `kernels` package shares its name with Hugging Face's `kernels` hub package,
which bitsandbytes (imported by peft and liger-kernel) looks for. Importing those must keep
working from the repository root, where `kernels` resolves to ours."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bitsandbytes_and_peft_import_next_to_our_kernels_package():
    code = ("import kernels, bitsandbytes, peft; from kernels.lora import lora_linear; "
            "print(kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(REPO / "kernels" / "__init__.py") in proc.stdout
