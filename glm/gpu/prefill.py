"""Prefill linears on the tensor cores: a layer's stored weights dequantized to fp16 into one scratch
buffer, then one cuBLAS fp16 GEMM (torch.addmm: fp16 inputs, fp32 accumulation, bias in its epilogue).

Triton 3.6 lowers tl.dot to mma only from sm_80, so on a T4 (sm_75) glm.gpu.linear's GEMM runs on
the FP32 units (8.1 TFLOPS); cuBLAS reaches the fp16 tensor cores (65 TFLOPS). Dequantizing costs
one pass over the layer's weights per call (int4 read, fp16 written and read back), so this pays
above MIN_ROWS rows (bench/README.md, "Prefill on a T4"); below it glm.gpu.linear's kernels stay.

Dequantization (`_dequant_kernel`) builds each fp16 weight from its bits instead of converting an
integer: 0x6400 | u is the fp16 number 1024 + u for u < 1024, so a signed nibble s (stored as
s + 8 after flipping its sign bit, u = nibble ^ 8) is (0x6400 | u) - 1032 exactly, and a signed byte
is (0x6400 | (byte ^ 0x80)) - 1152. THUDM's int4 layout (glm/quant.py): byte j of a row holds
column 2j in its high nibble and 2j + 1 in its low one.

The scale is multiplied into each dequantized weight in fp16, as THUDM's extract_weight_to_half
does (each product rounded to half), rather than after the GEMM: the GEMM then yields y directly
and adds the bias in the same pass, and its fp16 output cannot overflow on the raw integer sums
(|q| up to 127 over K = 13696 columns). The extra rounding is one half-ulp per weight; on the test
vectors it stays within the fp16 output rounding (bench/README.md has the figures).

Exact rows (`chunk_rows`): with a fixed GEMM shape, row i of the output depends only on row i of
the input (the kernel, its tiling and each element's reduction order are chosen from the shape
alone), so prefill that always multiplies CHUNK_ROWS-row blocks, zero-padded, computes a position
the same way whichever chunk holds it: the property the prefix cache needs (glm/prefix_cache.py).
Attention for those rows is `causal_attention`, tiled but row-invariant in the same sense.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading

import torch
import triton
import triton.language as tl

from .compile import KernelSpec

# Fewer rows than this stay on glm.gpu.linear's kernels. On a T4 for ChatGLM2-6B int4 the dequantize
# pass plus the fp16 weight read take what ~72 rows take through the FMA-unit GEMM (bench/README.md).
MIN_ROWS = 80
# Rows per GEMM when rows must be exact: the engine's prefill chunk.
CHUNK_ROWS = 256

DEQUANT_BLOCK_N = 16
DEQUANT_BLOCK_BYTES = 128  # stored bytes of a weight row per program: 16 per thread, one 128-bit load
DEQUANT_WARPS = 4


@triton.jit
def _dequant_kernel(q_ptr, scale_ptr, w_ptr, N, K_STORED, stride_qn, stride_wn,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[n-block, k-block] = q * scale in fp16; BLOCK_K stored bytes of each of BLOCK_N rows."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K_STORED)[None, :]
    stored = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0)
    byte = stored.to(tl.int16) & 0xFF
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float16)[:, None]
    if BITS == 4:
        hi = (((byte >> 4) ^ 8) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        lo = (((byte & 0xF) ^ 8) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        w = tl.interleave(hi * scale, lo * scale)  # columns 2j, 2j + 1
        offs_c = tl.program_id(1) * 2 * BLOCK_K + tl.arange(0, 2 * BLOCK_K)
        c_ok = offs_c < 2 * K_STORED
    else:
        w = ((byte ^ 0x80) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
        w = w * scale
        offs_c = offs_k
        c_ok = offs_k < K_STORED
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_c[None, :], w,
             mask=(offs_n < N)[:, None] & c_ok[None, :])


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 [N, K] = THUDM's stored weights times their row scales, each product rounded to half
    (glm.quant.dequantize(..., torch.float16) bit for bit). `out`: where to write it (the scratch)."""
    n, stored = qweight.shape
    k = stored * 8 // bits
    if out is None:
        out = torch.empty(n, k, dtype=torch.float16, device=qweight.device)
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(stored, DEQUANT_BLOCK_BYTES))
    _dequant_kernel[grid](qweight, scale, out, n, stored, qweight.stride(0), out.stride(0),
                          BITS=bits, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_BYTES,
                          num_warps=DEQUANT_WARPS)
    return out


