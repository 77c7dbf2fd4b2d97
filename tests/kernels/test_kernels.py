"""Tests of the fused CPU kernels (glm/cpu/csrc/linear.cpp and tiles.cpp via glm.cpu.kernels).

The reference is written independently here: nibbles are unpacked with plain torch integer ops
following FORMATS.md sections 2-4 (high nibble -> column 2j, low nibble -> column 2j+1, both
signed), then y = x.float() @ (q.float() * scale.float()[:, None]).T + bias in fp32.

Tolerances:
  fp32 x: |y - ref| <= 1e-5 * max|ref|   (rtol 1e-5 relative to the output's magnitude)
  bf16 x: ref computed from the bf16-rounded x; |y - ref| <= 2**-7 * |ref| + 1e-5 * max|ref|
          (the output is rounded to bf16: <= 2**-9 relative, plus summation-order slack)
Every available ISA path (scalar, avx2, avx512, avx512bf16 up to what the CPU has) is tested.

Batch invariance (test_batch_invariant): besides being accurate, every output row must be
BITWISE identical to the same x row computed alone (M = 1), for every batch size, position,
neighbours and thread count (the engine batches concurrent requests' decode steps).
"""

import logging
import shutil

import pytest
import torch

from conftest import ISAS
from glm.cpu import kernels

# ---------------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------------


def quantize(w: torch.Tensor, bits: int, scale_dtype=torch.float16):
    """THUDM's recipe: per-row absmax / (2**(bits-1)-1), round, int8; int4 packed hi/lo."""
    scale = (w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).to(torch.int16)
    if bits == 8:
        return q.to(torch.int8), scale
    packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)) & 0xFF
    return packed.to(torch.uint8).view(torch.int8), scale


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int values [N, K] (int16) from THUDM's int8 / packed int4 layout."""
    b = qweight.to(torch.int16)  # sign-extended byte
    if bits == 8:
        return b
    hi = b >> 4  # arithmetic shift: signed high nibble
    lo = ((b & 0xF) ^ 8) - 8  # signed low nibble
    return torch.stack([hi, lo], dim=-1).reshape(qweight.shape[0], -1)


