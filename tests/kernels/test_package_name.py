"""Our top-level `kernels` package beside Hugging Face's `kernels` hub package of the same name:
where the hub package is installed (in a version transformers accepts), transformers imports
names from `kernels` that only the hub package has. Both must work in one process."""
import os
import subprocess
import sys
import textwrap

from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stand-in for the hub package: any name transformers asks for exists, in a submodule, as the
# real package's names live in kernels.layer, kernels.load, ...
HUB_INIT = '''
from kernels import layer as _layer


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_layer, name)
'''
HUB_LAYER = '''
class Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Anything()

    def __getattr__(self, name):
        return Anything()


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Anything
'''


def install_hub_stand_in(site):
    package = site / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(HUB_INIT)
    (package / "layer.py").write_text(HUB_LAYER)
    version = KERNELS_MIN_VERSION  # within [MIN, MAX): what transformers imports
    assert version < KERNELS_MAX_VERSION
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")


def test_transformers_and_our_kernels_both_import_with_the_hub_package_installed(tmp_path):
    install_hub_stand_in(tmp_path / "site")
    code = textwrap.dedent('''
        import sys
        sys.path.insert(0, sys.argv[1])            # the project root first, as engine/train.py puts it
        import kernels.lora, kernels.linear_cross_entropy
        from transformers.utils.import_utils import is_kernels_available
        assert is_kernels_available()
        import transformers.integrations.hub_kernels   # imports the hub package's names from `kernels`
        from kernels import CUDAProperties, get_kernel
        from kernels.layer import LayerRepository
        import engine.model
        print("ok", kernels.lora.lora_linear.__module__)
    ''')
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok kernels.lora" in proc.stdout


def test_without_the_hub_package_nothing_is_carried():
    import kernels

    assert kernels.installed_hub_package() is None
    assert kernels.__path__ == [os.path.join(REPO, "kernels")] and not hasattr(kernels, "get_kernel")