class Scratch:
    """One fp16 buffer per device that every quantized layer dequantizes into, in turn. Sized once
    for the largest layer (memory.plan counts it), grown only if a larger layer shows up."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()  # held from the dequantize to the GEMM that reads it

    def reserve(self, elements: int, device) -> torch.Tensor:
        key = str(torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < elements:
            self._buffers.pop(key, None)
            buf = self._buffers[key] = torch.empty(elements, dtype=torch.float16, device=device)
        return buf

    def weight(self, n: int, k: int, device) -> torch.Tensor:
        return self.reserve(n * k, device)[:n * k].view(n, k)


SCRATCH = Scratch()


def scratch_elements(model: torch.nn.Module) -> int:
    """fp16 elements of the scratch: the largest quantized linear's weight, unpacked."""
    from ..quant import QuantLinear
    return max((m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantLinear)),
               default=0)


# Rows per GEMM while a prefill must compute rows exactly (None: as many rows as given).
_chunk_rows: contextvars.ContextVar[int | None] = contextvars.ContextVar("glm_prefill_chunk_rows",
                                                                          default=None)


@contextlib.contextmanager
def exact_chunks(rows: int = CHUNK_ROWS):
    """Within: every linear computes its rows in zero-padded GEMMs of `rows` rows (see the module
    docstring), whatever their number -- a prefill whose rows the prefix cache will reuse."""
    token = _chunk_rows.set(rows)
    try:
        yield
    finally:
        _chunk_rows.reset(token)


def chunk_rows() -> int | None:
    return _chunk_rows.get()


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           rows: int | None = None) -> torch.Tensor:
    """x fp16 [M, K] @ weight fp16 [N, K]^T + bias on cuBLAS; with `rows`, in zero-padded blocks of
    exactly that many rows."""
    w_t = weight.t()
    if rows is None:
        return x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    m = x.shape[0]
    y = torch.empty(m, weight.shape[0], dtype=torch.float16, device=x.device)
    block = x.new_zeros(rows, x.shape[1])
    for s in range(0, m, rows):
        e = min(s + rows, m)
        if e - s == rows:
            part = x[s:e]
        else:
            block[e - s:].zero_()
            block[:e - s] = x[s:e]
            part = block
        out = part @ w_t if bias is None else torch.addmm(bias, part, w_t)
        y[s:e] = out[:e - s]
    return y


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, rows: int | None = None) -> torch.Tensor:
    """x fp16 [M, K] @ (qweight * scale)^T + bias: dequantize into the scratch, then cuBLAS."""
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    with SCRATCH.lock:
        w = dequantize(qweight, scale, bits, out=SCRATCH.weight(n, k, x.device))
        return matmul(x, w, bias, rows)


# Causal prefill attention for exact rows: query rows per program, keys per iteration; 8 warps keep
# the fp32 accumulator of 32 rows x 128 dims in registers on sm_75 (4 spill: 255 registers).
ATTN_BLOCK_M = 32
ATTN_BLOCK_N = 32
ATTN_WARPS = 8


