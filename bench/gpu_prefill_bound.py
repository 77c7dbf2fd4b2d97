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

Then the tensor-core prefill (glm/gpu/prefill.py) and the time to first token it gives: per
256-row chunk, the dequantize pass (the larger of its DRAM bytes and its SASS issue cycles), the
cuBLAS fp16 GEMM at CUBLAS_EFFICIENCY of the T4's 65 TFLOPS (or its weight bytes, if more), the
pointwise ops' bytes; attention per prompt: with exact rows prefill.causal_attention (the issue
cycles of its key loop from SASS; the per-row decode kernel beside it for comparison), without
them SDPA's memory-efficient kernel at SDPA_EFFICIENCY of the tensor-core rate; and the output
layer's row.
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
# Assumptions, not measurements: cuBLAS's fp16 GEMM at [256, 4096] x [4096, N] reaches half the T4's
# 65 TFLOPS tensor-core peak (it is power-capped at 70 W and throttles under sustained load);
# xformers' memory-efficient attention on sm_75 less; DRAM streams at 80% of 320 GB/s.
T4_TENSOR_FLOPS = 65e12
CUBLAS_EFFICIENCY = 0.5
SDPA_EFFICIENCY = 0.3
T4_DRAM_BYTES_S = 0.8 * 320e9
CHUNK = 256


def chatglm2_macs_per_token() -> int:
    from glm.config import ChatGLMConfig
    c = ChatGLMConfig()
    h = c.hidden_size
    per_layer = h * (c.q_size + 2 * c.kv_size) + c.q_size * h + h * 2 * c.ffn_hidden_size + c.ffn_hidden_size * h
    return per_layer * c.num_layers


