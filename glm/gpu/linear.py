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

from . import interpreting, prefill
from .compile import KernelSpec

# Rows the decode GEMV takes per call: the engine's decode batch. More rows go to the GEMM.
DECODE_MAX_ROWS = 8

# Decode: output rows per program, and stored bytes of a weight row per K step (so an int4, an
# int8 and an fp16 tile are all BLOCK_N x 128 bytes: 16 bytes per thread per step, one 128-bit load).
GEMV_BLOCK_N = 16
GEMV_TILE_BYTES = 128
GEMV_THREAD_BYTES = 16
GEMV_WARPS = 4
# From this many rows per program the launcher hands the GEMV fp32 activations: fp16 ones are
# converted in every thread that reads them, which at 4 and 8 rows costs as much FP32-pipe issue
# as the multiply-adds (see bench/gpu_decode_bound.py).
GEMV_FP32_X_ROWS = 4

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
                 BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """y[m-block, n-block], M_PAD rows per m-block; K_STORED = stored columns of w (K/2 for int4).

    A thread owns VEC consecutive stored columns of one weight row per K step ([BLOCK_N, BLOCK_K //
    VEC, VEC] tile) and keeps one fp32 partial sum per (x row, weight row) across the whole K loop;
    the threads of a weight row are summed once, after the loop. x may be fp16 or fp32 (the same
    values: the launcher passes fp32 when many rows would each convert it in every thread).
    The m-blocks of one n-block are neighbours in launch order: its weight slab is read from DRAM
    once and from L2 by the rest."""
    row0 = tl.program_id(0) * M_PAD
    x_ptr += row0 * stride_xm
    y_ptr += row0 * stride_ym
    M -= row0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    T: tl.constexpr = BLOCK_K // VEC
    PER_BYTE: tl.constexpr = 2 if BITS == 4 else 1
    cols = tl.arange(0, T)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # stored columns, [T, VEC]
    x_cols = tl.arange(0, T)[:, None] * (VEC * PER_BYTE) + tl.arange(0, VEC * PER_BYTE)[None, :]
    w_rows = w_ptr + offs_n[:, None, None] * stride_wn
    # One named accumulator per row (rows past M_PAD are compiled out): a row's sums never pass
    # through a select or another row's registers.
    a0 = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    # The next K step's weights are loaded before this one's arithmetic (no cp.async on sm_75).
    w_next = _load_tile(w_rows, cols, n_ok, 0, K_STORED)
    for k0 in range(0, K_STORED, BLOCK_K):
        w = _dequantize(w_next, BITS, BLOCK_N, T, VEC * PER_BYTE)
        w_next = _load_tile(w_rows, cols, n_ok, k0 + BLOCK_K, K_STORED)
        xk = k0 * PER_BYTE + x_cols
        x_ok = xk < K_STORED * PER_BYTE
        a0 += _row_partial(x_ptr, 0, M, stride_xm, xk, x_ok, w)
        if M_PAD > 1:
            a1 += _row_partial(x_ptr, 1, M, stride_xm, xk, x_ok, w)
        if M_PAD > 2:
            a2 += _row_partial(x_ptr, 2, M, stride_xm, xk, x_ok, w)
            a3 += _row_partial(x_ptr, 3, M, stride_xm, xk, x_ok, w)
        if M_PAD > 4:
            a4 += _row_partial(x_ptr, 4, M, stride_xm, xk, x_ok, w)
            a5 += _row_partial(x_ptr, 5, M, stride_xm, xk, x_ok, w)
            a6 += _row_partial(x_ptr, 6, M, stride_xm, xk, x_ok, w)
            a7 += _row_partial(x_ptr, 7, M, stride_xm, xk, x_ok, w)
    _store_row(a0, 0, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
    if M_PAD > 1:
        _store_row(a1, 1, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
    if M_PAD > 2:
        _store_row(a2, 2, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
        _store_row(a3, 3, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
    if M_PAD > 4:
        _store_row(a4, 4, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
        _store_row(a5, 5, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
        _store_row(a6, 6, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)
        _store_row(a7, 7, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS)


@triton.jit
def _load_tile(w_rows, cols, n_ok, k0, K_STORED):
    k = k0 + cols
    return tl.load(w_rows + k[None, :, :], mask=n_ok[:, None, None] & (k < K_STORED)[None, :, :], other=0)


@triton.jit
def _dequantize(w, BITS: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, COLS: tl.constexpr):
    """Stored weights -> exact fp32 values, [BLOCK_N, T, COLS] (int4: column 2j from byte j's high
    nibble, 2j+1 from its low nibble). No int-to-float conversion: the biased code (two's complement
    xor the sign bit: 0..15 or 0..255) is OR-ed into the mantissa of 2^23, which makes the float
    2^23 + code exactly, and one subtraction of 2^23 + bias leaves the signed value."""
    if BITS == 16:
        out = w.to(tl.float32)
    elif BITS == 8:
        u = w.to(tl.uint8, bitcast=True)
        out = ((u ^ 0x80).to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        u = w.to(tl.uint8, bitcast=True)
        hi = (((u >> 4) ^ 8).to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        lo = (((u & 15) ^ 8).to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        out = tl.reshape(tl.join(hi, lo), (BLOCK_N, T, COLS))
    return out


@triton.jit
def _row_partial(x_ptr, m, M, stride_xm, xk, x_ok, w):
    """Row m's products with this K step's weights, summed over each thread's own columns only."""
    x = tl.load(x_ptr + m * stride_xm + xk, mask=x_ok & (m < M), other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :, :], axis=2)


@triton.jit
def _store_row(acc, m, M, offs_n, N, scale_ptr, bias_ptr, y_ptr, stride_ym, BITS: tl.constexpr):
    """y[m] = (sum of the row's partial sums) * scale + bias, rounded once to fp16."""
    n_ok = offs_n < N
    y = tl.sum(acc, axis=1)
    if BITS != 16:
        y = y * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if bias_ptr is not None:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(tl.float16), mask=n_ok & (m < M))


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
        _gemv(x, w, scale, bias, y, bits)
    else:
        grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))
        _gemm_kernel[grid](x, w, scale, bias, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                           BITS=bits, BLOCK_M=GEMM_BLOCK_M, BLOCK_N=GEMM_BLOCK_N,
                           BLOCK_K=GEMM_BLOCK_K, num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)
    return y


def decode_variant() -> str:
    """The decode GEMV every decode and exact row runs: "fma" (_gemv_kernel) or "mma" (glm.gpu.mma)."""
    return _decode["variant"]


def set_decode_variant(variant: str) -> None:
    """Choose the decode GEMV for the process (selftest.select_decode_gemv does, before the engine
    warms up and captures its graphs; one variant for all rows keeps a row's bits batch-invariant)."""
    if variant not in ("fma", "mma"):
        raise ValueError(f"decode GEMV variant must be 'fma' or 'mma', got {variant!r}")
    if variant == "mma" and interpreting():
        raise RuntimeError("the Triton interpreter cannot run the mma GEMV's inline PTX")
    _decode["variant"] = variant


_decode = {"variant": "fma"}


def _gemv(x, w, scale, bias, y, bits):
    if _decode["variant"] == "mma" and bits != 16:
        from . import mma
        if mma.takes(w, bits):
            return mma.gemv(x, w, scale, bias, y, bits)
    m, n = y.shape
    m_pad = gemv_rows_per_program(m)
    if m_pad >= GEMV_FP32_X_ROWS:
        x = x.float()
    grid = (triton.cdiv(m, m_pad), triton.cdiv(n, GEMV_BLOCK_N))
    _gemv_kernel[grid](x, w, scale, bias, y, m, n, w.shape[1], x.stride(0), w.stride(0), y.stride(0),
                       BITS=bits, M_PAD=m_pad, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=gemv_block_k(bits),
                       VEC=gemv_vec(bits), num_warps=GEMV_WARPS)


def gemv_rows_per_program(m: int) -> int:
    """M_PAD of the GEMV for m rows: the next power of two up to DECODE_MAX_ROWS."""
    return min(triton.next_power_of_2(m), DECODE_MAX_ROWS)


def gemv_vec(bits: int) -> int:
    """Stored columns one thread owns per K step (GEMV_THREAD_BYTES of a weight row)."""
    return GEMV_THREAD_BYTES * 8 // (16 if bits == 16 else 8)


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
        common = {"w_ptr": w_type, "scale_ptr": "constexpr" if bits == 16 else "*fp16",
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
                                                        "x_ptr": _gemv_x_type(m_pad),
                                                        "stride_xm": "i32", "stride_wn": "i32",
                                                        "stride_ym": "i32"}),
                    constexprs={**nulls, "BITS": bits, "M_PAD": m_pad, "BLOCK_N": GEMV_BLOCK_N,
                                "BLOCK_K": gemv_block_k(bits), "VEC": gemv_vec(bits)},
                    aligned=("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "N", "K_STORED",
                             "stride_xm", "stride_wn", "stride_ym"),
                    num_warps=GEMV_WARPS, no_spills=True))
            specs.append(KernelSpec(
                kernel=_gemm_kernel, shape_class=f"prefill {tag} M>{DECODE_MAX_ROWS}",
                signature=_signature(_gemm_kernel, {**common, **bias, "x_ptr": "*fp16", "K": "i32",
                                                    "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}),
                constexprs={**nulls, "BITS": bits, "BLOCK_M": GEMM_BLOCK_M, "BLOCK_N": GEMM_BLOCK_N,
                            "BLOCK_K": GEMM_BLOCK_K},
                aligned=("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "N", "K", "stride_xm",
                         "stride_wn", "stride_ym"),
                num_warps=GEMM_WARPS, num_stages=GEMM_STAGES))
    return specs


def _gemv_x_type(m_pad: int) -> str:
    return "*fp32" if m_pad >= GEMV_FP32_X_ROWS else "*fp16"


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """types in the kernel's argument order; every argument not named is a constexpr."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


COMPILE_SPECS = _specs()
