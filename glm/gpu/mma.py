"""The decode GEMV on the tensor cores: y = x @ (W * scale)^T + b for up to 8 rows of x with int4 /
int8 weights in THUDM's layout (glm/gpu/linear.py), one PTX mma.sync.m16n8k8 (sm_75+) per 128 weights.

Why: with fp32 multiply-adds every row costs one FFMA per weight, and a T4 sub-partition issues 16 FP32
lanes a clock, so 8 rows cap the int4 FMA GEMV at ~254 GB/s of weights (the card streams 320). An
mma takes 16 output features x 8 K columns of weights (A, fp16) and the same 8 K columns of the 8 rows
(B, fp16), and adds the fp32 products into 16 x 8 fp32 sums (D): fp16 x fp16 products are exact, the
sums stay fp32, so it is as exact as the FMA GEMV, at one instruction per 128 weights for all 8 rows.
Triton emits no mma below sm_80, so the kernel is written in Gluon (explicit register layouts) and
the mma is inline PTX over each thread's own fragment registers.

One program: 16 output features x 8 rows of x, 4 warps splitting each K step of STEP_BYTES stored
bytes per weight row. Lane = 4 * group + quad (PTX's groupID and threadID_in_group). Per K step a
thread loads THREAD_BYTES of weight row `group` and of row `group + 8` at the same columns (its
A fragments) and x row `group` at those columns (its B fragments); its D registers hold features
group / group + 8 of rows 2 * quad and 2 * quad + 1 (fragment tables below, from the PTX ISA).
An mma's 8 K columns may be any 8 columns as long as A and B agree, so each thread feeds the
mmas from its own columns in the order its dequantization yields them (`mma_columns`).
A row's sums depend on its own x column of B only, in a K order fixed by the program: a row's
result is the same alone or beside 7 others (batch invariance, as in the FMA GEMV).

The index arithmetic here is plain Python (tested against the ISA's tables without a GPU, and the PTX
with an emulator in tests/kernels/test_gpu_mma.py); the kernel is built from the same constants. The Triton
interpreter cannot run inline PTX: under TRITON_INTERPRET=1 this kernel is never selected
(linear.decode_variant), and on a device only after selftest.select_decode_gemv has compared it
with the FMA GEMV at the model's own shapes.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .compile import KernelSpec

ROWS = 8  # mma N: rows of x per program
FEATURES = 16  # mma M: output features per program
MMA_K = 8
WARPS = 4
QUADS = 4  # threads sharing one group (threadID_in_group)
THREAD_BYTES = 16  # stored bytes of each of its two weight rows a thread loads per K step (one 128-bit load)
STEP_BYTES = WARPS * QUADS * THREAD_BYTES  # stored bytes of each weight row per K step
PACK = 16  # elements of each operand one thread hands one inline-asm call (one K step)
CHAINS = 4  # independent accumulator sets per thread (4 fp32 each), summed after the K loop


# --- PTX ISA, "Matrix fragments for mma.m16n8k8" (.f16 A / B, .f32 C / D) ------------------------

def a_fragment(lane: int) -> list[tuple[int, int]]:
    """(row m, column k) of A in a0..a3 of `lane`."""
    group, quad = divmod(lane, QUADS)
    return [(group + 8 * (i >= 2), 2 * quad + (i & 1)) for i in range(4)]


def b_fragment(lane: int) -> list[tuple[int, int]]:
    """(row k, column n) of B in b0, b1 of `lane`."""
    group, quad = divmod(lane, QUADS)
    return [(2 * quad + i, group) for i in range(2)]


def d_fragment(lane: int) -> list[tuple[int, int]]:
    """(row m, column n) of C / D in c0..c3 of `lane`."""
    group, quad = divmod(lane, QUADS)
    return [(group + 8 * (i >= 2), 2 * quad + (i & 1)) for i in range(4)]


# --- which element of which tensor a thread holds --------------------------------------------------

def thread_element(index: int) -> dict[str, int]:
    """Element `index` of the kernel's per-program operand tensors (PACK consecutive elements per
    thread, 32 threads per warp): its warp, lane, group, quad and register (0..PACK-1)."""
    warp, rest = divmod(index, 32 * PACK)
    lane, reg = divmod(rest, PACK)
    return {"warp": warp, "lane": lane, "group": lane // QUADS, "quad": lane % QUADS, "reg": reg}


def weight_element(index: int) -> tuple[int, int]:
    """(feature in the program's 16, int16 unit of the weight row within the K step) the kernel loads
    into element `index`: registers 0-7 row `group`, 8-15 row `group + 8`, THREAD_BYTES each."""
    e = thread_element(index)
    half, unit = divmod(e["reg"], THREAD_BYTES // 2)
    return e["group"] + 8 * half, (e["warp"] * QUADS + e["quad"]) * (THREAD_BYTES // 2) + unit


def x_element(index: int, bits: int) -> tuple[int, int]:
    """(row of x in the program's 8, unit of x within the K step) in element `index`: int4 units are
    int32 (2 columns), int8 units int16 (1 column); either way unit = stored weight byte."""
    e = thread_element(index)
    return e["group"], (e["warp"] * QUADS + e["quad"]) * THREAD_BYTES + e["reg"]


def mma_columns(bits: int) -> list[tuple[int, int, int, int]]:
    """The mmas of one K step of a thread, in issue order: (weight word 0-3 of its THREAD_BYTES, chain,
    column of k = 2 * quad, column of k = 2 * quad + 1), columns relative to the thread's first
    column of the step. THUDM int4: byte j of a word holds column 2j in its high nibble and 2j + 1
    in its low one; the magic-number unpacking yields nibbles two bytes apart as one fp16 pair."""
    out = []
    for word in range(4):
        if bits == 4:  # pairs from (word, mask 0x000f000f), (word, 0x00f000f0), (word >> 8, ...), ...
            base = 8 * word
            pairs = ((1, 5), (0, 4), (3, 7), (2, 6))
        else:  # int8: bytes (0, 1) and (2, 3) of the word, consecutive columns
            base = 4 * word
            pairs = ((0, 1), (2, 3))
        out += [(word, word, base + k0, base + k1) for k0, k1 in pairs]
    return out


# --- the inline PTX of one K step ----------------------------------------------------------------

_MMA = "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32"
# lop3 (a & b) ^ c; the fp16 constants 1032 (0x6408), 1/16 (0x2c00), -72 (0xd480), 1152 (0x6480).
_AND_XOR = "0x6a"


def step_asm(bits: int) -> str:
    """PTX for one K step of one thread: operands $0-15 D (= C, tied), $16-23 weights (words 0-3 of row
    `group`, then of row `group + 8`), $24.. x (int4: 16 registers of fp16 pairs, int8: 8)."""
    acc = [", ".join(f"${4 * c + i}" for i in range(4)) for c in range(CHAINS)]
    lines = ["{", ".reg .b32 s, t, lg, hg, lh, hh, lg1, hg1, lh1, hh1, b0, b1, b2, b3, c0, c1, c2;"]
    if bits == 4:
        lines += ["mov.b32 c0, 0x64086408;", "mov.b32 c1, 0x2c002c00;", "mov.b32 c2, 0xd480d480;"]
    else:
        lines += ["mov.b32 c0, 0x64806480;", "mov.b32 c1, 0x64646464;"]
    columns = mma_columns(bits)
    for word in range(4):
        wg, wh = f"${16 + word}", f"${20 + word}"
        if bits == 4:
            x = [f"${24 + 4 * word + i}" for i in range(4)]
            # 1024 + biased nibble (low nibbles) or 1024 + 16 x biased nibble (high): exact in fp16;
            # minus 1032, or x 1/16 - 72, leaves the signed nibble.
            lines += [f"lop3.b32 lg, {wg}, 0x000f000f, 0x64086408, {_AND_XOR};",
                      f"lop3.b32 hg, {wg}, 0x00f000f0, 0x64806480, {_AND_XOR};",
                      f"lop3.b32 lh, {wh}, 0x000f000f, 0x64086408, {_AND_XOR};",
                      f"lop3.b32 hh, {wh}, 0x00f000f0, 0x64806480, {_AND_XOR};",
                      f"shr.b32 s, {wg}, 8;", f"shr.b32 t, {wh}, 8;",
                      f"lop3.b32 lg1, s, 0x000f000f, 0x64086408, {_AND_XOR};",
                      f"lop3.b32 hg1, s, 0x00f000f0, 0x64806480, {_AND_XOR};",
                      f"lop3.b32 lh1, t, 0x000f000f, 0x64086408, {_AND_XOR};",
                      f"lop3.b32 hh1, t, 0x00f000f0, 0x64806480, {_AND_XOR};",
                      "sub.f16x2 lg, lg, c0;", "sub.f16x2 lh, lh, c0;",
                      "sub.f16x2 lg1, lg1, c0;", "sub.f16x2 lh1, lh1, c0;",
                      "fma.rn.f16x2 hg, hg, c1, c2;", "fma.rn.f16x2 hh, hh, c1, c2;",
                      "fma.rn.f16x2 hg1, hg1, c1, c2;", "fma.rn.f16x2 hh1, hh1, c1, c2;"]
            a = ("lg, lh", "hg, hh", "lg1, lh1", "hg1, hh1")
        else:
            x = [f"${24 + 2 * word + i}" for i in range(2)]
            # Each byte xor 0x80 under 0x64 is the fp16 1024 + (byte + 128): minus 1152 leaves the byte.
            lines += [f"xor.b32 s, {wg}, 0x80808080;", f"xor.b32 t, {wh}, 0x80808080;",
                      "prmt.b32 lg, s, c1, 0x4140;", "prmt.b32 hg, s, c1, 0x4342;",
                      "prmt.b32 lh, t, c1, 0x4140;", "prmt.b32 hh, t, c1, 0x4342;",
                      "sub.f16x2 lg, lg, c0;", "sub.f16x2 hg, hg, c0;",
                      "sub.f16x2 lh, lh, c0;", "sub.f16x2 hh, hh, c0;"]
            a = ("lg, lh", "hg, hh")
        base = (8 if bits == 4 else 4) * word  # the word's first column
        for i, (_, chain, k0, k1) in enumerate(c for c in columns if c[0] == word):
            lines.append(_b_pair(x, k0 - base, k1 - base, f"b{i}"))
            lines.append(f"{_MMA} {{{acc[chain]}}}, {{{a[i]}}}, {{b{i}}}, {{{acc[chain]}}};")
    lines.append("}")
    return "\n".join(lines)


def _b_pair(x: list[str], k0: int, k1: int, out: str) -> str:
    """The instruction putting x columns k0, k1 (relative to the word's first column; x[j] holds
    columns 2j, 2j + 1) into one fp16 pair: a move when they are one register, else one prmt."""
    if k1 == k0 + 1 and k0 % 2 == 0:
        return f"mov.b32 {out}, {x[k0 // 2]};"
    (r0, h0), (r1, h1) = divmod(k0, 2), divmod(k1, 2)
    if r1 - r0 != 2 or h0 != h1:
        raise ValueError(f"no prmt for columns {k0}, {k1}")
    # prmt a, b: bytes 0-3 of a then 4-7 of b; a = x[r0], b = x[r0 + 2].
    lo = 2 * h0
    return f"prmt.b32 {out}, {x[r0]}, {x[r1]}, 0x{lo + 5:x}{lo + 4:x}{lo + 1:x}{lo:x};"


def step_constraints(bits: int) -> str:
    x_regs = PACK if bits == 4 else PACK // 2
    return ",".join(["=f"] * PACK + ["r"] * (PACK // 2) + ["r"] * x_regs + [str(i) for i in range(PACK)])


# The module's constants as the kernel reads them (a Gluon kernel sees only constexpr globals).
_ROWS, _FEATURES, _WARPS, _QUADS, _THREAD_BYTES, _STEP_BYTES, _PACK, _CHAINS = map(
    gl.constexpr, (ROWS, FEATURES, WARPS, QUADS, THREAD_BYTES, STEP_BYTES, PACK, CHAINS))
_ASM4 = gl.constexpr(step_asm(4))
_ASM8 = gl.constexpr(step_asm(8))
_CONSTRAINTS4 = gl.constexpr(step_constraints(4))
_CONSTRAINTS8 = gl.constexpr(step_constraints(8))


@gluon.jit
def _mma_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K_STORED, stride_xm, stride_wn,
                     stride_ym, BITS: gl.constexpr):
    """y[8-row block, 16-feature block]; K_STORED = stored bytes of a weight row (a multiple of 16)."""
    L: gl.constexpr = gl.BlockedLayout([_PACK], [32], [_WARPS], [0])
    ASM: gl.constexpr = _ASM4 if BITS == 4 else _ASM8
    CONSTRAINTS: gl.constexpr = _CONSTRAINTS4 if BITS == 4 else _CONSTRAINTS8
    i = gl.arange(0, _WARPS * 32 * _PACK, layout=L)
    lane = (i // _PACK) % 32
    group = lane // _QUADS
    reg = i % _PACK
    thread_unit = (i // (32 * _PACK) * _QUADS + lane % _QUADS) * _THREAD_BYTES  # first byte of the thread
    feature = gl.program_id(1) * _FEATURES + group + 8 * (reg // (_THREAD_BYTES // 2))
    # Rows past M read row M - 1 (never stored): no mask in the loop.
    row = gl.minimum(gl.program_id(0) * _ROWS + group, M - 1)
    w_units = w_ptr.to(gl.pointer_type(gl.int16))
    w_unit = thread_unit // 2 + reg % (_THREAD_BYTES // 2)
    w_off = gl.max_contiguous(gl.multiple_of(feature * (stride_wn // 2) + w_unit, 8), 8)
    if BITS == 4:
        x_units = x_ptr.to(gl.pointer_type(gl.int32))
        x_row = stride_xm // 2
        X_VEC: gl.constexpr = 4
    else:
        x_units = x_ptr.to(gl.pointer_type(gl.int16))
        x_row = stride_xm
        X_VEC: gl.constexpr = 8
    x_unit = thread_unit + reg
    x_off = gl.max_contiguous(gl.multiple_of(row * x_row + x_unit, X_VEC), _PACK)
    acc = gl.full([_WARPS * 32 * _PACK], 0.0, gl.float32, layout=L)
    k_full = K_STORED - K_STORED % _STEP_BYTES
    for k in range(0, k_full, _STEP_BYTES):
        w = gl.load(w_units + (w_off + k // 2))
        x = gl.load(x_units + (x_off + k))
        acc = gl.inline_asm_elementwise(ASM, CONSTRAINTS, [w, x, acc], dtype=gl.float32, is_pure=True,
                                        pack=_PACK)
    if k_full < K_STORED:  # the last, partial step: columns past the row are zeros
        w = gl.load(w_units + (w_off + k_full // 2), mask=k_full + 2 * w_unit < K_STORED, other=0)
        x = gl.load(x_units + (x_off + k_full), mask=k_full + x_unit < K_STORED, other=0)
        acc = gl.inline_asm_elementwise(ASM, CONSTRAINTS, [w, x, acc], dtype=gl.float32, is_pure=True,
                                        pack=_PACK)
    # [warp, lane, chain, D register]: the chains, then the warps, summed in a fixed order.
    acc = gl.sum(gl.sum(gl.reshape(acc, [_WARPS, 32, _CHAINS, 4]), axis=2), axis=0)
    D: gl.constexpr = acc.type.layout
    lanes = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(1, D)), 1)
    regs = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, D)), 0)
    features = gl.program_id(1) * _FEATURES + lanes // _QUADS + 8 * (regs // 2)  # d_fragment
    rows = gl.program_id(0) * _ROWS + 2 * (lanes % _QUADS) + regs % 2
    n_ok = features < N
    y = acc * gl.load(scale_ptr + features, mask=n_ok, other=0.0).to(gl.float32)
    if bias_ptr is not None:
        y = y + gl.load(bias_ptr + features, mask=n_ok, other=0.0).to(gl.float32)
    gl.store(y_ptr + rows * stride_ym + features, y.to(gl.float16), mask=n_ok & (rows < M))


def takes(w: torch.Tensor, bits: int) -> bool:
    """Whether this kernel takes these weights as they are: int4 / int8 on a device of sm_75 or later,
    whole 16-feature blocks, rows of 16-byte multiples starting 16-byte aligned. A property of the
    linear, never of the rows: all of its rows, alone or batched, run the same kernel."""
    return (bits in (4, 8) and w.is_cuda and torch.cuda.get_device_capability(w.device) >= (7, 5)
            and w.shape[0] % FEATURES == 0 and w.shape[1] % 16 == 0 and w.stride(0) % 16 == 0
            and w.stride(1) == 1 and w.data_ptr() % 16 == 0)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         y: torch.Tensor, bits: int) -> None:
    """y = x @ (w * scale)^T + bias for any number of rows (blocks of 8), weights as `takes` says."""
    if x.stride(0) % 8 or x.data_ptr() % 16:  # 16-byte loads of x
        x = x.clone(memory_format=torch.contiguous_format)
    m, n = y.shape
    grid = (triton.cdiv(m, ROWS), n // FEATURES)
    _mma_gemv_kernel[grid](x, w, scale, bias, y, m, n, w.shape[1], x.stride(0), w.stride(0), y.stride(0),
                           BITS=bits, num_warps=WARPS)


def _specs() -> list[KernelSpec]:
    specs = []
    for bits in (4, 8):
        for has_bias in (False, True):
            signature = {name: "constexpr" for name in _mma_gemv_kernel.arg_names}
            signature.update(x_ptr="*fp16", w_ptr="*i8", scale_ptr="*fp16", y_ptr="*fp16", M="i32",
                             N="i32", K_STORED="i32", stride_xm="i32", stride_wn="i32", stride_ym="i32")
            if has_bias:
                signature["bias_ptr"] = "*fp16"
            specs.append(KernelSpec(
                kernel=_mma_gemv_kernel, shape_class=f"decode mma int{bits}{' +bias' if has_bias else ''} M<=8",
                signature=signature, constexprs={"BITS": bits, **({} if has_bias else {"bias_ptr": None})},
                aligned=("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "N", "K_STORED", "stride_xm",
                         "stride_wn", "stride_ym"),
                num_warps=WARPS, no_spills=True))
    return specs


COMPILE_SPECS = _specs()
