"""The T4 path: Triton kernels for the linears (linear.py), attention and row-wise ops, their
self-test at setup and the GPU memory plan. Under TRITON_INTERPRET=1 the same kernels run on CPU
tensors, which is how they are tested without a GPU."""
from __future__ import annotations


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1): on CPU tensors."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
