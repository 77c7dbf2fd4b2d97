"""Every Triton kernel against its torch reference on the serving device: first on a few small shapes
(before the model is built: `passes`), then at the loaded model's own shapes for every batch bucket
and a prefill chunk (`run_model`), so that no kernel variant the engine launches is untested.

A compile error, a driver that cannot load the cubin or wrong numbers cost one ERROR log line and the
torch backend (~4 tok/s at full size), or a failed setup with GLM_REQUIRE_GPU_KERNELS=1 (`fallback`).
"""
from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

from .. import settings

log = logging.getLogger("glm")

TOLERANCE = 2e-2  # fp16 outputs of O(1) values: a few ulps of rounding, far below any real bug
BUCKETS = (1, 2, 4, 8)  # decode rows per step the engine launches (glm/gpu/graphs.py)
PREFILL_ROWS = 20  # rows past the decode GEMV's: the prefill GEMM and SDPA
CHECKED_OUTPUTS = 256  # output features checked at each end of a model's linear (the reference is fp32)


class GPUKernelError(RuntimeError):
    """The Triton kernels failed their self-test and GLM_REQUIRE_GPU_KERNELS=1 forbids the fallback."""


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want| relative to max |want| (at least 1)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1))


def check_rms_norm(device, hidden: int = 96, rows: int = 3) -> float:
    from .pointwise import rms_norm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).half().to(device)
    w = torch.rand(hidden, generator=g).half().to(device)
    xf = x.float()
    want = w.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    return _close(rms_norm(x, w, 1e-5), want)


def check_swiglu(device, ffn: int = 80, rows: int = 3) -> float:
    from .pointwise import swiglu
    h = torch.randn(rows, 2 * ffn, generator=torch.Generator().manual_seed(1)).half().to(device)
    gate, up = h.float().chunk(2, dim=-1)
    return _close(swiglu(h), F.silu(gate) * up)


