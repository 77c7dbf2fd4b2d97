"""Lazy build / load of the fused CPU kernels: quantized linears (csrc/linear.cpp, tiles.cpp),
decode attention (csrc/attention.cpp) and RMSNorm / SwiGLU (csrc/pointwise.cpp), one extension
(csrc/module.cpp); glm.cpu.ops computes the model's layers with them.

``get()`` returns the compiled extension module, or ``None`` if it cannot be used (no compiler,
build error, or ``GLM_NO_KERNELS=1``); the loader then picks the torch ops. ``require()`` raises
instead, ``status()`` says in one line which path serves and why, and ``used_for(device, dtype)`` is
the one test of whether the kernels compute a model on `device` in `dtype`. The build happens once
per (source, torch version, flags) into ``$GLM_KERNEL_CACHE`` or ``~/.cache/glm/kernels/<hash>``, so
a fresh clone builds it on first use (about a minute) and later processes just load it.

Builds are serialized by our own flock on ``<build dir>/glm.lock``, which the kernel releases when
its holder dies. torch's own ``<build dir>/lock`` file is only ever created under that flock, so one
found while we hold it was left by a killed build and is removed: torch would wait on it forever.

Extension API (all CPU; x is float32 or bfloat16 [M, K] contiguous; output [M, N] in x's dtype,
fp32 accumulation):
  int4_linear(x, qweight int8 [N, K/2], scale [N], bias [N] | None)
  int8_linear(x, qweight int8 [N, K],   scale [N], bias [N] | None)
  half_linear(x, weight fp16/bf16 [N, K], bias [N] | None)
  int4_linear_i8(x float32, qweight int8 [N, K/2], scale [N], bias [N] | None)
      (opt-in int8 activations: rows of x quantized to int8, VNNI integer dot products; has_vnni())
  decode_attention(q [B, heads, hd], k, v [B, groups, hd], k_caches, v_caches, layer, slots, scale, cos, sin)
      (one decode step of attention for B sequences, each writing its new k, v into its own cache
       [layers, groups, capacity, hd] at slots[b] and attending over slots 0..slots[b]; fp32 / bf16;
       optional rotary embedding of q and k with cos, sin [B, P] first)
  prefill_attention(q [T, heads, hd], k_cache, v_cache, layer, first_slot, scale)
      (causal attention of a prompt chunk's rows over one cache already holding their k, v: row t
       attends over slots 0..first_slot + t exactly as decode_attention would, same bits)
  rms_norm(x [..., K], weight [K], eps) / swiglu(h [..., 2F]) -> [..., F]   (fp32 / bf16, fp32 math)
  isa() / max_isa() / set_isa(name)  -- "scalar", "avx2", "avx512", "avx512bf16"
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import settings

log = logging.getLogger("glm")

NAME = "glm_cpu_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("module.cpp", "linear.cpp", "tiles.cpp", "attention.cpp", "pointwise.cpp")
HEADERS = ("common.h", "linear.h")
# -fopenmp at compile time only: at::parallel_for is inline OpenMP code; the GOMP symbols resolve
# against the OpenMP runtime torch already loaded (linking a second libgomp is avoided on purpose).
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
# Longest wait for another live process building the same kernels before giving up on them.
LOCK_TIMEOUT = 600.0

_lock = threading.Lock()
_module = None
_tried = False
_error: str | None = None
_how: str | None = None  # "built in 54.1s" / "loaded from cache"


class KernelError(RuntimeError):
    """The kernels cannot be used (GLM_REQUIRE_KERNELS=1 turns this into a setup failure)."""


class LockTimeout(KernelError):
    pass


def disabled() -> bool:
    return settings.flag("GLM_NO_KERNELS")


def build_dir() -> Path:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.encode())
        h.update((CSRC / src).read_bytes())
    h.update(torch.__version__.encode())
    h.update(torch.__file__.encode())  # build.ninja names this torch's include dirs: one build per install
    h.update(" ".join(CFLAGS).encode())
    # Two ninja versions (the pip one in a venv, the system one) read each other's build log as
    # stale and rebuild everything: one build per ninja binary.
    h.update(str(shutil.which("ninja", path=_build_path())).encode())
    base = os.environ.get("GLM_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "glm", "kernels"
    )
    return Path(base) / h.hexdigest()[:16]


def _build_path() -> str:
    """PATH for the build: torch runs `ninja` from PATH, and pip puts it beside the interpreter
    (a venv's or an image's bin/), which is not on PATH everywhere the service runs."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@contextmanager
def build_path():
    old = os.environ.get("PATH")
    os.environ["PATH"] = _build_path()
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


