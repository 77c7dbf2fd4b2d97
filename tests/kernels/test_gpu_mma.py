"""The tensor-core decode GEMV (glm/gpu/mma.py) without a GPU: its fragment mapping against the PTX
ISA's tables for mma.m16n8k8, and its inline PTX run by a small emulator of the instructions it
uses (lop3 from its truth table, prmt, f16x2 arithmetic, the warp-wide mma from the ISA's fragment
tables) over every lane of a program, fed the way the kernel loads its operands, against
dequantize + matmul. The kernel itself needs a device (selftest.select_decode_gemv, script/gpu-check)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from glm.gpu import interpreting, linear, mma, selftest  # noqa: E402
from glm.quant import QuantLinear, dequantize, quantize  # noqa: E402
from glm.settings import SettingError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "glm").is_dir():  # tests/ or a folder below it
    ROOT = ROOT.parent


def without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# --- PTX ISA 9.7.14.5.7, "Matrix Fragments for mma.m16n8k8", .f16 A/B, .f32 C/D, written out ------

def isa_a(lane):  # a0, a1: row groupID; a2, a3: row groupID + 8; col threadID_in_group * 2 + (i & 1)
    g, t = lane >> 2, lane % 4
    return [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]


def isa_b(lane):  # b0, b1: row threadID_in_group * 2 + i, col groupID
    g, t = lane >> 2, lane % 4
    return [(2 * t, g), (2 * t + 1, g)]


def isa_d(lane):  # c0, c1: row groupID; c2, c3: row groupID + 8; col threadID_in_group * 2 + (i & 1)
    g, t = lane >> 2, lane % 4
    return [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]


def test_fragment_tables_are_the_isa_ones():
    for lane in range(32):
        assert mma.a_fragment(lane) == isa_a(lane)
        assert mma.b_fragment(lane) == isa_b(lane)
        assert mma.d_fragment(lane) == isa_d(lane)
    # every element of A (16 x 8), B (8 x 8), D (16 x 8) held by exactly one lane and register
    assert sorted(p for lane in range(32) for p in isa_a(lane)) == [(m, k) for m in range(16) for k in range(8)]
    assert sorted(p for lane in range(32) for p in isa_b(lane)) == [(k, n) for k in range(8) for n in range(8)]
    assert sorted(p for lane in range(32) for p in isa_d(lane)) == [(m, n) for m in range(16) for n in range(8)]


@pytest.mark.parametrize("bits", [4, 8])
def test_each_thread_feeds_every_column_of_its_step_once(bits):
    cols = mma.THREAD_BYTES * 8 // bits
    pairs = [c for _, _, k0, k1 in mma.mma_columns(bits) for c in (k0, k1)]
    assert sorted(pairs) == list(range(cols))
    assert len(mma.mma_columns(bits)) == cols // 2


def test_a_thread_loads_its_two_weight_rows_and_its_x_row_at_the_same_columns():
    for index in range(mma.WARPS * 32 * mma.PACK):
        e = mma.thread_element(index)
        feature, unit = mma.weight_element(index)
        row, x_unit = mma.x_element(index, 4)
        assert feature == e["group"] + 8 * (e["reg"] >= 8) and row == e["group"]
        first = (e["warp"] * mma.QUADS + e["quad"]) * mma.THREAD_BYTES  # the thread's first byte
        assert 2 * unit - first == 2 * (e["reg"] % 8) and x_unit - first == e["reg"]
    assert mma.STEP_BYTES == mma.WARPS * mma.QUADS * mma.THREAD_BYTES


# --- an emulator of the PTX the kernel inlines, 32 lanes at once -----------------------------------

def _f16x2(v):
    return np.stack([v & 0xFFFF, v >> 16], -1).astype(np.uint16).view(np.float16).astype(np.float64)


def _pack_f16x2(lo_hi):
    h = lo_hi.astype(np.float16).view(np.uint16).astype(np.uint32)
    return h[..., 0] | (h[..., 1] << 16)


class Warp:
    """Registers of 32 lanes: b32 values as uint32 arrays, f32 ones as float64 arrays."""

    def __init__(self, operands):
        self.regs = {f"${i}": v for i, v in enumerate(operands)}

    def val(self, tok):
        tok = tok.strip()
        if tok.startswith("0x") or tok.isdigit():
            return np.full(32, int(tok, 0), dtype=np.uint32)
        return self.regs[tok]

    def run(self, asm: str):
        for line in asm.splitlines():
            line = line.strip().rstrip(";")
            if line in ("{", "}") or line.startswith(".reg"):
                continue
            op, rest = line.split(None, 1)
            if op.startswith("mma."):
                self.mma(op, rest)
                continue
            args = [a.strip() for a in rest.split(",")]
            d, src = args[0], [self.val(a) for a in args[1:]]
            self.regs[d] = self.alu(op, src, args)

    def alu(self, op, src, args):
        if op == "mov.b32":
            return src[0].copy()
        if op == "xor.b32":
            return src[0] ^ src[1]
        if op == "shr.b32":
            return src[0] >> src[1]
        if op == "lop3.b32":  # generic: bit i of the LUT is F(a, b, c) for (a, b, c) = bits of i
            a, b, c, lut = src[0], src[1], src[2], int(args[4], 0)
            out = np.zeros(32, dtype=np.uint32)
            for i in range(8):
                if lut >> i & 1:
                    out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
            return out
        if op == "prmt.b32":  # default mode: bytes 0-3 from a, 4-7 from b; selector bit 3 = sign replicate
            a, b, sel = src[0], src[1], int(args[3], 0)
            both = a.astype(np.uint64) | (b.astype(np.uint64) << 32)
            out = np.zeros(32, dtype=np.uint32)
            for i in range(4):
                n = sel >> (4 * i) & 15
                byte = ((both >> (8 * (n & 7))) & 0xFF).astype(np.uint32)
                if n & 8:
                    byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
                out |= byte << (8 * i)
            return out
        if op == "sub.f16x2":
            return _pack_f16x2(_f16x2(src[0]) - _f16x2(src[1]))
        if op == "fma.rn.f16x2":  # exact in float64, rounded once to fp16
            return _pack_f16x2(_f16x2(src[0]) * _f16x2(src[1]) + _f16x2(src[2]))
        raise AssertionError(f"emulator lacks {op}")

    def mma(self, op, rest):
        assert op == "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32", op
        d, a, b, c = [[t.strip() for t in g.split(",")] for g in re.findall(r"\{([^}]*)\}", rest)]
        A, B, C = np.zeros((16, 8)), np.zeros((8, 8)), np.zeros((16, 8))
        for lane in range(32):
            a_vals = [h for r in a for h in _f16x2(self.regs[r][lane:lane + 1])[0]]
            for (m, k), v in zip(isa_a(lane), a_vals):
                A[m, k] = v
            for (k, n), v in zip(isa_b(lane), _f16x2(self.regs[b[0]][lane:lane + 1])[0]):
                B[k, n] = v
            for (m, n), r in zip(isa_d(lane), c):
                C[m, n] = self.regs[r][lane]
        D = (A @ B + C).astype(np.float32).astype(np.float64)
        for i, r in enumerate(d):
            self.regs[r] = np.array([D[isa_d(lane)[i]] for lane in range(32)])


def emulate_program(q: torch.Tensor, x: torch.Tensor, bits: int) -> np.ndarray:
    """One program's y (8 rows x 16 features, before the scale): each K step's operands gathered
    per lane as the kernel loads them, the step's PTX run per warp, then chains and warps summed."""
    w_units = q.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF  # [16, K_STORED / 2]
    x16 = x.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF  # [8, K] fp16 bits
    k_stored = q.shape[1]
    asm = mma.step_asm(bits)
    n = mma.WARPS * 32 * mma.PACK
    acc = np.zeros(n)
    for k in range(0, k_stored, mma.STEP_BYTES):
        w = np.zeros(n, dtype=np.int64)
        xs = np.zeros(n, dtype=np.int64)
        for index in range(n):
            feature, unit = mma.weight_element(index)
            if k + 2 * unit < k_stored:
                w[index] = w_units[feature, k // 2 + unit]
            row, x_unit = mma.x_element(index, bits)
            if k + x_unit < k_stored:
                col = k + x_unit
                xs[index] = (x16[row, 2 * col] | x16[row, 2 * col + 1] << 16) if bits == 4 else x16[row, col]
        for warp in range(mma.WARPS):
            sl = slice(warp * 32 * mma.PACK, (warp + 1) * 32 * mma.PACK)
            wl, xl, al = w[sl].reshape(32, mma.PACK), xs[sl].reshape(32, mma.PACK), acc[sl].reshape(32, mma.PACK)
            # int16 (int8: and x) elements go to 32-bit registers in pairs, the first in the low half
            w_regs = [(wl[:, 2 * p] | wl[:, 2 * p + 1] << 16).astype(np.uint32) for p in range(mma.PACK // 2)]
            x_regs = ([xl[:, p].astype(np.uint32) for p in range(mma.PACK)] if bits == 4 else
                      [(xl[:, 2 * p] | xl[:, 2 * p + 1] << 16).astype(np.uint32) for p in range(mma.PACK // 2)])
            cpu = Warp([al[:, i].copy() for i in range(mma.PACK)] + w_regs + x_regs)
            cpu.run(asm)
            acc[sl] = np.stack([cpu.regs[f"${i}"] for i in range(mma.PACK)], -1).reshape(-1)
    sums = acc.reshape(mma.WARPS, 32, mma.CHAINS, 4).sum(2).sum(0)  # the kernel's epilogue order
    y = np.zeros((mma.ROWS, mma.FEATURES))
    for lane in range(32):
        for r in range(4):
            feature, row = mma.d_fragment(lane)[r]
            y[row, feature] = sums[lane, r]
    return y


@pytest.mark.parametrize("bits", [4, 8])
def test_emulated_ptx_is_dequantize_and_matmul(bits):
    """Two full K steps and a partial one; K order and every nibble/byte position checked by value."""
    g = torch.Generator().manual_seed(bits)
    k = (2 * mma.STEP_BYTES + 48) * 8 // bits
    q, scale = quantize(torch.randn(mma.FEATURES, k, generator=g).half(), bits)
    x = torch.randn(mma.ROWS, k, generator=g).half()
    got = emulate_program(q, x, bits)
    codes = dequantize(q, torch.ones_like(scale), bits).double()  # the integer codes
    want = x.double() @ codes.t()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-3)


def test_a_rows_result_does_not_depend_on_its_batch_mates():
    """Row i of B is one column of every mma and the K order is fixed: other rows' x change nothing."""
    g = torch.Generator().manual_seed(5)
    k = mma.STEP_BYTES * 2
    q, _ = quantize(torch.randn(mma.FEATURES, k, generator=g).half(), 4)
    x = torch.randn(mma.ROWS, k, generator=g).half()
    other = torch.randn(mma.ROWS, k, generator=g).half()
    other[3] = x[3]
    a, b = emulate_program(q, x, 4), emulate_program(q, other, 4)
    assert np.array_equal(a[3], b[3]) and not np.array_equal(a[2], b[2])


@pytest.mark.skipif(not interpreting(), reason="checks the interpreter")
def test_the_interpreter_never_selects_the_mma_gemv():
    q, scale = quantize(torch.randn(32, 64).half(), 4)
    model = torch.nn.Module()
    model.proj = QuantLinear(64, 32, 4, ops=None)
    model.proj.weight, model.proj.weight_scale = q, scale
    assert selftest.select_decode_gemv(model, torch.device("cpu")) == "fma"
    assert linear.decode_variant() == "fma"
    with pytest.raises(RuntimeError, match="interpreter"):
        linear.set_decode_variant("mma")
    x = torch.randn(8, 64).half()
    y = linear.quant_linear(x, q, scale, None, 4)  # the FMA GEMV
    assert torch.allclose(y.float(), x.float() @ dequantize(q, scale, 4).t(), rtol=1e-2, atol=1e-2)


def test_glm_decode_gemv_fma_keeps_the_fma_gemv_and_a_bad_value_names_the_variable(monkeypatch):
    model = torch.nn.Module()
    monkeypatch.setenv("GLM_DECODE_GEMV", "fma")
    assert selftest.select_decode_gemv(model, torch.device("cpu")) == "fma"
    monkeypatch.setenv("GLM_DECODE_GEMV", "tensor")
    with pytest.raises(SettingError, match="GLM_DECODE_GEMV='tensor' must be one of auto, fma"):
        selftest.select_decode_gemv(model, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mma kernel runs on a CUDA device only")
@pytest.mark.parametrize("bits", [4, 8])
def test_mma_gemv_matches_the_fma_gemv_on_the_device(bits):
    g = torch.Generator().manual_seed(bits)
    q, scale = quantize(torch.randn(64, 13696, generator=g).half(), bits)
    model = torch.nn.Module()
    model.proj = QuantLinear(13696, 64, bits, bias=True, ops=None)
    model.proj.weight, model.proj.weight_scale = q.cuda(), scale.cuda()
    model.proj.bias = torch.randn(64, generator=g).half().cuda()
    assert selftest.compare_decode_gemvs(model.proj, torch.device("cuda")) <= selftest.TOLERANCE
    try:
        assert selftest.select_decode_gemv(model, torch.device("cuda")) == "mma"
        assert linear.decode_variant() == "mma"
    finally:
        linear.set_decode_variant("fma")


def test_sm75_sass_one_hmma_per_128_weights_and_the_issue_bound():
    """Compiled for sm_75 (no GPU needed): no spills; the K loop issues one HMMA.1688 per 128 weights
    and no int-to-float conversion, and bench.gpu_decode_bound's issue bound is >= 300 GB/s for int4
    and int8 alike (the FMA GEMV's 8-row int4 bound: 214)."""
    code = """
import json
from bench import gpu_decode_bound as b
from bench.gpu_prefill_bound import k_loop, sass
from glm.gpu import mma
from glm.gpu.compile import compile_spec
out = {}
for spec in mma.COMPILE_SPECS:
    r = compile_spec(spec, 75, "glm.gpu.mma")
    ops = k_loop(sass(spec))
    cost = b.loop_cost(ops)
    bound = b.issue_bound(mma.FEATURES * mma.STEP_BYTES / spec.num_warps, cost["cycles"])
    out[spec.shape_class] = [r.ok, r.spill_stores, r.spill_loads, ops["HMMA"], cost["xu"], bound]
print(json.dumps(out))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=without_interpreter(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert len(got) == 4, got
    for name, (ok, stores, loads, hmma, xu, bound) in got.items():
        bits = 4 if "int4" in name else 8
        weights_per_warp_step = mma.FEATURES * mma.STEP_BYTES * 8 // bits // mma.WARPS
        assert ok and stores == 0 and loads == 0, (name, got)
        assert hmma * 128 == weights_per_warp_step and xu == 0, (name, got)
        assert bound >= 300e9, (name, got)
