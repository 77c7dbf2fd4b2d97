"""Triton linears that read THUDM's int4 / int8 weights as stored, and the fp16 output layer.

y = x @ W^T + b, x fp16 [M, K], W given as (see glm/quant.py for the format)
  int4: qweight int8 [N, K/2] (column 2j in the high nibble, 2j+1 in the low one, both signed)
        and scale fp16 [N];   int8: qweight int8 [N, K] and scale [N];   fp16: weight [N, K].
The scale is applied once per output after the K reduction (sum_k q*x, then * scale), so the weight
is never materialized in fp16 and each stored byte is read once per call.

Two kernels, one per regime:
  decode (M <= DECODE_MAX_ROWS): _gemv_kernel. Each program streams a BLOCK_N-row slab of the
    weights once for all M rows. Every row's dot product is the same instruction sequence over the
    same tile layout, whatever the other rows are (a row's reduction order never depends on its
    batch-mates), so a sequence's output is bitwise the same alone or in a batch.
  prefill (more rows): _gemm_kernel, a tiled GEMM that dequantizes each K tile of the weights in
    registers and multiplies with tl.dot in fp16 with fp32 accumulation (an FMA loop on sm_75,
    mma from sm_80). With exact_rows, the GEMV over blocks of DECODE_MAX_ROWS rows instead.
From glm.gpu.prefill.MIN_ROWS rows on, and for every row inside prefill.exact_chunks() (a prefill
whose KV the prefix cache keeps), glm.gpu.prefill: the weights dequantized once, then cuBLAS on the
tensor cores.
Nothing here needs sm_80: no bf16, no cp.async-only paths, no TMA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import prefill
from .compile import KernelSpec

# Rows the decode GEMV takes per call: the engine's decode batch. More rows go to the GEMM.
DECODE_MAX_ROWS = 8

# Decode: output rows per program, and stored bytes of a weight row per K step (so an int4, an
# int8 and an fp16 tile are all BLOCK_N x 128 bytes: 16 bytes per thread per step, one 128-bit load).
GEMV_BLOCK_N = 16
GEMV_TILE_BYTES = 128
GEMV_WARPS = 4

# Prefill: output tile and K step (in unpacked columns). Triton 3.6 lowers tl.dot to mma.sync only
# from sm_80; on sm_75 it is an FMA loop, for which this is the largest tile that compiles for
# sm_75 without spills in all three weight formats.
GEMM_BLOCK_M = 64
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 32
GEMM_WARPS = 8
GEMM_STAGES = 2


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K_STORED, stride_xm, stride_wn,
                 stride_ym, BITS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """y[m-block, n-block], M_PAD rows per m-block; K_STORED = stored columns of w (K/2 for int4).
    The m-blocks of one n-block are neighbours in launch order: its weight slab is read from DRAM
    once and from L2 by the rest."""
    row0 = tl.program_id(0) * M_PAD
    x_ptr += row0 * stride_xm
    y_ptr += row0 * stride_ym
    M -= row0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, M_PAD)
    n_ok = offs_n < N
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_STORED, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K_STORED
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                     mask=n_ok[:, None] & k_ok[None, :], other=0)
        if BITS == 4:
            hi = (wt >> 4).to(tl.float32)
            lo = ((wt << 4).to(tl.int8) >> 4).to(tl.float32)
        else:
            wf = wt.to(tl.float32)
        for m in tl.static_range(M_PAD):
            x_row = x_ptr + m * stride_xm
            x_ok = k_ok & (m < M)
            if BITS == 4:
                xe = tl.load(x_row + 2 * kk, mask=x_ok, other=0.0).to(tl.float32)
                xo = tl.load(x_row + 2 * kk + 1, mask=x_ok, other=0.0).to(tl.float32)
                part = tl.sum(hi * xe[None, :] + lo * xo[None, :], axis=1)
            else:
                xv = tl.load(x_row + kk, mask=x_ok, other=0.0).to(tl.float32)
                part = tl.sum(wf * xv[None, :], axis=1)
            # Row m's partial sum goes into row m only: an fp32 add per output, nothing shared.
            acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    _store_output(acc, rows, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """y[m-block, n-block]; the m-blocks of one n-block are neighbours in launch order, so a weight
    tile is fetched from DRAM once and reused from L2 by the programs that follow."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BITS == 4:
        # One stored byte holds two columns: multiply even and odd columns of x separately.
        offs_kb = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K // 2, BLOCK_K // 2):
            kb = k0 + offs_kb
            kb_ok = kb < K // 2
            wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + kb[:, None],
                         mask=kb_ok[:, None] & n_ok[None, :], other=0)
            hi = (wt >> 4).to(tl.float16)
            lo = ((wt << 4).to(tl.int8) >> 4).to(tl.float16)
            x_tile = x_ptr + offs_m[:, None] * stride_xm + 2 * kb[None, :]
            x_mask = m_ok[:, None] & kb_ok[None, :]
            xe = tl.load(x_tile, mask=x_mask, other=0.0)
            xo = tl.load(x_tile + 1, mask=x_mask, other=0.0)
            acc = tl.dot(xe, hi, acc)
            acc = tl.dot(xo, lo, acc)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None],
                         mask=k_ok[:, None] & n_ok[None, :], other=0)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(xt, wt.to(tl.float16), acc)
    _store_output(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)


