"""Decode on a T4 on paper: for every decode kernel variant of glm.gpu, the bandwidth bound and the
issue bound of its sm_75 SASS, and the smaller of the two for ChatGLM2-6B int4 in tok/s.

    python -m bench.gpu_decode_bound [--context 1024] [--json]   # needs triton, no GPU

Each kernel is compiled for sm_75, its cubin disassembled with Triton's bundled nvdisasm, and its
main loop (the largest backward branch: the GEMV's K loop, attention's key-block loop) counted by
pipe. Model of a Turing SM sub-partition (a T4 has 40 SMs x 4 of them at 1.59 GHz boost):
  - one warp instruction issued per cycle;
  - the FMA pipe (FFMA, FMUL, FADD, fp16 HADD2/HFMA2/HMUL2, IMAD) and the ALU pipe (logic, shifts,
    integer adds, compares, PRMT, min/max, selects) have 16 lanes: 2 cycles a warp instruction;
  - conversions (I2F, F2I, F2F, I2I) and MUFU run 16 per clock per SM: 8 cycles a warp instruction;
  - the tensor cores (HMMA): 65 TFLOPS of fp16 products with fp32 sums over 160 sub-partitions at
    1.59 GHz is 128 multiply-adds a clock each, so one HMMA.1688 (16 x 8 x 8) holds them 8 cycles.
A loop iteration costs at least max(instructions, 2 x FMA, 2 x ALU, 8 x XU, 8 x HMMA) cycles and streams a known
number of bytes per warp, which gives bytes per second over the 160 sub-partitions: the issue bound.
The bandwidth bound is the T4's 320 GB/s. Both are upper bounds (no stalls, no launch gaps, full
waves); the smaller one is what a T4 can at best do with these kernels.
"""
from __future__ import annotations

import argparse
import json

from bench.gpu_prefill_bound import k_loop, sass

T4_SUBPARTITIONS = 40 * 4
T4_CLOCK_HZ = 1.59e9
T4_BANDWIDTH = 320e9
FMA_PIPE = {"FFMA", "FMUL", "FADD", "HADD2", "HFMA2", "HMUL2", "IMAD", "IMUL"}
ALU_PIPE = {"LOP3", "LOP", "SHF", "IADD3", "PRMT", "ISETP", "LEA", "SEL", "FSEL", "FSETP", "FMNMX",
            "IMNMX", "P2R", "R2P", "IABS", "SGXT", "BMSK", "FLO", "POPC", "PLOP3"}
XU_PIPE = {"I2F", "F2I", "F2F", "I2I", "MUFU"}
HMMA_CYCLES = 8


def loop_cost(ops) -> dict:
    """Instructions by pipe of one loop iteration (per thread = per warp) and its cycles."""
    count = {"instructions": sum(ops.values()),
             "fma": sum(n for op, n in ops.items() if op in FMA_PIPE),
             "alu": sum(n for op, n in ops.items() if op in ALU_PIPE),
             "xu": sum(n for op, n in ops.items() if op in XU_PIPE),
             "hmma": ops.get("HMMA", 0)}
    count["cycles"] = max(count["instructions"], 2 * count["fma"], 2 * count["alu"], 8 * count["xu"],
                          HMMA_CYCLES * count["hmma"])
    return count


def issue_bound(bytes_per_warp_iteration: float, cycles: int) -> float:
    return bytes_per_warp_iteration / cycles * T4_SUBPARTITIONS * T4_CLOCK_HZ


def linear_variants() -> dict[str, dict]:
    """Every decode GEMV variant (no bias: the bias only touches the epilogue): the FMA GEMV per
    rows-per-program, and the tensor-core GEMV (glm.gpu.mma, one kernel for 1-8 rows)."""
    from glm.gpu import mma
    from glm.gpu.linear import COMPILE_SPECS
    out = {}
    for spec in mma.COMPILE_SPECS:
        if "+bias" in spec.shape_class:
            continue
        streamed = mma.FEATURES * mma.STEP_BYTES
        cost = loop_cost(k_loop(sass(spec)))
        out[spec.shape_class] = {**cost, "bytes_per_iteration": streamed,
                                 "issue_bound": issue_bound(streamed / spec.num_warps, cost["cycles"])}
    for spec in COMPILE_SPECS:
        if not spec.shape_class.startswith("decode") or "+bias" in spec.shape_class:
            continue
        c = spec.constexprs
        streamed = c["BLOCK_N"] * c["BLOCK_K"] * (2 if c["BITS"] == 16 else 1)  # stored weight bytes
        cost = loop_cost(k_loop(sass(spec)))
        out[spec.shape_class] = {**cost, "bytes_per_iteration": streamed,
                                 "issue_bound": issue_bound(streamed / spec.num_warps, cost["cycles"])}
    return out


