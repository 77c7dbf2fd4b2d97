"""THUDM's weight-only int4/int8 format, and the Linear modules that compute from it.

Format (FORMATS.md): one scale per output row, symmetric, no zero point.
  int8: qweight int8 [N, K],   W = qweight * scale[:, None]
  int4: qweight int8 [N, K/2], byte j of a row holds column 2j in its high nibble and 2j+1 in its
        low nibble, both signed.
The checkpoint's tensors are used as they are (memory-mapped, zero copy); the CPU kernels in
glm/cpu/csrc and the Triton kernels in glm/gpu read this layout directly. The Linear modules compute
through the ops the loader chose (glm.ops).
"""
from __future__ import annotations

import torch
from torch import nn


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
    """Reference for the opt-in int8-activation mode (the CPU kernels' int4_linear_i8 computes the same bits).

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
    """y = x @ W^T + b with W kept in THUDM's int4/int8 format, computed by ops.quant_linear."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False, *, ops):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.ops = in_features, out_features, bits, ops
        cols = in_features * bits // 8
        self.register_buffer("weight", torch.empty(out_features, cols, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.quant_linear(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale, self.bias, self.bits)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


class HalfLinear(nn.Module):
    """A dense Linear whose weight stays in its checkpoint dtype (fp16), for ops that read fp16
    weights directly (ops.reads_half_weights): the 0.5 GB output layer is then used zero-copy from
    the memory-mapped checkpoint instead of being widened to fp32. For other ops the loader gives a
    plain nn.Linear in the compute dtype instead.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, ops):
        super().__init__()
        self.in_features, self.out_features, self.ops = in_features, out_features, ops
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_weight_linear(self.ops, x, self.weight, self.bias)


def half_weight_linear(ops, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + b over x's last dim for a weight kept in fp16 (HalfLinear, ChatGLM-6B's tied head)."""
    y = ops.half_linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
