"""Row-wise kernels of the Triton backend: RMSNorm and SwiGLU, fp16 in and out, fp32 math.

One program per row; the row's reduction runs in one fixed order whatever the number of rows, so a
sequence's results do not depend on its batch-mates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(h_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


SWIGLU_BLOCK = 1024


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    n = x2.shape[1]
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, n, eps, BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim (ChatGLM2's MLP), in h's dtype."""
    h2 = h.reshape(-1, h.shape[-1]).contiguous()
    n = h2.shape[1] // 2
    out = torch.empty(h2.shape[0], n, device=h.device, dtype=h.dtype)
    block = min(SWIGLU_BLOCK, triton.next_power_of_2(n))
    _swiglu_kernel[(h2.shape[0], triton.cdiv(n, block))](h2, out, n, BLOCK=block)
    return out.view(*h.shape[:-1], n)


def _specs():
    from .compile import KernelSpec
    rms = {"x_ptr": "*fp16", "w_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32", "eps": "fp32", "BLOCK": "constexpr"}
    swiglu = {"h_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}
    return [
        KernelSpec(kernel=_rms_norm_kernel, shape_class="RMSNorm hidden 4096", signature=rms,
                   constexprs={"BLOCK": 4096}, aligned=("x_ptr", "w_ptr", "out_ptr", "n"), no_spills=True),
        KernelSpec(kernel=_swiglu_kernel, shape_class="SwiGLU ffn 13696", signature=swiglu,
                   constexprs={"BLOCK": SWIGLU_BLOCK}, aligned=("h_ptr", "out_ptr", "n"), no_spills=True),
    ]


COMPILE_SPECS = _specs()
