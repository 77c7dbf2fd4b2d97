"""Prefill on a T4 on paper: the two ways glm.gpu.linear computes many rows, from their sm_75 SASS.

    python -m bench.gpu_prefill_bound            # needs triton (its bundled ptxas and nvdisasm), no GPU

For the prefill GEMM and for the decode GEMV run over blocks of 8 rows (what prefill uses when rows
must be exact, i.e. with the prefix cache on), it compiles the kernel for sm_75, disassembles the
cubin, takes the K loop (the largest backward branch) and counts its instructions. A Turing SM
sub-partition issues one warp instruction per cycle and has 16 FP32 lanes (an FP32 warp instruction
holds its pipe 2 cycles), so a loop iteration costs at least max(instructions, 2 x FP32
instructions) cycles for 32 x (multiply-adds per thread) multiply-adds. At 40 SMs x 4 sub-partitions
x 1.59 GHz (the T4's boost clock; it runs lower when power-capped) that gives multiply-adds per
second, and over ChatGLM2-6B's linears (5.71e9 multiply-adds per token without the output layer)
prefill tokens per second. An upper bound: it ignores memory stalls, which the L2-resident tiles
mostly hide on a T4.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

T4_SUBPARTITIONS = 40 * 4
T4_CLOCK_HZ = 1.59e9
FP32 = ("FFMA", "FMUL", "FADD")


def chatglm2_macs_per_token() -> int:
    from glm.config import ChatGLMConfig
    c = ChatGLMConfig()
    h = c.hidden_size
    per_layer = h * (c.q_size + 2 * c.kv_size) + c.q_size * h + h * 2 * c.ffn_hidden_size + c.ffn_hidden_size * h
    return per_layer * c.num_layers


def sass(spec) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned if spec.signature[a] != "constexpr"}
    compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, attrs),
                              target=GPUTarget("cuda", 75, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def k_loop(text: str) -> collections.Counter:
    """Opcode counts of the largest loop: instructions from a label up to a branch back to it."""
    at = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(at.search, text.splitlines()) if m]
    labels = {}
    for label, rest in re.findall(r"\.(L_x_\d+):\s*\n(.*)", text):
        m = at.search(rest)
        if m:
            labels[label] = int(m.group(1), 16)
    best: list = []
    for line in text.splitlines():
        m, b = at.search(line), re.search(r"BRA\W+(L_x_\d+)", line)
        if m and b and labels.get(b.group(1), 1 << 40) < int(m.group(1), 16):
            body = [op for addr, op in instrs if labels[b.group(1)] <= addr <= int(m.group(1), 16)]
            best = max(best, body, key=len)
    return collections.Counter(best)


def macs_per_thread(spec) -> int:
    c = spec.constexprs
    if spec.kernel.__name__ == "_gemv_kernel":
        cols = c["BLOCK_K"] * (2 if c["BITS"] == 4 else 1)  # stored bytes -> columns
        return c["M_PAD"] * c["BLOCK_N"] * cols // (32 * spec.num_warps)
    return c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] // (32 * spec.num_warps)


def main() -> int:
    from glm.gpu.linear import COMPILE_SPECS
    per_token = chatglm2_macs_per_token()
    print(f"ChatGLM2-6B linears: {per_token / 1e9:.2f}e9 multiply-adds per prefill token")
    rates = {}
    for spec in COMPILE_SPECS:
        name = spec.shape_class
        if "+bias" in name or not (name.endswith("M<=8") or name.startswith("prefill")):
            continue
        ops = k_loop(sass(spec))
        total, fp32 = sum(ops.values()), sum(ops[o] for o in FP32)
        cycles = max(total, 2 * fp32)
        macs = 32 * macs_per_thread(spec)
        rate = macs / cycles * T4_SUBPARTITIONS * T4_CLOCK_HZ
        rates[name] = rate
        print(f"{name:22s} K loop {total:5d} instructions ({fp32} FP32) for {macs_per_thread(spec)} "
              f"multiply-adds/thread: {cycles / macs_per_thread(spec):.2f} cycles each -> "
              f"<= {rate / 1e12:.2f}e12 multiply-adds/s, <= {rate / per_token:.0f} tok/s")
    for bits in ("int4", "int8", "fp16"):
        gemm, gemv = rates[f"prefill {bits} M>8"], rates[f"decode {bits} M<=8"]
        print(f"{bits}: exact rows (GEMV x 8 rows) cost {gemm / gemv:.2f}x the GEMM per multiply-add")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
