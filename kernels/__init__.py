"""omnitrain's Triton kernels, each with the PyTorch reference it is tested against.

    kernels.lora                  fused LoRA linear
    kernels.lora_grouped          grouped LoRA: q/k/v in one call, gate/up/down with fused SwiGLU
    kernels.linear_cross_entropy  fused linear + cross-entropy, no [tokens, vocab] logits

Not Hugging Face's `kernels` hub package, which shares the top-level name. Python finds one
`kernels` only, and this one comes first when the project's root is on the path. Where the hub
package is installed too (transformers imports it when its version is one transformers supports,
e.g. `transformers[kernels]`; bitsandbytes looks for its `get_kernel`), importing transformers
would fail on names this package lacks (`ImportError: cannot import name 'CUDAProperties' from
'kernels'`). So this package also carries the hub package when one is installed: its folder is
added to this package's search path (its modules, `kernels.layer` and the rest, have names
none of ours has) and its top-level names are defined here by running its `__init__`. Without
it (the usual case) nothing of this happens; on CPUs with AVX512-BF16 bitsandbytes then logs
that it could not load its optional `gemm_4bit_forward`, which omnitrain does not use.
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def installed_hub_package() -> Path | None:
    """The `__init__.py` of another top-level `kernels` package on sys.path (Hugging Face's), or None."""
    for entry in sys.path:
        init = Path(entry or ".").resolve() / "kernels" / "__init__.py"
        if init.is_file() and init.parent != _HERE:
            return init
    return None


def _carry_hub_package(init: Path) -> None:
    __path__.append(str(init.parent))
    try:
        exec(compile(init.read_text(encoding="utf-8"), str(init), "exec"), globals())
    except Exception as error:  # a broken hub install must not take our kernels down with it
        print(f"[omnitrain] the installed Hugging Face `kernels` package ({init.parent}) failed to import "
              f"({error!r}); omnitrain's own kernels are unaffected", file=sys.stderr)


_hub = installed_hub_package()
if _hub is not None:
    _carry_hub_package(_hub)