def attention_variants() -> dict[str, dict]:
    """The decode attention kernel per model: K and V bytes of one key block per program."""
    from glm.gpu.attention import COMPILE_SPECS
    out = {}
    for spec in COMPILE_SPECS:
        if spec.kernel.__name__ != "_attend_rows_kernel":
            continue
        c = spec.constexprs
        streamed = 2 * c["BLOCK_N"] * c["HEAD_DIM"] * 2
        cost = loop_cost(k_loop(sass(spec)))
        out[spec.shape_class] = {**cost, "bytes_per_iteration": streamed,
                                 "issue_bound": issue_bound(streamed / spec.num_warps, cost["cycles"])}
    return out


def chatglm2_int4_tok_s(linears: dict, attention: dict, batch: int, context: int, gemv: str = "fma") -> dict:
    """Decode tok/s (all streams together) of ChatGLM2-6B int4 at `batch` streams of `context`
    cached tokens: every linear at min(bandwidth, its variant's issue bound), then attention.
    gemv "mma": the quantized linears on the tensor-core GEMV (the fp16 output layer stays FMA)."""
    from glm.config import ChatGLMConfig
    from glm.gpu.linear import bytes_moved, gemv_rows_per_program
    from glm.gpu.roofline import linear_shapes

    cfg = ChatGLMConfig(quantization_bit=4)
    m_pad = gemv_rows_per_program(batch)
    seconds = {"bandwidth": 0.0, "bound": 0.0}
    for n, k, bits, bias in linear_shapes(cfg):
        moved = bytes_moved(batch, n, k, bits, bias)
        if gemv == "mma" and bits != 16:
            rate = linears[f"decode mma int{bits} M<=8"]["issue_bound"]
        else:
            rate = linears[f"decode {'fp16' if bits == 16 else f'int{bits}'} M<={m_pad}"]["issue_bound"]
        seconds["bandwidth"] += moved / T4_BANDWIDTH
        seconds["bound"] += moved / min(T4_BANDWIDTH, rate)
    kv = batch * cfg.num_layers * context * 2 * cfg.kv_heads * cfg.head_dim * 2
    attn_rate = next(v["issue_bound"] for name, v in attention.items() if "ChatGLM2" in name)
    seconds["bandwidth"] += kv / T4_BANDWIDTH
    seconds["bound"] += kv / min(T4_BANDWIDTH, attn_rate)
    return {"bandwidth_tok_s": batch / seconds["bandwidth"], "bound_tok_s": batch / seconds["bound"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_decode_bound")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per stream")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    linears, attention = linear_variants(), attention_variants()
    print("kernel variant | loop instructions (FMA / ALU / XU / HMMA) | GB/s issue bound | bound (min with 320)")
    for name, v in {**linears, **attention}.items():
        print(f"{name:62s} {v['instructions']:5d} ({v['fma']} / {v['alu']} / {v['xu']} / {v['hmma']})  "
              f"{v['issue_bound'] / 1e9:6.0f}  {min(v['issue_bound'], T4_BANDWIDTH) / 1e9:4.0f}")
    result = {"linears": linears, "attention": attention, "context": args.context}
    for gemv in ("fma", "mma"):
        for batch in (1, 8):
            r = chatglm2_int4_tok_s(linears, attention, batch, args.context, gemv)
            result[f"{gemv}_batch{batch}"] = r
            print(f"ChatGLM2-6B int4, {gemv} GEMV, {batch} stream(s) at {args.context} cached tokens: <= "
                  f"{r['bound_tok_s']:.0f} tok/s in total (bandwidth alone: {r['bandwidth_tok_s']:.0f})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