def check_row_attention(device, heads: int = 4, groups: int = 2, head_dim: int = 16, rows: int = 2,
                        rotary: bool = True) -> float:
    """`rows` sequences of different lengths in one pool, each at its own slot, against per-sequence
    softmax; with rotary, ChatGLM2's rotation applied in the kernel (ChatGLM-6B rotates outside)."""
    from ..config import ChatGLMConfig
    from ..kvpool import KVPool
    from ..ops import apply_rotary, rotary_angles
    from .attention import row_attention
    from .ops import row_plan

    cfg = ChatGLMConfig(num_layers=2, hidden_size=heads * head_dim, num_heads=heads, kv_heads=groups,
                        head_dim=head_dim, ffn_hidden_size=32, vocab_size=8, seq_length=64, max_context=64)
    g = torch.Generator().manual_seed(2)
    capacities = [9 + 4 * (b % 3) for b in range(rows)]
    pool = KVPool(cfg, sum(capacities) + 3, device, torch.float16)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g).half())
    pool.v.copy_(torch.randn(pool.v.shape, generator=g).half())
    extents = [3 + sum(capacities[:b]) for b in range(rows)]
    caches = [pool.cache(e, c) for e, c in zip(extents, capacities)]
    starts = [(5 + 3 * b) % c for b, c in enumerate(capacities)]
    layer = 1
    q = torch.randn(rows, heads, head_dim, generator=g).half().to(device)
    k = torch.randn(rows, groups, head_dim, generator=g).half().to(device)
    v = torch.randn(rows, groups, head_dim, generator=g).half().to(device)
    cos, sin = rotary_angles(cfg, torch.tensor(starts, device=device)[:, None])

    def rotate(x, b):
        return apply_rotary(x[b][None, None].float(), cos[b:b + 1], sin[b:b + 1])[0, 0] if rotary else x[b].float()

    want, want_k = [], []
    for b, (c, s) in enumerate(zip(caches, starts)):
        kr, qr = rotate(k, b), rotate(q, b).half()
        want_k.append(kr)
        keys = torch.cat((c.k[layer, :, :s], kr.half()[:, None]), dim=1).float()
        values = torch.cat((c.v[layer, :, :s], v[b][:, None]), dim=1).float()
        kh = keys.repeat_interleave(heads // groups, dim=0)
        vh = values.repeat_interleave(heads // groups, dim=0)
        p = (qr.float()[:, None] @ kh.transpose(1, 2) * head_dim ** -0.5).softmax(-1)
        want.append((p @ vh)[:, 0])
    plan = row_plan(caches, starts, 1, device)
    angles = (cos[:, 0], sin[:, 0]) if rotary else ()
    got = row_attention(q, k, v, *plan, layer, head_dim ** -0.5, *angles)
    written = max(_close(c.k[layer, :, s], wk) for c, s, wk in zip(caches, starts, want_k))
    return max(_close(got, torch.stack(want)), written)


def check_linears(device) -> float:
    """glm.gpu.linear (int4, int8, fp16) against dequantize + matmul in fp32."""
    from ..quant import dequantize, quantize
    from . import linear
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g).half()
    worst = 0.0
    for rows in (1, 5, 20):  # decode (<= 8 rows) and prefill
        x = torch.randn(rows, 64, generator=g).half().to(device)
        for bits in (4, 8):
            q, scale = quantize(w, bits)
            want = x.float() @ dequantize(q, scale, bits).to(device).t()
            worst = max(worst, _close(linear.quant_linear(x, q.to(device), scale.to(device), None, bits), want))
        worst = max(worst, _close(linear.half_linear(x, w.to(device), None), x.float() @ w.to(device).float().t()))
    return worst


def check_model_linear(module, device, rows: int) -> float:
    """One of the model's own linears (its weights, the kernel its forward launches for `rows` rows)
    against dequantize + matmul in fp32, on the first and last CHECKED_OUTPUTS output features."""
    from ..quant import HalfLinear, QuantLinear, dequantize
    x = torch.randn(rows, module.in_features, generator=torch.Generator().manual_seed(rows)).half().to(device)
    got = module(x)  # through the module's ops: the kernel its forward launches
    n = module.out_features
    worst = 0.0
    for lo, hi in ((0, min(n, CHECKED_OUTPUTS)), (max(0, n - CHECKED_OUTPUTS), n)):
        if isinstance(module, QuantLinear):
            w = dequantize(module.weight[lo:hi], module.weight_scale[lo:hi], module.bits)
        else:
            w = module.weight[lo:hi].float()
        want = x.float() @ w.to(device).t()
        if module.bias is not None:
            want = want + module.bias[lo:hi].float()
        worst = max(worst, _close(got[:, lo:hi], want))
    assert isinstance(module, (QuantLinear, HalfLinear))
    return worst


def model_checks(model, buckets=BUCKETS) -> dict:
    """Every kernel at the model's own shapes: decode at each bucket's rows, and a prefill chunk."""
    from ..quant import HalfLinear, QuantLinear
    cfg = model.cfg
    linears = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, HalfLinear)):
            key = (type(m).__name__, m.in_features, m.out_features, getattr(m, "bits", 16), m.bias is not None)
            linears.setdefault(key, m)
    checks = {}
    for rows in (*buckets, PREFILL_ROWS):
        checks[f"rms_norm hidden {cfg.hidden_size} x{rows}"] = functools.partial(
            check_rms_norm, hidden=cfg.hidden_size, rows=rows)
        if cfg.family != "chatglm":
            checks[f"swiglu ffn {cfg.ffn_hidden_size} x{rows}"] = functools.partial(
                check_swiglu, ffn=cfg.ffn_hidden_size, rows=rows)
        checks[f"row_attention {cfg.num_heads} heads x{rows}"] = functools.partial(
            check_row_attention, heads=cfg.num_heads, groups=cfg.kv_heads, head_dim=cfg.head_dim,
            rows=rows, rotary=cfg.family != "chatglm")
        for (kind, k, n, bits, _), m in linears.items():
            checks[f"{kind} int{bits} {n}x{k} x{rows}"] = functools.partial(check_model_linear, m, rows=rows)
    return checks


CHECKS = {"rms_norm": check_rms_norm, "swiglu": check_swiglu, "row_attention": check_row_attention,
          "linear": check_linears}


def run_model(model, device, buckets=BUCKETS) -> str | None:
    """None when every kernel matches its reference at the model's shapes, else what failed. The
    decode GEMV is chosen first (select_decode_gemv), so the checks run the kernel the engine will."""
    select_decode_gemv(model, device, buckets)
    from . import linear
    failure = run(device, model_checks(model, buckets))
    if failure is not None and linear.decode_variant() == "mma":
        log.warning("decode GEMV: FMA (the kernel checks failed with the tensor-core GEMV: %s)", failure)
        linear.set_decode_variant("fma")
        failure = run(device, model_checks(model, buckets))
    return failure


def compare_decode_gemvs(module, device, buckets=BUCKETS) -> float:
    """The tensor-core GEMV (glm.gpu.mma) against the FMA GEMV on one of the model's int4 / int8
    linears at each bucket's rows and at 20 exact rows (blocks of 8): the largest relative
    difference; raises if any row's bits depend on its batch-mates (row i alone vs among the rows)."""
    from . import linear
    rows = max((*buckets, PREFILL_ROWS))
    g = torch.Generator().manual_seed(module.in_features)
    x = torch.randn(rows, module.in_features, generator=g).half().to(device)
    args = (module.weight, module.weight_scale, module.bias, module.bits)

    def run_gemv(variant, xs):
        linear.set_decode_variant(variant)
        return linear.quant_linear(xs, *args, exact_rows=True)

    worst = 0.0
    try:
        alone = [run_gemv("mma", x[i:i + 1]) for i in range(rows)]
        for m in (*buckets, PREFILL_ROWS):
            got = run_gemv("mma", x[:m])
            worst = max(worst, _close(got, run_gemv("fma", x[:m])))
            for i in range(m):
                if not torch.equal(got[i], alone[i][0]):
                    raise AssertionError(f"row {i} differs alone and among {m} rows")
    finally:
        linear.set_decode_variant("fma")
    return worst


