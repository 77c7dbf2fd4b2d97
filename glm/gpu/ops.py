"""The model's operations on the Triton kernels (fp16 activations): the linears of glm.gpu.linear (and
glm.gpu.prefill's tensor-core path from prefill.MIN_ROWS rows), the row-wise kernels of
glm.gpu.pointwise and the attention of glm.gpu.attention.

Decode steps run attention as rows at their own cache slots (attention.row_attention) and the
linears through the decode GEMV. A prompt's rows with `exact_rows` on (the prefix cache keeps them:
prefill_rows) run in glm.gpu.prefill's fixed-size chunks -- zero-padded GEMMs of CHUNK_ROWS rows and
the row-invariant causal_attention -- so a position's KV is the same bits whichever chunk holds it.
Those bits differ from a decode step's (decode_writes_prefill_kv = False): the engine recomputes a
reply's rows as prefill before the cache keeps them. Other rows with `exact_rows` on (a decode
step's, the reply recomputation's own are prefill) run as decode rows; other prefill runs the
GEMM or cuBLAS and SDPA.
"""
from __future__ import annotations

import torch

from contextlib import nullcontext

from .. import staging
from ..ops import TorchOps, apply_rotary
from . import attention, linear, pointwise, prefill


class TritonOps(TorchOps):
    name = "triton"
    reads_half_weights = True
    decode_writes_prefill_kv = False

    def computes_rows_exactly(self, dtype: torch.dtype, half_weights: bool) -> bool:
        return True

    def prefill_rows(self):
        """With exact rows, a prompt's rows in glm.gpu.prefill's fixed-size chunks."""
        return prefill.exact_chunks() if self.exact_rows else nullcontext()

    def rms_norm(self, x, weight, eps):
        return pointwise.rms_norm(x, weight, eps)

    def swiglu(self, h):
        return pointwise.swiglu(h)

    def quant_linear(self, x, qweight, scale, bias, bits):
        return linear.quant_linear(x, qweight, scale, bias, bits, exact_rows=self.exact_rows)

    def half_linear(self, x, weight, bias):
        return linear.half_linear(x, weight, bias, exact_rows=self.exact_rows)

    def attention(self, q, k, v, cos, sin, layer, starts, caches):
        B, T, heads, hd = q.shape
        exact_prefill = prefill.chunk_rows() is not None  # inside prefill_rows(): causal_attention
        if (T == 1 or self.exact_rows) and not exact_prefill:
            plan = row_plan(caches, starts, T, q.device)
            if plan is not None:
                y = attention.row_attention(
                    q.reshape(B * T, heads, hd), k.reshape(B * T, -1, hd), v.reshape(B * T, -1, hd), *plan,
                    layer, hd ** -0.5, cos.reshape(B * T, -1), sin.reshape(B * T, -1))
                return y.view(B, T, heads, hd)
        # The SDPA path rotates with the same torch ops as the CPU.
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = []
        for b, cache in enumerate(caches):
            keys, values = cache.update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
            if exact_prefill:
                out.append(prefill.causal_attention(q[b].transpose(0, 1), keys, values))
            else:
                out.append(attention.prefill_attention(q[b].transpose(0, 1), keys, values, cache.offset + starts[b]))
        return torch.stack(out).transpose(1, 2)

    def masked_attention(self, q, k, v, masks, layer, starts, caches):
        B, T, heads, hd = q.shape
        if T == 1:  # a generated token sees every key: rows at their own slots
            plan = row_plan(caches, starts, 1, q.device)
            if plan is not None:
                y = attention.row_attention(q[:, 0], k[:, 0], v[:, 0], *plan, layer, hd ** -0.5)
                return y.view(B, 1, heads, hd)
        return super().masked_attention(q, k, v, masks, layer, starts, caches)


# The per-row tensors of the last call, keyed by the values they hold: every layer of a step asks
# for the same ones, so they are copied to the device once per step. No reference to the pool is
# kept (a replaced engine's pool is freed). Read and replaced as one tuple: concurrent callers
# (another model's self-test) at worst rebuild it.
_last_plan: tuple | None = None


def row_plan(caches, starts: list[int], T: int, device):
    """For rows t = 0..T-1 of each sequence b at position starts[b] + t: (pool k, pool v, each row's
    cache offset, cache slot count and slot) for attention.row_attention, or None (no shared pool)."""
    global _last_plan
    views = attention.pool_views(caches)
    if views is None:
        return None
    flat_k, flat_v, offsets = views
    step = staging.current()
    if step is not None and T == 1:  # a decode step: the runner staged the plan with its rows
        return flat_k, flat_v, step.cache_offsets, step.cache_slots, step.slots
    first = [c.slot(s, T) for c, s in zip(caches, starts)]
    key = (tuple(o for o in offsets for _ in range(T)),
           tuple(c.k.shape[2] for c in caches for _ in range(T)),
           tuple(f + t for f in first for t in range(T)), str(device))
    last = _last_plan
    if last is None or last[0] != key:
        last = (key, tuple(torch.tensor(v, device=device) for v in key[:3]))
        _last_plan = last
    return (flat_k, flat_v, *last[1])
