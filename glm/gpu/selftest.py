"""Every Triton kernel against its torch reference on a few small shapes, on the serving device.

Run once at setup before the Triton backend is chosen: a compile error, a driver that cannot load
the cubin or wrong numbers cost one log line and the torch backend, never a failed setup.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("glm")

TOLERANCE = 2e-2  # fp16 outputs of O(1) values: a few ulps of rounding, far below any real bug


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want| relative to max |want| (at least 1)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1))


def check_rms_norm(device) -> float:
    from .pointwise import rms_norm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 96, generator=g).half().to(device)
    w = torch.rand(96, generator=g).half().to(device)
    xf = x.float()
    want = w.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    return _close(rms_norm(x, w, 1e-5), want)


def check_swiglu(device) -> float:
    from .pointwise import swiglu
    h = torch.randn(3, 2 * 80, generator=torch.Generator().manual_seed(1)).half().to(device)
    gate, up = h.float().chunk(2, dim=-1)
    return _close(swiglu(h), F.silu(gate) * up)


def check_row_attention(device) -> float:
    """Two sequences of different lengths in one pool, rotary on, against per-sequence softmax."""
    from ..config import ChatGLMConfig
    from ..kvpool import KVPool
    from ..ops import apply_rotary
    from .attention import row_attention
    from .ops import row_plan

    cfg = ChatGLMConfig(num_layers=2, hidden_size=64, num_heads=4, kv_heads=2, head_dim=16,
                        ffn_hidden_size=32, vocab_size=8, seq_length=64, max_context=64)
    g = torch.Generator().manual_seed(2)
    pool = KVPool(cfg, 40, device, torch.float16)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g).half())
    pool.v.copy_(torch.randn(pool.v.shape, generator=g).half())
    caches, starts = [pool.cache(3, 17), pool.cache(22, 9)], [11, 5]
    B, layer = 2, 1
    q = torch.randn(B, cfg.num_heads, cfg.head_dim, generator=g).half().to(device)
    k = torch.randn(B, cfg.kv_heads, cfg.head_dim, generator=g).half().to(device)
    v = torch.randn(B, cfg.kv_heads, cfg.head_dim, generator=g).half().to(device)
    # ChatGLM2's angles at each row's position: [B, 1, hd/4]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, cfg.head_dim // 2, 2, dtype=torch.float32) / (cfg.head_dim // 2))
    angles = (torch.tensor(starts, dtype=torch.float32)[:, None, None] * inv_freq).to(device)
    cos, sin = torch.cos(angles), torch.sin(angles)
    want = []
    for b, (c, s) in enumerate(zip(caches, starts)):
        kr = apply_rotary(k[b][None, None].float(), cos[b:b + 1], sin[b:b + 1])[0, 0].half()
        qr = apply_rotary(q[b][None, None].float(), cos[b:b + 1], sin[b:b + 1])[0, 0].half()
        keys = torch.cat((c.k[layer, :, :s], kr[:, None]), dim=1).float()
        values = torch.cat((c.v[layer, :, :s], v[b][:, None]), dim=1).float()
        kh = keys.repeat_interleave(cfg.num_heads // cfg.kv_heads, dim=0)
        vh = values.repeat_interleave(cfg.num_heads // cfg.kv_heads, dim=0)
        p = (qr.float()[:, None] @ kh.transpose(1, 2) * cfg.head_dim ** -0.5).softmax(-1)
        want.append((p @ vh)[:, 0])
    plan = row_plan(caches, starts, 1, device)
    got = row_attention(q, k, v, *plan, layer, cfg.head_dim ** -0.5, cos[:, 0], sin[:, 0])
    written = max(_close(c.k[layer, :, s], want_k) for c, s, want_k in
                  zip(caches, starts, [apply_rotary(k[b][None, None].float(), cos[b:b + 1], sin[b:b + 1])[0, 0]
                                       for b in range(B)]))
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


CHECKS = {"rms_norm": check_rms_norm, "swiglu": check_swiglu, "row_attention": check_row_attention,
          "linear": check_linears}


def run(device) -> str | None:
    """None when every kernel matches its reference on the device, else what failed."""
    device = torch.device(device)
    for name, check in CHECKS.items():
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
def passes(device: torch.device) -> bool:
    """run() once per device; a failure is logged (one line) and means the torch backend."""
    t0 = time.monotonic()
    failure = run(device)
    if failure is not None:
        log.warning("GPU kernel self-test failed on %s (%s); serving with the torch backend", device, failure)
    else:  # on a cold boot most of this is Triton compiling the kernels (its cache is not in the image)
        log.info("GPU kernel self-test passed on %s in %.1fs", device, time.monotonic() - t0)
    return failure is None
