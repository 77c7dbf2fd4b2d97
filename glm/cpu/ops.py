"""The model's operations on the fused CPU kernels (glm/cpu/csrc via glm.cpu.kernels), for float32 and
bfloat16 activations: quantized and fp16 linears reading the checkpoint's layout, RMSNorm, SwiGLU and
attention with the rotary embedding and the cache writes fused in.

Every kernel computes a row the same way whatever the other rows are, so rows are always exact (a
prefill chunk's row is the bits a decode step gets), except where noted in `half_linear`.
"""
from __future__ import annotations

import torch

from ..ops import TorchOps, apply_rotary
from . import kernels

# Rows of activations per call of a fused kernel. Longer inputs (prefill) go through in chunks of
# this many rows, so each chunk's activations stay in cache while the weights stream past; that
# keeps the fused kernels ahead of dequantize + dense GEMM at every M for quantized weights and for
# fp16 weights with fp32 activations (bench/kernels.py).
FUSED_MAX_ROWS = 32


class CpuOps(TorchOps):
    """The CPU kernels; built by the loader only where they serve (kernels.used_for)."""

    name = "cpu-kernels"
    reads_half_weights = True

    def computes_rows_exactly(self, dtype: torch.dtype, half_weights: bool) -> bool:
        # bf16 activations on fp16 dense weights take a bf16 GEMM past one chunk of rows
        # (half_linear), whose rows depend on how many there are.
        return dtype == torch.float32 or not half_weights

    def rms_norm(self, x, weight, eps):
        return kernels.rms_norm(x, weight, eps)

    def swiglu(self, h):
        return kernels.swiglu(h)

    def quant_linear(self, x, qweight, scale, bias, bits):
        bias = None if bias is None else bias.to(x.dtype)
        x = x.contiguous()
        k = kernels.get()
        if self.int8_activations and bits == 4 and x.dtype == torch.float32:
            return k.int4_linear_i8(x, qweight, scale, bias)
        return fused_rows(k.int4_linear if bits == 4 else k.int8_linear, x, qweight, scale, bias)

    def half_linear(self, x, weight, bias):
        # bf16 activations: the fused kernel widens fp16 weights to fp32 math, so past one chunk a
        # bf16 GEMM on bf16-cast weights is faster.
        if weight.dtype != x.dtype and (x.dtype == torch.float32 or x.shape[0] <= FUSED_MAX_ROWS):
            bias = None if bias is None else bias.to(x.dtype)
            return fused_rows(kernels.get().half_linear, x.contiguous(), weight, bias)
        return super().half_linear(x, weight, bias)

    def attention(self, q, k, v, cos, sin, layer, starts, caches):
        if any(c.k.dtype != q.dtype for c in caches):  # caches the kernels cannot write
            return super().attention(q, k, v, cos, sin, layer, starts, caches)
        B, T, _, hd = q.shape
        if T == 1:
            # One kernel call: rotary, cache writes and attention for the whole batch.
            slots = [c.slot(s) for c, s in zip(caches, starts)]
            y = kernels.decode_attention(q[:, 0], k[:, 0], v[:, 0], [c.k for c in caches], [c.v for c in caches],
                                         layer, slots, hd ** -0.5, cos[:, 0], sin[:, 0])
            return y[:, None]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = []
        for b, cache in enumerate(caches):
            cache.update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
            # Every query row through the decode kernel's math: a position's output is the same
            # whichever chunk (or decode step) computes it, so cached KV can be reused exactly.
            out.append(kernels.prefill_attention(q[b], cache.k, cache.v, layer, cache.offset + starts[b], hd ** -0.5))
        return torch.stack(out)


def fused_rows(kernel, x: torch.Tensor, *args) -> torch.Tensor:
    """kernel(x, *args) for any number of rows of x, FUSED_MAX_ROWS rows per call."""
    if x.shape[0] <= FUSED_MAX_ROWS:
        return kernel(x, *args)
    return torch.cat([kernel(x[i:i + FUSED_MAX_ROWS], *args) for i in range(0, x.shape[0], FUSED_MAX_ROWS)])