@triton.jit
def _causal_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, T, S, scale,
                             stride_qh, stride_qt, stride_kg, stride_ks, stride_vg, stride_vs,
                             stride_oh, stride_ot,
                             HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (block of query rows, head): softmax(q k^T * scale) v, row t over slots 0..S-T+t.
    Every row walks the key blocks from slot 0 in the same order; blocks past its own slot (there
    because a later row of its block needs them) leave it unchanged bit for bit (alpha = exp(0) = 1,
    p = 0), so a row's result does not depend on which rows share its program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    d = tl.arange(0, HEAD_DIM)
    slot = S - T + rows  # every row has key 0, the padding rows past T included
    q = tl.load(q_ptr + head * stride_qh + rows[:, None] * stride_qt + d[None, :],
                mask=(rows < T)[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    k_base = k_ptr + group * stride_kg
    v_base = v_ptr + group * stride_vg
    end = tl.minimum(S - T + tl.program_id(0) * BLOCK_M + BLOCK_M, S)
    for n0 in range(0, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + keys[:, None] * stride_ks + d[None, :], mask=(keys < S)[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        visible = (keys[None, :] <= slot[:, None]) & (keys < S)[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        v = tl.load(v_base + keys[:, None] * stride_vs + d[None, :], mask=(keys < S)[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + head * stride_oh + rows[:, None] * stride_ot + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < T)[:, None])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence's prefill attention with exact rows: q [heads, T, hd] at the last T of the S
    slots of k, v [groups, S, hd] (all unit stride in hd); [heads, T, hd] in q's dtype. Row t's bits
    depend only on its own q row and the keys up to its slot, whatever chunk it is computed in."""
    heads, T, hd = q.shape
    groups, S, _ = k.shape
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("causal_attention: q, k, v need unit stride in head_dim")
    out = torch.empty(heads, T, hd, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(T, ATTN_BLOCK_M), heads)
    _causal_attention_kernel[grid](q, k, v, out, T, S, hd ** -0.5, q.stride(0), q.stride(1),
                                   k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   out.stride(0), out.stride(1), HEADS_PER_GROUP=heads // groups,
                                   HEAD_DIM=hd, BLOCK_M=ATTN_BLOCK_M, BLOCK_N=ATTN_BLOCK_N,
                                   num_warps=ATTN_WARPS)
    return out


def _specs() -> list[KernelSpec]:
    specs = []
    for bits in (4, 8):
        specs.append(KernelSpec(
            kernel=_dequant_kernel, shape_class=f"prefill dequantize int{bits}",
            signature={"q_ptr": "*i8", "scale_ptr": "*fp16", "w_ptr": "*fp16", "N": "i32",
                       "K_STORED": "i32", "stride_qn": "i32", "stride_wn": "i32",
                       "BITS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            constexprs={"BITS": bits, "BLOCK_N": DEQUANT_BLOCK_N, "BLOCK_K": DEQUANT_BLOCK_BYTES},
            aligned=("q_ptr", "scale_ptr", "w_ptr", "N", "K_STORED", "stride_qn", "stride_wn"),
            num_warps=DEQUANT_WARPS, no_spills=True))
    attn = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "out_ptr": "*fp16", "T": "i32", "S": "i32",
            "scale": "fp32", **{name: "i32" for name in ("stride_qh", "stride_qt", "stride_kg", "stride_ks",
                                                         "stride_vg", "stride_vs", "stride_oh", "stride_ot")}}
    specs.append(KernelSpec(
        kernel=_causal_attention_kernel, shape_class="prefill causal attention ChatGLM2 (16 heads per group, hd 128)",
        signature={name: attn.get(name, "constexpr") for name in _causal_attention_kernel.arg_names},
        constexprs={"HEADS_PER_GROUP": 16, "HEAD_DIM": 128, "BLOCK_M": ATTN_BLOCK_M, "BLOCK_N": ATTN_BLOCK_N},
        aligned=tuple(name for name in attn if name.startswith(("q_", "k_", "v_", "out_", "stride"))),
        num_warps=ATTN_WARPS, no_spills=True))
    return specs


COMPILE_SPECS = _specs()