@triton.jit
def _store_output(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym,
                  BITS: tl.constexpr):
    """y = acc * scale (quantized weights) + bias, rounded once to fp16."""
    n_ok = offs_n < N
    if BITS != 16:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if bias_ptr is not None:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(tl.float16), mask=mask)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, exact_rows: bool = False) -> torch.Tensor:
    """x fp16 [M, K] @ (qweight * scale)^T + bias -> fp16 [M, N], THUDM's int4 / int8 layout.
    exact_rows: every row computed as the decode kernel computes it, however many rows there are."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if scale.shape != (qweight.shape[0],):
        raise ValueError(f"scale must have shape ({qweight.shape[0]},), got {tuple(scale.shape)}")
    return _linear(x, qweight, qweight.shape[1] * 8 // bits, scale.contiguous(), bias, bits, exact_rows)


def _on_tensor_cores(x, w, scale, bias, bits, rows):
    if bits == 16:
        return prefill.matmul(x, w, bias, rows)
    return prefill.quant_linear(x, w, scale, bias, bits, rows)


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                exact_rows: bool = False) -> torch.Tensor:
    """x fp16 [M, K] @ weight^T + bias -> fp16 [M, N], weight fp16 [N, K] (the output layer)."""
    if weight.dtype != torch.float16 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D fp16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    return _linear(x, weight, weight.shape[1], None, bias, 16, exact_rows)


def _linear(x, w, k, scale, bias, bits, exact_rows):
    if x.dtype != torch.float16 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be fp16 [M, {k}], got {x.dtype} {tuple(x.shape)}")
    if w.stride(1) != 1:
        w = w.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    if bias is not None:
        bias = bias.to(torch.float16).contiguous()
    m, n = x.shape[0], w.shape[0]
    chunk_rows = prefill.chunk_rows()
    if m and (chunk_rows is not None or (m >= prefill.MIN_ROWS and not exact_rows)):
        return _on_tensor_cores(x, w, scale, bias, bits, chunk_rows)
    y = torch.empty(m, n, dtype=torch.float16, device=x.device)
    if m == 0:
        return y
    if m <= DECODE_MAX_ROWS or exact_rows:
        m_pad = min(triton.next_power_of_2(m), DECODE_MAX_ROWS)
        grid = (triton.cdiv(m, m_pad), triton.cdiv(n, GEMV_BLOCK_N))
        _gemv_kernel[grid](x, w, scale, bias, y, m, n, w.shape[1], x.stride(0), w.stride(0),
                           y.stride(0), BITS=bits, M_PAD=m_pad,
                           BLOCK_N=GEMV_BLOCK_N, BLOCK_K=gemv_block_k(bits), num_warps=GEMV_WARPS)
    else:
        grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))
        _gemm_kernel[grid](x, w, scale, bias, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                           BITS=bits, BLOCK_M=GEMM_BLOCK_M, BLOCK_N=GEMM_BLOCK_N,
                           BLOCK_K=GEMM_BLOCK_K, num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)
    return y


def gemv_block_k(bits: int) -> int:
    """Stored columns per K step of the decode kernel (GEMV_TILE_BYTES of each weight row)."""
    return GEMV_TILE_BYTES * 8 // (16 if bits == 16 else 8)


def bytes_moved(m: int, n: int, k: int, bits: int, bias: bool = False) -> int:
    """DRAM bytes one call reads and writes: the stored weights once (and scales, bias), x, y."""
    weights = n * k * bits // 8 + (2 * n if bits != 16 else 0) + (2 * n if bias else 0)
    return weights + 2 * m * k + 2 * m * n


def _specs() -> list[KernelSpec]:
    specs = []
    for bits, name in ((4, "int4"), (8, "int8"), (16, "fp16")):
        w_type = "*fp16" if bits == 16 else "*i8"
        common = {"x_ptr": "*fp16", "w_ptr": w_type, "scale_ptr": "constexpr" if bits == 16 else "*fp16",
                  "y_ptr": "*fp16", "M": "i32", "N": "i32"}
        for has_bias in (False, True):
            if bits == 16 and has_bias:
                continue  # the fp16 output layer has no bias
            bias = {"bias_ptr": "*fp16" if has_bias else "constexpr"}
            nulls = {"bias_ptr": None} if not has_bias else {}
            if bits == 16:
                nulls["scale_ptr"] = None
            tag = f"{name}{' +bias' if has_bias else ''}"
            for m_pad in (1, 2, 4, 8):
                specs.append(KernelSpec(
                    kernel=_gemv_kernel, shape_class=f"decode {tag} M<={m_pad}",
                    signature=_signature(_gemv_kernel, {**common, **bias, "K_STORED": "i32",
                                                        "stride_xm": "i32", "stride_wn": "i32",
                                                        "stride_ym": "i32"}),
                    constexprs={**nulls, "BITS": bits, "M_PAD": m_pad, "BLOCK_N": GEMV_BLOCK_N,
                                "BLOCK_K": gemv_block_k(bits)},
                    aligned=("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "N", "K_STORED",
                             "stride_xm", "stride_wn", "stride_ym"),
                    num_warps=GEMV_WARPS, no_spills=True))
            specs.append(KernelSpec(
                kernel=_gemm_kernel, shape_class=f"prefill {tag} M>{DECODE_MAX_ROWS}",
                signature=_signature(_gemm_kernel, {**common, **bias, "K": "i32", "stride_xm": "i32",
                                                    "stride_wn": "i32", "stride_ym": "i32"}),
                constexprs={**nulls, "BITS": bits, "BLOCK_M": GEMM_BLOCK_M, "BLOCK_N": GEMM_BLOCK_N,
                            "BLOCK_K": GEMM_BLOCK_K},
                aligned=("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "N", "K", "stride_xm",
                         "stride_wn", "stride_ym"),
                num_warps=GEMM_WARPS, num_stages=GEMM_STAGES))
    return specs


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """types in the kernel's argument order; every argument not named is a constexpr."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


COMPILE_SPECS = _specs()