def select_decode_gemv(model, device, buckets=BUCKETS) -> str:
    """"mma" (glm.gpu.mma) for every decode and exact row when it runs on this device and matches the
    FMA GEMV on each of the model's quantized linears within TOLERANCE, batch-invariantly; else
    "fma", with one log line saying why (never the torch fallback for this). GLM_DECODE_GEMV=fma
    (default auto) keeps the FMA GEMV without trying: the operator's way out should a device fault
    in the new kernel, which no self-test survives (a sticky CUDA error ends the process)."""
    from ..quant import QuantLinear
    from . import interpreting, linear, mma
    linear.set_decode_variant("fma")
    if settings.choice("GLM_DECODE_GEMV", "auto", ("auto", "fma")) == "fma":
        log.info("decode GEMV: FMA (GLM_DECODE_GEMV=fma)")
        return "fma"
    device = torch.device(device)
    quantized = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quantized.setdefault((m.in_features, m.out_features, m.bits, m.bias is not None), m)
    if interpreting() or device.type != "cuda" or not quantized:
        return "fma"
    if not all(mma.takes(m.weight, m.bits) for m in quantized.values()):
        log.info("decode GEMV: FMA (the tensor-core GEMV needs sm_75 and 16-aligned int4/int8 weights)")
        return "fma"
    t0 = time.monotonic()
    for (k, n, bits, _), m in quantized.items():
        try:
            with torch.inference_mode():
                err = compare_decode_gemvs(m, device, buckets)
        except Exception as e:  # noqa: BLE001 -- any failure means: keep the FMA GEMV
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning("decode GEMV: FMA (the tensor-core GEMV failed on int%d %dx%d: %s: %s)",
                        bits, n, k, type(e).__name__, first[:200])
            return "fma"
        if not err <= TOLERANCE:
            log.warning("decode GEMV: FMA (the tensor-core GEMV differs from it by %.3g on int%d %dx%d)",
                        err, bits, n, k)
            return "fma"
    linear.set_decode_variant("mma")
    log.info("decode GEMV: tensor cores (mma.sync), checked against the FMA GEMV on %d linears in %.1fs",
             len(quantized), time.monotonic() - t0)
    return "mma"


def required() -> bool:
    """GLM_REQUIRE_GPU_KERNELS=1: a failed self-test fails setup instead of serving at torch speed."""
    return settings.flag("GLM_REQUIRE_GPU_KERNELS")


def fallback(device, failure: str) -> str:
    """The backend to serve with after `failure`: "torch", logged at ERROR; raises GPUKernelError
    instead with GLM_REQUIRE_GPU_KERNELS=1."""
    if required():
        raise GPUKernelError(f"GPU kernel self-test failed on {device} ({failure}) and "
                             f"GLM_REQUIRE_GPU_KERNELS=1 forbids the torch fallback")
    log.error("GPU kernel self-test failed on %s (%s); serving with the torch backend (~4 tok/s at full "
              "size; GLM_REQUIRE_GPU_KERNELS=1 makes this a setup failure)", device, failure)
    return "torch"


def run(device, checks=None) -> str | None:
    """None when every kernel matches its reference on the device, else what failed."""
    device = torch.device(device)
    for name, check in (CHECKS if checks is None else checks).items():
        try:
            with torch.inference_mode():
                err = check(device)
        except Exception as e:  # noqa: BLE001 -- any failure means: do not serve with these kernels
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"{name}: {type(e).__name__}: {first}"[:300]
        if not err <= TOLERANCE:  # also catches nan
            return f"{name}: relative error {err:.3g} > {TOLERANCE}"
    return None


@functools.lru_cache(maxsize=None)
def _first_failure(device: torch.device) -> str | None:
    return run(device)


def passes(device: torch.device) -> bool:
    """run() once per device; a failure is logged (one line) and means the torch backend, or
    raises GPUKernelError with GLM_REQUIRE_GPU_KERNELS=1."""
    t0 = time.monotonic()
    failure = _first_failure(device)
    if failure is not None:
        fallback(device, failure)
    else:  # on a cold boot most of this is Triton compiling the kernels (its cache is not in the image)
        log.info("GPU kernel self-test passed on %s in %.1fs", device, time.monotonic() - t0)
    return failure is None


passes.cache_clear = _first_failure.cache_clear
