"""Test-wide set-up.

Triton kernels run under the interpreter on machines without CUDA. The variable must be set
before triton is first imported, which is why it lives here and not in a test module.
"""
import os

def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False

if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
