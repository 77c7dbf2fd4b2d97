"""`python -m glm.gpu compile --arch 75` compiles every Triton kernel of the GPU path for a T4
(sm_75) with Triton's bundled ptxas, no GPU needed; and a failing spec makes it fail."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from glm.gpu import linear  # noqa: E402
from glm.gpu.compile import KernelSpec, compile_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sm75_compile():
    return subprocess.run([sys.executable, "-m", "glm.gpu", "compile", "--arch", "75"], cwd=ROOT,
                          env=without_interpreter(), capture_output=True, text=True, timeout=1800)


def test_every_kernel_compiles_for_sm75_without_spills_in_decode(sm75_compile):
    out = sm75_compile.stdout
    assert sm75_compile.returncode == 0, out + sm75_compile.stderr
    lines = [line for line in out.splitlines() if line.startswith(("ok ", "FAIL "))]
    linear_lines = [line for line in lines if line.split()[1].startswith("linear.")]
    assert len(linear_lines) == len(linear.COMPILE_SPECS)
    for spec in linear.COMPILE_SPECS:
        line = next(line for line in linear_lines if f"[{spec.shape_class}]" in line)
        m = re.search(r"ok +\S+ \[.*\]: (\d+) registers, spills (\d+) B stored / (\d+) B loaded", line)
        assert m, line
        assert 0 < int(m[1]) <= 255
        if spec.no_spills:
            assert (m[2], m[3]) == ("0", "0"), line
    assert f"sm_75: {len(lines)}/{len(lines)} kernels compiled" in out


def test_a_spec_that_does_not_match_its_kernel_fails():
    spec = linear.COMPILE_SPECS[0]
    bad = KernelSpec(kernel=spec.kernel, shape_class="bad", signature={"x_ptr": "*fp16"})
    result = compile_spec(bad, 75, "linear")
    assert not result.ok and "signature" in result.error
    assert result.line().startswith("FAIL linear._gemv_kernel [bad]")


def test_a_spec_that_spills_fails_when_spills_are_not_allowed():
    # The prefill GEMM with 4 warps instead of 8 spills on sm_75; as a no_spills spec it must fail.
    code = """
import dataclasses
from glm.gpu import linear
from glm.gpu.compile import compile_spec
spec = next(s for s in linear.COMPILE_SPECS if s.shape_class == "prefill int8 M>8")
print(compile_spec(dataclasses.replace(spec, num_warps=4, no_spills=True), 75, "linear").line())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=without_interpreter(),
                         capture_output=True, text=True, timeout=600)
    assert out.stdout.startswith(
        "FAIL linear._gemm_kernel [prefill int8 M>8]: spills in a kernel that must not spill"), out


def test_compile_refuses_to_run_under_the_interpreter():
    out = subprocess.run([sys.executable, "-m", "glm.gpu", "compile", "--arch", "75"], cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr


def without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_decode_kernels_issue_bounds_from_sm75_sass():
    """The SASS count of bench.gpu_decode_bound: the int4 GEMV's K loop issues fast enough for a T4's
    320 GB/s at 1 row and >= 200 GB/s at 8 (its FP32 pipe caps any fp32-exact int4 GEMV at 254), the
    int8 one >= 300 at 8 rows, without an int-to-float conversion; attention fetches K and V with
    vector loads (8 LDG per 32 keys of head_dim 128, not one per element)."""
    code = """
import json
from bench import gpu_decode_bound as b
from bench.gpu_prefill_bound import k_loop, sass
from glm.gpu import attention, linear
out = {}
for spec in linear.COMPILE_SPECS:
    if spec.shape_class in ("decode int4 M<=1", "decode int4 M<=8", "decode int8 M<=8"):
        c = spec.constexprs
        ops = k_loop(sass(spec))
        cost = b.loop_cost(ops)
        bound = b.issue_bound(c["BLOCK_N"] * c["BLOCK_K"] / spec.num_warps, cost["cycles"])
        out[spec.shape_class] = [bound, cost["xu"]]
spec = next(s for s in attention.COMPILE_SPECS if s.kernel.__name__ == "_attend_rows_kernel")
out["attend LDG"] = k_loop(sass(spec))["LDG"]
print(json.dumps(out))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=without_interpreter(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    got = __import__("json").loads(out.stdout.splitlines()[-1])
    assert got["decode int4 M<=1"][0] >= 400e9 and got["decode int4 M<=1"][1] == 0, got
    assert got["decode int4 M<=8"][0] >= 200e9 and got["decode int4 M<=8"][1] == 0, got
    assert got["decode int8 M<=8"][0] >= 300e9 and got["decode int8 M<=8"][1] == 0, got
    assert got["attend LDG"] == 8, got