def sass(spec) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    from glm.gpu.compile import ast_source

    compiled = triton.compile(ast_source(spec),
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


def instructions(text: str) -> collections.Counter:
    """Opcode counts of a whole kernel (one without a loop: the dequantize kernel)."""
    at = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
    return collections.Counter(m.group(1) for m in map(at.search, text.splitlines()) if m)


def find_spec(module, prefix: str):
    return next(s for s in module.COMPILE_SPECS if s.shape_class.startswith(prefix))


class TensorCorePrefill:
    """Seconds for ChatGLM2-6B int4 prefill on a T4 with glm/gpu/prefill.py (see the docstring)."""

    def __init__(self):
        from glm.config import ChatGLMConfig
        from glm.gpu import attention, prefill
        c = self.cfg = ChatGLMConfig()
        self.weights = chatglm2_macs_per_token()  # one multiply-add per weight per row
        spec = find_spec(prefill, "prefill dequantize int4")
        per_warp = sum(instructions(sass(spec)).values())
        stored = spec.constexprs["BLOCK_N"] * spec.constexprs["BLOCK_K"]
        issue = per_warp * spec.num_warps * (self.weights / 2 / stored) / (T4_SUBPARTITIONS * T4_CLOCK_HZ)
        dram = self.weights * (0.5 + 2) / T4_DRAM_BYTES_S
        self.dequant_s = max(issue, dram)
        self.dequant_note = f"{per_warp} instructions/warp for {stored} bytes: issue {issue * 1e3:.0f} ms, DRAM {dram * 1e3:.0f} ms"
        spec = find_spec(attention, "attend rows ChatGLM2")
        loop = k_loop(sass(spec))
        self.attend_cycles = sum(loop.values()) * spec.num_warps  # per key block per (row, head)
        self.key_block = spec.constexprs["BLOCK_N"]
        self.attend_note = f"{sum(loop.values())} instructions/warp per {self.key_block} keys"
        spec = find_spec(prefill, "prefill causal attention")
        loop = k_loop(sass(spec))
        c_ = spec.constexprs
        # one iteration: BLOCK_M rows x BLOCK_N keys of one head
        self.tiled_cycles_per_row_key = max(sum(loop.values()), 2 * sum(loop[o] for o in FP32)) * spec.num_warps / (
            c_["BLOCK_M"] * c_["BLOCK_N"])
        self.tiled_block = (c_["BLOCK_M"], c_["BLOCK_N"])
        self.tiled_note = (f"{sum(loop.values())} instructions/warp ({sum(loop[o] for o in FP32)} FP32) per "
                           f"{c_['BLOCK_M']} rows x {c_['BLOCK_N']} keys")
        h = c.hidden_size
        # rms_norm x2, swiglu, the residual adds and the linears' inputs and outputs, fp16
        self.pointwise_bytes_per_row = c.num_layers * 2 * (
            4 * h + 3 * c.ffn_hidden_size + 6 * h + (h + c.q_size + 2 * c.kv_size) + 2 * h + 2 * c.ffn_hidden_size + h)
        self.head_s = c.vocab_size * h * 2 / T4_DRAM_BYTES_S

    def linears_s(self, rows: int, padded: bool = True) -> float:
        chunks = -(-rows // CHUNK)
        gemm_rows = chunks * CHUNK if padded else rows
        gemm = max(2 * gemm_rows * self.weights / (T4_TENSOR_FLOPS * CUBLAS_EFFICIENCY),
                   chunks * self.weights * 2 / T4_DRAM_BYTES_S)
        return chunks * self.dequant_s + gemm + gemm_rows * self.pointwise_bytes_per_row / T4_DRAM_BYTES_S

    def row_attention_s(self, start: int, rows: int) -> float:
        c = self.cfg
        blocks = sum(-(-(p + 1) // self.key_block) for p in range(start, start + rows))
        issue = c.num_layers * c.num_heads * blocks * self.attend_cycles / (T4_SUBPARTITIONS * T4_CLOCK_HZ)
        keys = sum(p + 1 for p in range(start, start + rows))
        kv_bytes = c.num_layers * keys * 2 * c.kv_size * 2 / T4_DRAM_BYTES_S  # a group's k, v per row
        return max(issue, kv_bytes)

    def tiled_attention_s(self, start: int, rows: int) -> float:
        """prefill.causal_attention (exact rows): issue cycles of its key loop, blocks of rows x keys."""
        c = self.cfg
        bm, bn = self.tiled_block
        pairs = 0
        for r0 in range(0, rows, bm):
            last = start + min(r0 + bm, rows)  # keys the block's last row sees
            pairs += bm * (-(-last // bn) * bn)
        return c.num_layers * c.num_heads * pairs * self.tiled_cycles_per_row_key / (T4_SUBPARTITIONS * T4_CLOCK_HZ)

    def sdpa_s(self, start: int, rows: int) -> float:
        c = self.cfg
        keys = sum(p + 1 for p in range(start, start + rows))
        return c.num_layers * 4 * c.num_heads * c.head_dim * keys / (T4_TENSOR_FLOPS * SDPA_EFFICIENCY)

    def ttft_s(self, start: int, rows: int, exact: bool) -> float:
        attention = self.tiled_attention_s(start, rows) if exact else self.sdpa_s(start, rows)
        return self.linears_s(rows, padded=exact) + attention + self.head_s


def tensor_core_table(before_rate: float, gemm_rate: float) -> None:
    t = TensorCorePrefill()
    print(f"\ntensor-core prefill, ChatGLM2-6B int4 on a T4 (cuBLAS at {CUBLAS_EFFICIENCY:.0%} of 65 TFLOPS, "
          f"DRAM {T4_DRAM_BYTES_S / 1e9:.0f} GB/s, chunks of {CHUNK} rows):")
    print(f"  dequantize per chunk {t.dequant_s * 1e3:.0f} ms ({t.dequant_note}); "
          f"GEMM per chunk {t.linears_s(CHUNK) * 1e3 - t.dequant_s * 1e3:.0f} ms with pointwise; "
          f"output layer row {t.head_s * 1e3:.1f} ms")
    print(f"  per-row attention: {t.attend_note}; exact causal attention: {t.tiled_note}")
    print(f"  {'prompt':>7s} {'row attn':>9s} {'exact attn':>10s} {'SDPA':>7s} {'exact (cache on)':>17s} "
          f"{'cache off':>10s} {'before: GEMV x 8':>17s} {'before: FMA GEMM':>17s}")
    for n in (1000, 1024, 8192, 32768):
        before = n / before_rate + t.row_attention_s(0, n) + t.head_s
        gemm = n / gemm_rate + t.sdpa_s(0, n) + t.head_s
        print(f"  {n:7d} {t.row_attention_s(0, n):8.2f}s {t.tiled_attention_s(0, n):9.2f}s {t.sdpa_s(0, n):6.2f}s "
              f"{t.ttft_s(0, n, True):16.2f}s {t.ttft_s(0, n, False):9.2f}s {before:16.2f}s {gemm:16.2f}s")
    history, new = 1303, 65  # chat round 2: a 1,300-token history cached, 65 new tokens
    cached, uncached = t.ttft_s(history, new, True), t.ttft_s(0, history + new, True)
    print(f"  chat round 2, {history} cached + {new} new: {cached:.2f} s cached vs {uncached:.2f} s uncached "
          f"({cached / uncached:.2f}x); a 300-token reply recomputed before caching: "
          f"{t.linears_s(300) + t.tiled_attention_s(1000, 300):.2f} s after round 1")


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
    tensor_core_table(rates["decode int4 M<=8"] / per_token, rates["prefill int4 M>8"] / per_token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
