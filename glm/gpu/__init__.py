"""The GPU path (a T4, sm_75, is the target): Triton kernels for the linears (linear.py), decode
attention (attention.py) and the pointwise ops (pointwise.py), the model's operations on them
(ops.py), and their ahead-of-time compile check (compile.py, `python -m glm.gpu compile --arch 75`).

With TRITON_INTERPRET=1 (set before triton is imported) the same kernels run on CPU tensors,
which is how they are tested without a GPU.
"""
from __future__ import annotations


def triton_available() -> bool:
    """True if triton imports (a GPU is not needed for that)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument into an int with int(array of shape
    (1,)), which numpy >= 2.4 refuses, so any loop bounded by a runtime argument fails
    (triton-lang/triton#9171, fixed upstream after 3.6). Re-set that one conversion after the
    interpreter installs its own."""
    from triton.runtime import interpreter

    install = interpreter._patch_lang_tensor
    if getattr(install, "scalar_index_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        install(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.scalar_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if _interpreting() and triton_available():
    _fix_interpreter_scalar_index()


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return _interpreting()