@contextmanager
def build_lock(d: Path, timeout: float):
    """Hold the exclusive build lock of build dir `d`, waiting at most `timeout` seconds for it."""
    fd = os.open(d / "glm.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"another process has been building the kernels in {d} "
                                      f"for over {timeout:.0f}s") from None
                time.sleep(0.2)
        stale = d / "lock"
        if stale.exists():
            log.warning("glm: removing torch build lock %s left by a killed build", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def load(verbose: bool = False, lock_timeout: float = LOCK_TIMEOUT):
    """Build (if needed) and import the extension; raises on failure."""
    global _how
    from torch.utils import cpp_extension

    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    cached = (d / f"{NAME}.so").exists()
    t0 = time.monotonic()
    # torch's own build chatter (compiler-compat banners etc.) stays out of our logs unless verbose
    tlog = logging.getLogger("torch.utils.cpp_extension")
    old = tlog.level
    if not verbose:
        tlog.setLevel(logging.ERROR)
    try:
        with build_lock(d, lock_timeout), build_path():
            module = cpp_extension.load(
                name=NAME,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                build_directory=str(d),
                verbose=verbose,
            )
    finally:
        tlog.setLevel(old)
    _how = "loaded from cache" if cached else f"built in {time.monotonic() - t0:.1f}s"
    return module


def _reason(e: BaseException) -> str:
    """The most telling line of a build failure (compiler's error line, else the last line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    pick = next(
        (ln for ln in lines if any(k in ln for k in ("error:", "Error:", "not found", "No such file"))),
        lines[-1] if lines else "",
    )
    return f"{type(e).__name__}: {pick}"[:500]


def get():
    """The extension module, or None (fallback to pure torch). Never raises."""
    global _module, _tried, _error
    if disabled():
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = load()
            except Exception as e:  # no compiler, build error, ...
                _error = _reason(e)
                log.warning("glm: fused CPU kernels unavailable, using pure torch fallback (%s)", _error)
                _module = None
            _tried = True
    return _module


def error() -> str | None:
    """Why the last build failed (None if it did not fail or was not tried)."""
    return _error


def require():
    """The extension module; raises KernelError saying why when it cannot be used."""
    if disabled():
        raise KernelError("the CPU kernels are turned off (GLM_NO_KERNELS=1)")
    module = get()
    if module is None:
        raise KernelError(f"the CPU kernels failed to build or load: {_error}")
    return module


def status() -> str:
    """Which path serves the CPU hot loops, in one line: the kernels' ISA, or the torch fallback and why."""
    if disabled():
        return "torch fallback (GLM_NO_KERNELS=1)"
    module = get()
    if module is None:
        return f"torch fallback (kernels unavailable: {_error})"
    return f"CPU kernels {module.isa()} (max {module.max_isa()}; {_how}; {build_dir()})"


def available() -> bool:
    return get() is not None


def used_for(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether tensors on `device` in `dtype` are computed by the CPU kernels: the CPU, float32 or
    bfloat16 (what every kernel takes), and the extension loaded. The loader asks it once, to
    choose the model's ops."""
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16) and get() is not None


# ---------------------------------------------------------------------------------------------
# Wrappers for the kernels the model calls on tensors that may not be laid out as the extension
# needs. They assume get() is not None.
# ---------------------------------------------------------------------------------------------


def decode_attention(q, k, v, k_caches, v_caches, layer: int, slots: list[int], scale: float, cos=None, sin=None):
    """Write each sequence's new k, v ([B, groups, hd]) at its cache slot and attend q ([B, heads, hd])
    over that cache's slots 0..slot (attention.cpp); returns [B, heads, hd]. With cos, sin ([B, P]
    float32), q and k get the rotary embedding first, exactly as glm.ops.apply_rotary does it.
    q, k, v may be views into one qkv row per sequence."""
    q, k, v = (t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous() for t in (q, k, v))
    return get().decode_attention(q, k, v, k_caches, v_caches, layer, slots, scale, cos, sin)


def prefill_attention(q, k_cache, v_cache, layer: int, first_slot: int, scale: float):
    """Causal attention of q ([T, heads, hd], already rotated) at cache slots first_slot.. over a cache
    ([layers, groups, capacity, hd]) that holds their keys and values; returns [T, heads, hd]."""
    return get().prefill_attention(q.contiguous(), k_cache, v_cache, layer, first_slot, scale)


def rms_norm(x, weight, eps: float):
    return get().rms_norm(x.contiguous(), weight, eps)


def swiglu(h):
    """silu(h[..., :F]) * h[..., F:] (ChatGLM2's MLP activation on the h_to_4h output)."""
    return get().swiglu(h.contiguous())
