"""THUDM's weight-only int4/int8 format, and the Linear modules that compute from it.

Format (FORMATS.md): one scale per output row, symmetric, no zero point.
  int8: qweight int8 [N, K],   W = qweight * scale[:, None]
  int4: qweight int8 [N, K/2], byte j of a row holds column 2j in its high nibble and 2j+1 in its
        low nibble, both signed.
The checkpoint's tensors are used as they are (memory-mapped, zero copy); the CPU kernels in
glm/csrc read this layout directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# Rows of activations per call of a fused kernel. Longer inputs (prefill) go through in chunks of
# this many rows, so each chunk's activations stay in cache while the weights stream past; that
# keeps the fused kernels ahead of dequantize + dense GEMM at every M for quantized weights and for
# fp16 weights with fp32 activations (bench/kernels.py).
FUSED_MAX_ROWS = 32


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's quantizer, op for op in the weight's own dtype: (qweight int8, scale)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    scale = weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    # THUDM divides by a zero scale for an all-zero row; such a row quantizes to zeros.
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(weight / safe[:, None]).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 in [-8, 7] -> [N, K/2] int8, column 2j in the high nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    hi, lo = q[..., 0::2], q[..., 1::2]
    return ((hi << 4) | (lo & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] int8 -> [N, K] int8 with values in [-8, 7] (arithmetic shifts sign-extend)."""
    hi = packed >> 4
    lo = (packed << 4) >> 4
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def int8_activation_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for the opt-in int8-activation mode (kernels.int4_linear_i8 computes the same bits).

    Each row of x (fp32) is quantized symmetrically to int8 (scale max|x| / 127, round half to
    even) and multiplied with the int4 weights as integers; every sum is an integer below 2^24, so
    the fp32 GEMM here is exact and any kernel doing integer math agrees bitwise.
    """
    amax = x.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    acc = torch.round(x / s) @ unpack_int4(qweight).float().t()
    y = acc * s * scale.float()
    return y if bias is None else y + bias.float()


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization in `dtype`: W = q * scale per row."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.to(dtype) * scale.to(dtype)[:, None]


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W kept in THUDM's int4/int8 format.

    `int8_activations` (opt-in, CPU, int4, fp32 x): x is quantized per row to int8 and multiplied
    with VNNI integer dot products (int8_activation_linear) -- faster when several rows share
    the weights (batched decode, prefill), at the cost of rounding the activations to 8 bits.
    """

    int8_activations = False
    backend = "torch"  # "triton": glm.gpu.linear's kernels (fp16 activations); set by the loader
    exact_rows = False  # triton: every row through the decode kernel (ChatGLM2.compute_rows_exactly)

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        cols = in_features * bits // 8
        self.register_buffer("weight", torch.empty(out_features, cols, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.backend == "triton":
            y = _gpu_linear().quant_linear(x2, self.weight, self.weight_scale, self.bias, self.bits,
                                           exact_rows=self.exact_rows)
        elif x.is_cuda:
            y = F.linear(x2, self._dequantize_cuda(x.dtype), _cast(self.bias, x.dtype))
        else:
            y = self._forward_cpu(x2)
        return y.view(*shape[:-1], self.out_features)

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        bias = _cast(self.bias, x.dtype)
        if not kernels.used_for(x.device, x.dtype):
            if self.int8_activations and self.bits == 4 and x.dtype == torch.float32:
                return int8_activation_linear(x, self.weight, self.weight_scale, bias)
            return F.linear(x, dequantize(self.weight, self.weight_scale, self.bits, x.dtype), bias)
        k = kernels.get()
        x = x.contiguous()
        if self.int8_activations and self.bits == 4 and x.dtype == torch.float32:
            return k.int4_linear_i8(x, self.weight, self.weight_scale, bias)
        fused = k.int4_linear if self.bits == 4 else k.int8_linear
        return fused_rows(fused, x, self.weight, self.weight_scale, bias)

    def _dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        # THUDM's GPU path, with torch ops instead of its embedded cpm_kernels binary: dequantize
        # to fp16 (each product rounded to half, as its kernel does), then an fp16 GEMM. Runs on
        # any CUDA GPU, a T4 (sm_75) included; torch's int4 GEMM kernels need sm_80.
        return dequantize(self.weight, self.weight_scale.half(), self.bits, torch.float16).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


class HalfLinear(nn.Module):
    """A dense Linear whose weight stays in its checkpoint dtype (fp16) on the CPU.

    The CPU kernels read fp16 weights directly, so the 0.5 GB output layer is used zero-copy from
    the memory-mapped checkpoint instead of being widened to fp32. Without kernels, or on CUDA,
    the loader gives a plain nn.Linear in the compute dtype instead.
    """

    backend = "torch"  # "triton": glm.gpu.linear's kernels (fp16 activations); set by the loader
    exact_rows = False  # triton: every row through the decode kernel (ChatGLM2.compute_rows_exactly)

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_weight_linear(x, self.weight, _cast(self.bias, x.dtype), backend=self.backend,
                                  exact_rows=self.exact_rows)


def half_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       backend: str = "torch", exact_rows: bool = False) -> torch.Tensor:
    """x @ W^T + b for a weight kept in fp16 whatever x's dtype (HalfLinear, ChatGLM-6B's tied head)."""
    if backend == "triton":
        shape = x.shape
        y = _gpu_linear().half_linear(x.reshape(-1, shape[-1]), weight, bias, exact_rows=exact_rows)
        return y.view(*shape[:-1], weight.shape[0])
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    # bf16 activations: the fused kernel widens fp16 weights to fp32 math, so past one chunk a bf16
    # GEMM on bf16-cast weights is faster.
    if kernels.used_for(x2.device, x.dtype) and (x.dtype == torch.float32 or x2.shape[0] <= FUSED_MAX_ROWS):
        y = fused_rows(kernels.get().half_linear, x2, weight, bias)
    else:
        y = blocked_linear(x2, weight.shape[0], bias, lambda s, e, out: out.copy_(weight[s:e]))
    return y.view(*shape[:-1], weight.shape[0])


def fused_rows(kernel, x: torch.Tensor, *args) -> torch.Tensor:
    """kernel(x, *args) for any number of rows of x, FUSED_MAX_ROWS rows per call."""
    if x.shape[0] <= FUSED_MAX_ROWS:
        return kernel(x, *args)
    return torch.cat([kernel(x[i:i + FUSED_MAX_ROWS], *args) for i in range(0, x.shape[0], FUSED_MAX_ROWS)])


# Output rows of an fp16 weight widened at a time for a dense GEMM (bf16 prefill, or no kernels):
# bounds the transient copy to BLOCK_ROWS x in_features instead of the whole matrix (the 65024 x 4096
# output layer: 0.5 GB in bf16, 1 GB in fp32), so peak memory stays near the checkpoint's size.
BLOCK_ROWS = 4096


def blocked_linear(x: torch.Tensor, out_features: int, bias: torch.Tensor | None, widen) -> torch.Tensor:
    """x @ W^T + b, W widened block by block by widen(start, end, out) into one reused buffer."""
    block_rows = BLOCK_ROWS
    y = x.new_empty(x.shape[0], out_features)
    buf = x.new_empty(min(block_rows, out_features), x.shape[1])
    for s in range(0, out_features, block_rows):
        e = min(s + block_rows, out_features)
        y[:, s:e] = x @ widen(s, e, buf[:e - s]).t()
    if bias is not None:
        y += bias
    return y


def _gpu_linear():
    # Imported on first use: it imports triton, which the CPU path never needs.
    from .gpu import linear
    return linear


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)

