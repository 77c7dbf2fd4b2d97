"""Bytes the linear layers move per decode step on each GPU path, and the tokens/s bound that sets
on a GPU's memory bandwidth (a T4: 320 GB/s). The linears are nearly all of a decode step's
traffic; the KV cache adds 2 * layers * kv_heads * head_dim * 2 bytes per cached position.

Paths:
  torch  -- QuantLinear's torch fallback: dequantize with torch ops (arithmetic shifts, stack,
            .to(fp16), * scale), each op a pass over memory, then an fp16 GEMM.
  thudm  -- THUDM's quantization.py: cpm_kernels extracts the fp16 weight (reads the stored bytes,
            writes 2 bytes a weight), then cuBLAS reads it.
  triton -- glm.gpu.linear: the stored bytes read once (linear.bytes_moved).
"""
from __future__ import annotations

from .linear import bytes_moved

T4_BANDWIDTH = 320e9
PATHS = ("torch", "thudm", "triton")

# Bytes per weight for the dequantize-then-GEMM paths, op by op (reads + writes):
#   torch int4: >>4 (0.5+0.5), <<4 (0.5+0.5), >>4 (0.5+0.5), stack (1+1), .to(fp16) (1+2),
#               * scale (2+2), GEMM reads 2 = 14.0;   int8: .to(fp16) 3, * scale 4, GEMM 2 = 9.0
#   thudm int4: extract 0.5+2, GEMM 2 = 4.5;   int8: 1+2, GEMM 2 = 5.0
#   fp16 weights (the output layer): the GEMM reads 2 on every path.
_DEQUANT_BYTES_PER_WEIGHT = {("torch", 4): 14.0, ("torch", 8): 9.0, ("thudm", 4): 4.5, ("thudm", 8): 5.0}


def linear_shapes(cfg) -> list[tuple[int, int, int, bool]]:
    """(out N, in K, bits, bias) of every linear one forward step runs, output layer included."""
    h, bits, ffn = cfg.hidden_size, cfg.quantization_bit or 16, cfg.ffn_hidden_size
    if cfg.family == "chatglm2":
        layer = [(cfg.q_size + 2 * cfg.kv_size, h, bits, cfg.qkv_bias), (h, cfg.q_size, bits, False),
                 (2 * ffn, h, bits, False), (h, ffn, bits, False)]
    else:
        layer = [(3 * h, h, bits, True), (h, h, bits, True), (ffn, h, bits, True), (h, ffn, bits, True)]
    return layer * cfg.num_layers + [(cfg.vocab_size, h, 16, False)]


def call_bytes(path: str, m: int, n: int, k: int, bits: int, bias: bool) -> float:
    """DRAM bytes of one linear call with m rows on `path`."""
    if path == "triton" or bits == 16:
        return bytes_moved(m, n, k, bits, bias)
    weights = _DEQUANT_BYTES_PER_WEIGHT[path, bits] * n * k + 2 * n + (2 * n if bias else 0)
    return weights + 2 * m * k + 2 * m * n


def step_bytes(cfg, path: str, batch: int = 1) -> float:
    """Bytes the linears move in one decode step of `batch` sequences (weights read per step)."""
    return sum(call_bytes(path, batch, n, k, bits, bias) for n, k, bits, bias in linear_shapes(cfg))


def table(models: dict, bandwidth: float = T4_BANDWIDTH) -> str:
    """A markdown table: per model and path, bytes per step and the tok/s bound at batch 1 and 8."""
    rows = ["| model | path | GB per decode step | bytes per weight | tok/s bound, 1 stream | "
            "tok/s bound, 8 streams |", "|---|---|--:|--:|--:|--:|"]
    for name, cfg in models.items():
        weights = sum(n * k for n, k, _, _ in linear_shapes(cfg))
        for path in PATHS:
            one, eight = step_bytes(cfg, path, 1), step_bytes(cfg, path, 8)
            rows.append(f"| {name} | {path} | {one / 1e9:.2f} | {one / weights:.2f} | "
                        f"{bandwidth / one:.1f} | {8 * bandwidth / eight:.0f} |")
    return "\n".join(rows)