def reference(x, wq, scale, bias, bits):
    w = wq.float() if bits is None else unpack(wq, bits).float() * scale.float()[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y


def check(y, x, ref):
    assert y.dtype == x.dtype
    assert y.shape == ref.shape
    y = y.float()
    mag = ref.abs().max().item() if ref.numel() else 0.0
    if x.dtype == torch.float32:
        tol = 1e-5 * mag + 1e-30
        err = (y - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= tol, f"max abs err {err:.3g} > {tol:.3g} (max|ref| {mag:.3g})"
    else:
        bound = 2.0**-7 * ref.abs() + 1e-5 * mag + 1e-30
        bad = (y - ref).abs() > bound
        assert not bad.any(), f"{int(bad.sum())} elements outside bf16 tolerance (max|ref| {mag:.3g})"


SHAPES = [(5, 64), (70, 96), (37, 4096), (19, 13696), (33, 30)]  # (N, K); N not a multiple of 16
MS = [1, 2, 3, 5, 8, 17, 64]


def make_case(N, K, bits, seed, scale_dtype=torch.float16, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    q, scale = quantize(w, bits, scale_dtype)
    bias = (torch.randn(N, generator=g) * 0.1).half() if with_bias else None
    return q, scale, bias, g


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear(mod, isa, bits, N, K, M, xdtype):
    q, scale, bias, g = make_case(N, K, bits, seed=N * 1000 + K + M)
    x = torch.randn(M, K, generator=g).to(xdtype)
    fn = mod.int4_linear if bits == 4 else mod.int8_linear
    check(fn(x, q, scale, bias), x, reference(x, q, scale, bias, bits))
    check(fn(x, q, scale, None), x, reference(x, q, scale, None, bits))


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K", SHAPES + [(23, 97)])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
def test_half_linear(mod, isa, wdtype, N, K, M, xdtype):
    g = torch.Generator().manual_seed(N * 1000 + K + M)
    w = (torch.randn(N, K, generator=g) * 0.02).to(wdtype)
    bias = (torch.randn(N, generator=g) * 0.1).half()
    x = torch.randn(M, K, generator=g).to(xdtype)
    check(mod.half_linear(x, w, bias), x, reference(x, w, None, bias, None))
    check(mod.half_linear(x, w, None), x, reference(x, w, None, None, None))


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("K", [97, 4096])
def test_int8_odd_k(mod, isa, M, K):
    q, scale, bias, g = make_case(21, K, 8, seed=K + M)
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(M, K, generator=g).to(xdtype)
        check(mod.int8_linear(x, q, scale, bias), x, reference(x, q, scale, bias, 8))


@pytest.mark.parametrize("bits", [4, 8])
def test_all_byte_values(mod, isa, bits):
    """Every byte value (so every nibble incl. -8) appears; scales of every dtype accepted."""
    N, K = 256, 512
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-128, 128, (N, K // 2 if bits == 4 else K), generator=g, dtype=torch.int8)
    q[:, 0] = torch.arange(-128, 128, dtype=torch.int8)
    x = torch.randn(4, K, generator=g)
    for sdt in (torch.float16, torch.bfloat16, torch.float32):
        scale = (torch.rand(N, generator=g) * 0.01 + 1e-3).to(sdt)
        fn = mod.int4_linear if bits == 4 else mod.int8_linear
        for xdtype in (torch.float32, torch.bfloat16):
            xx = x.to(xdtype)
            check(fn(xx, q, scale, None), xx, reference(xx, q, scale, None, bits))


def test_threads_agree(mod):
    """Result does not depend on the thread count (rows are split, never k)."""
    q, scale, bias, g = make_case(4608, 4096, 4, seed=1)
    x = torch.randn(3, 4096, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = mod.int4_linear(x, q, scale, bias)
        torch.set_num_threads(max(2, old))
        y2 = mod.int4_linear(x, q, scale, bias)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)


# ---------------------------------------------------------------------------------------------
# batch invariance: a row's output depends only on that row of x (and the weights), bitwise,
# whatever the batch size, the row's position, its neighbours and the thread count. The engine
# batches the decode step of concurrent requests; a request's logits (hence sampled tokens) must
# not depend on what else runs beside it. Checked on every ISA path the CPU has (the path is fixed
# per process, so each one must be invariant on its own).
# ---------------------------------------------------------------------------------------------

BI_ROWS = 19
# (N, K): a realistic layer (qkv) and an odd one (N not a multiple of any tile height, K with
# tails in every lane layout; even for int4)
BI_SHAPES = [(4608, 4096), (37, 226)]


def _bi_case(fmt, N, K, g):
    """(function, weight args) for one weight format with random weights."""
    bias = (torch.randn(N, generator=g) * 0.1).half()
    if fmt in ("int4", "int8"):
        q = torch.randint(-128, 128, (N, K // 2 if fmt == "int4" else K), generator=g, dtype=torch.int8)
        scale = (torch.rand(N, generator=g) * 0.01 + 1e-3).half()
        return fmt, (q, scale, bias)
    w = (torch.randn(N, K, generator=g) * 0.02).to(torch.float16 if fmt == "fp16" else torch.bfloat16)
    return fmt, (w, bias)


def _bi_call(mod, fmt, x, args):
    if fmt == "int4":
        return mod.int4_linear(x, *args)
    if fmt == "int8":
        return mod.int8_linear(x, *args)
    return mod.half_linear(x, *args)


def _rows_differing(a, b):
    return [i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])]


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", BI_SHAPES)
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp16", "bf16"])
def test_batch_invariant(mod, isa, fmt, N, K, xdtype):
    g = torch.Generator().manual_seed(N * 7 + K)
    args = _bi_case(fmt, N, K, g)[1]
    x = torch.randn(BI_ROWS, K, generator=g).to(xdtype)
    other = (torch.randn(BI_ROWS, K, generator=g) * 3).to(xdtype)  # different neighbours
    realistic = N * K > 1 << 20
    # every batch size for the small shape; for the big one the sizes around each tile boundary
    sizes = [2, 3, 4, 5, 7, 8, 9, 12, 16, 17, BI_ROWS] if realistic else list(range(2, BI_ROWS + 1))
    perms = [torch.randperm(BI_ROWS, generator=g) for _ in range(2)]
    old = torch.get_num_threads()
    ref1 = None
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            # each row alone (M = 1) is the reference
            solo = torch.cat([_bi_call(mod, fmt, x[i : i + 1], args) for i in range(BI_ROWS)])
            if ref1 is None:
                ref1 = solo
            else:
                bad = _rows_differing(solo, ref1)
                assert not bad, f"{threads} threads: M=1 rows {bad} differ from 1 thread"
            for M in sizes:  # prefixes x[:M]
                y = _bi_call(mod, fmt, x[:M], args)
                bad = _rows_differing(y, ref1[:M])
                assert not bad, f"{threads} threads, M={M}: rows {bad} differ from their M=1 result"
            for p in perms:  # shuffled order: every row at another position / tile slot
                y = _bi_call(mod, fmt, x[p], args)
                bad = _rows_differing(y, ref1[p])
                assert not bad, f"{threads} threads, shuffled M={BI_ROWS}: rows {bad} differ"
            for i in (0, 5, BI_ROWS - 1):  # row i between other neighbours, at other positions
                for pos in (0, 3, 9):
                    xx = torch.cat([other[:pos], x[i : i + 1], other[pos + 1 :]])
                    y = _bi_call(mod, fmt, xx, args)
                    assert torch.equal(y[pos], ref1[i]), (
                        f"{threads} threads: row {i} at position {pos} among other rows differs")
    finally:
        torch.set_num_threads(old)


def test_empty_and_edge(mod):
    q, scale, bias, _ = make_case(7, 64, 4, seed=3)
    y = mod.int4_linear(torch.zeros(0, 64), q, scale, bias)
    assert y.shape == (0, 7)


def test_input_validation(mod):
    q, scale, bias, _ = make_case(8, 64, 4, seed=2)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="int8"):
        mod.int4_linear(x, q.to(torch.int16), scale, bias)
    with pytest.raises(RuntimeError, match=r"\[N, 32\]"):
        mod.int4_linear(torch.randn(2, 64), q[:, :16].contiguous(), scale, bias)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        mod.int4_linear(x.half(), q, scale, bias)
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.int4_linear(torch.randn(64, 2).T, q, scale, bias)
    with pytest.raises(RuntimeError, match="scale"):
        mod.int4_linear(x, q, scale[:4], bias)
    with pytest.raises(RuntimeError, match="bias"):
        mod.int4_linear(x, q, scale, bias[:3])
    with pytest.raises(RuntimeError, match="2-D"):
        mod.int4_linear(x[0], q, scale, bias)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        mod.half_linear(x, torch.randn(8, 64), None)
    with pytest.raises(RuntimeError, match="unknown ISA"):
        mod.set_isa("sse9")


def _compiler():
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on this machine")
def test_extension_builds():
    """With a compiler present the extension MUST build (a broken build fails here, not skips)."""
    m = kernels.load()  # raises on failure, unlike get()
    assert m.max_isa() in ISAS
    y = m.int8_linear(torch.ones(1, 4), torch.ones(2, 4, dtype=torch.int8), torch.ones(2), None)
    assert torch.equal(y, torch.full((1, 2), 4.0))


def test_no_kernels_env(monkeypatch):
    monkeypatch.setenv("GLM_NO_KERNELS", "1")
    assert kernels.get() is None


def test_build_failure_falls_back(monkeypatch, caplog):
    monkeypatch.delenv("GLM_NO_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_error", None)

    def boom(*a, **k):
        raise RuntimeError("Error building extension 'glm_cpu_kernels'\ncompiler not found")

    monkeypatch.setattr(kernels, "load", boom)
    with caplog.at_level(logging.WARNING, logger="glm"):
        assert kernels.get() is None
        assert kernels.get() is None  # tried once, warned once
    msgs = [r.getMessage() for r in caplog.records if r.name == "glm"]
    assert len(msgs) == 1 and "compiler not found" in msgs[0]


# ---------------------------------------------------------------------------------------------
# opt-in int8 activations (int4_linear_i8): exact integer arithmetic, so checked bitwise
# ---------------------------------------------------------------------------------------------


def i8_reference(x, qweight, scale, bias):
    """Rows of x quantized to int8 (max|x|/127, round half to even), dotted with the int4 values in
    int64, then float(sum) * x_scale * w_scale + bias: the kernel's operations, so equal bitwise."""
    amax = x.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.round(x / s).to(torch.int64)
    acc = xq @ unpack(qweight, 4).to(torch.int64).t()
    y = acc.float() * s * scale.float()
    return y if bias is None else y + bias.float()


# K/2 = 2048, 100, 6848 (= 107 x 64), 65: full 64-byte steps and masked tails
I8_SHAPES = [(37, 4096), (9, 200), (19, 13696), (6, 130)]


@pytest.mark.parametrize("M", [1, 3, 4, 8, 37])
@pytest.mark.parametrize("N,K", I8_SHAPES)
def test_int8_activations_exact(mod, isa, N, K, M):
    q, scale, bias, g = make_case(N, K, 4, seed=N * 1000 + K + M)
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 25  # an outlier channel sets the row scale
    x[M // 2] = 0  # an all-zero row (scale 1, output = bias)
    if M > 2:  # scale exactly 1 and many exact .5 ties: round half to even, not away from zero
        x[M - 1] = (torch.arange(K) % 9 - 4) + 0.5
        x[M - 1, 0] = 127
    for b in (bias, None):
        y = mod.int4_linear_i8(x, q, scale, b)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert torch.equal(y, i8_reference(x, q, scale, b))
    # Rows computed alone give the same bits (batch invariance for the engine).
    for m in range(M):
        assert torch.equal(mod.int4_linear_i8(x[m:m + 1].contiguous(), q, scale, bias)[0],
                           mod.int4_linear_i8(x, q, scale, bias)[m])


def test_int8_activations_torch_reference_agrees(mod):
    """quant.int8_activation_linear (the path without kernels) computes the same bits."""
    from glm import quant

    q, scale, bias, g = make_case(48, 13696, 4, seed=5)
    x = torch.randn(7, 13696, generator=g)
    assert torch.equal(quant.int8_activation_linear(x, q, scale, bias), mod.int4_linear_i8(x, q, scale, bias))


def test_int8_activations_input_validation(mod):
    q, scale, _, _ = make_case(8, 64, 4, seed=1)
    with pytest.raises(RuntimeError, match="float32"):
        mod.int4_linear_i8(torch.randn(2, 64).bfloat16(), q, scale)
    with pytest.raises(RuntimeError, match=r"\[N, 16\]"):
        mod.int4_linear_i8(torch.randn(2, 32), q, scale)
