"""Every Triton kernel on fixed inputs: its outputs on the device against the same kernels in Triton's
interpreter (a subprocess with TRITON_INTERPRET=1, on CPU tensors), and the invariants the design
states bit for bit on the device itself.

The design promises bitwise equality only within one device: a row of the decode GEMV is the same
alone or beside other rows (glm/gpu/linear.py), exact_rows prefill rows are decode rows, and a row of
row_attention does not depend on the other rows of its call (glm/gpu/attention.py). Between the
device and the interpreter (numpy arithmetic, another reduction order) the outputs must agree to
fp16 rounding; whether they are also bitwise equal is reported, not required.

    python -m bench.gpu_check.kernels OUT.pt full|small    # the interpreter side: every case on CPU tensors
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 2e-2  # relative to the largest value: fp16 rounding, far below any real bug (glm.gpu.selftest)
# Shapes: a partial output block and several K steps of each weight format; attention over several key
# blocks. "small" keeps the same code paths within the interpreter's speed (the --interpret run).
SIZES = {"full": dict(n=80, k=512, rows=20, dim=4096, ffn=1000, head_dim=64, lengths=(300, 200), starts=(277, 130)),
         "small": dict(n=40, k=256, rows=10, dim=256, ffn=100, head_dim=32, lengths=(40, 30), starts=(37, 12))}


def _inputs(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half()


def _weights(bits: int, n: int, k: int):
    from glm.quant import quantize
    w = _inputs(10 + bits, n, k) * 0.05
    return (w, None) if bits == 16 else quantize(w, bits)


def _linear(device, size: str, bits: int, x: torch.Tensor, exact_rows: bool = False) -> torch.Tensor:
    from glm.gpu import linear
    n = SIZES[size]["n"]
    w, scale = _weights(bits, n, x.shape[1])
    bias = _inputs(7, n).to(device)
    if bits == 16:
        return linear.half_linear(x.to(device), w.to(device), bias, exact_rows=exact_rows)
    return linear.quant_linear(x.to(device), w.to(device), scale.to(device), bias, bits, exact_rows=exact_rows)


def linear_cases(device, size: str) -> dict[str, torch.Tensor]:
    out, s = {}, SIZES[size]
    for bits in (4, 8, 16):
        for rows in (1, 8, s["rows"]):  # the decode GEMV (<= 8 rows) and the prefill GEMM
            out[f"linear_int{bits}_rows{rows}" if bits < 16 else f"linear_fp16_rows{rows}"] = \
                _linear(device, size, bits, _inputs(rows, rows, s["k"]))
    return out


def pointwise_cases(device, size: str) -> dict[str, torch.Tensor]:
    from glm.gpu.pointwise import rms_norm, swiglu
    dim, ffn = SIZES[size]["dim"], SIZES[size]["ffn"]
    x = _inputs(20, 5, dim).to(device)
    return {"rms_norm": rms_norm(x, (_inputs(21, dim).abs() + 0.5).to(device), 1e-5),
            "swiglu": swiglu(_inputs(22, 5, 2 * ffn).to(device))}


def _attention_setup(device, size: str):
    """Two sequences of different lengths in one pool (ChatGLM2's grouped heads, rotary on)."""
    from glm.config import ChatGLMConfig
    from glm.kvpool import KVPool
    from glm.model import rotary_angles

    s = SIZES[size]
    hd, (n0, n1) = s["head_dim"], s["lengths"]
    cfg = ChatGLMConfig(num_layers=2, hidden_size=4 * hd, num_heads=4, kv_heads=2, head_dim=hd,
                        ffn_hidden_size=32, vocab_size=8, seq_length=512, max_context=512)
    pool = KVPool(cfg, n0 + n1 + 13, device, torch.float16)
    pool.k.copy_(_inputs(30, *pool.k.shape))
    pool.v.copy_(_inputs(31, *pool.v.shape))
    caches, starts = [pool.cache(3, n0), pool.cache(n0 + 10, n1)], list(s["starts"])
    q = _inputs(32, 2, cfg.num_heads, cfg.head_dim).to(device)
    k = _inputs(33, 2, cfg.kv_heads, cfg.head_dim).to(device)
    v = _inputs(34, 2, cfg.kv_heads, cfg.head_dim).to(device)
    cos, sin = rotary_angles(cfg, torch.tensor(starts, device=device)[:, None])
    return cfg, pool, caches, starts, q, k, v, cos[:, 0], sin[:, 0]


def _row_attention(device, size: str, rows: list[int]):
    from glm.gpu.attention import row_attention
    from glm.gpu.ops import row_plan
    cfg, pool, caches, starts, q, k, v, cos, sin = _attention_setup(device, size)
    pick = torch.tensor(rows, device=device)
    plan = row_plan([caches[r] for r in rows], [starts[r] for r in rows], 1, device)
    out = row_attention(q[pick], k[pick], v[pick], *plan, 1, cfg.head_dim ** -0.5, cos[pick], sin[pick])
    written = torch.stack([caches[r].k[1, :, starts[r]] for r in rows])
    return out, written


def attention_cases(device, size: str) -> dict[str, torch.Tensor]:
    out, written = _row_attention(device, size, [0, 1])
    return {"row_attention": out, "row_attention_cache_write": written}


def all_cases(device, size: str) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {k: v.cpu() for f in (linear_cases, pointwise_cases, attention_cases) for k, v in f(device, size).items()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1))


def interpreter_outputs(path: Path, size: str, timeout_s: float) -> dict[str, torch.Tensor]:
    """all_cases on CPU tensors in a subprocess under TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check.kernels", str(path), size], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the interpreter side failed: {(proc.stderr or proc.stdout)[-1500:]}")
    return torch.load(path, weights_only=True)


def compare_with_interpreter(device, size: str, workdir: Path, timeout_s: float):
    """(status, detail, figures): per case the max relative error and whether the bits agree."""
    want = interpreter_outputs(workdir / "interpreter-kernels.pt", size, timeout_s)
    got = all_cases(device, size)
    figures, bad = {}, []
    for name, w in want.items():
        g = got[name]
        err = relative_error(g, w) if g.shape == w.shape else float("inf")
        figures[name] = {"max_rel_error": float(f"{err:.3g}"), "bitwise": bool(g.shape == w.shape and torch.equal(g, w))}
        if not err <= TOLERANCE:
            bad.append(f"{name} ({err:.3g})")
    if bad:
        return "fail", f"above {TOLERANCE} relative error: {', '.join(bad)}", figures
    exact = sum(f["bitwise"] for f in figures.values())
    return "pass", f"{len(figures)} kernel cases within {TOLERANCE}; {exact} of them bitwise equal", figures


def bitwise_invariants(device, size: str):
    """(status, detail, figures): the design's bit-for-bit promises, checked on the device."""
    results, s = {}, SIZES[size]
    rows = s["rows"]
    with torch.inference_mode():
        for bits in (4, 8, 16):
            x = _inputs(40 + bits, rows, s["k"])
            alone = torch.cat([_linear(device, size, bits, x[i:i + 1]) for i in range(rows)])
            batched = torch.cat([_linear(device, size, bits, x[i:i + 8]) for i in range(0, rows, 8)])
            name = f"int{bits}" if bits < 16 else "fp16"
            results[f"gemv_{name}_row_alone_eq_in_batch"] = torch.equal(alone, batched)
            exact = _linear(device, size, bits, x, exact_rows=True)
            results[f"exact_rows_{name}_eq_decode_rows"] = torch.equal(exact, alone)
        together, written = _row_attention(device, size, [0, 1])
        alone = [_row_attention(device, size, [r]) for r in (0, 1)]
        results["row_attention_row_alone_eq_in_batch"] = torch.equal(together, torch.cat([a[0] for a in alone]))
        results["row_attention_cache_write_alone_eq_in_batch"] = torch.equal(written, torch.cat([a[1] for a in alone]))
    failed = [k for k, ok in results.items() if not ok]
    if failed:
        return "fail", "not bitwise equal: " + ", ".join(failed), results
    return "pass", f"{len(results)} bitwise invariants hold", results


# The tensor-core GEMV's cases: ChatGLM2-6B's QKV and FFN-down shapes (a partial last K step).
MMA_SHAPES = ((4608, 4096), (4096, 13696))
MMA_ROWS = (1, 2, 4, 8, 20)  # decode buckets and exact rows in blocks of 8


def mma_gemv(device):
    """(status, detail, figures): the tensor-core decode GEMV (glm.gpu.mma) against the FMA GEMV on
    the device, int4 and int8 at each bucket's rows: max relative difference, each row's bits alone
    = among the rows, and both kernels' weight streaming rate at 8 rows. Under the interpreter: that
    it is never selected there (its inline PTX needs a device)."""
    from glm.gpu import interpreting, linear, mma, selftest
    if interpreting() or device.type != "cuda":
        try:
            linear.set_decode_variant("mma")
        except RuntimeError as e:
            return "pass", f"interpreter: the tensor-core GEMV cannot be selected ({e})", {}
        linear.set_decode_variant("fma")
        return "fail", "the interpreter accepted the tensor-core GEMV", {}
    before, figures, bad = linear.decode_variant(), {}, []
    try:
        with torch.inference_mode():
            for bits in (4, 8):
                for n, k in MMA_SHAPES:
                    w, scale = _weights(bits, n, k)
                    w, scale = w.to(device), scale.to(device)
                    bias = _inputs(8, n).to(device)
                    if not mma.takes(w, bits):
                        return "fail", f"the tensor-core GEMV does not take int{bits} {n}x{k} on this device", {}
                    x = _inputs(41, max(MMA_ROWS), k).to(device)
                    run = lambda variant, xs: _with_variant(linear, variant, xs, w, scale, bias, bits)  # noqa: E731
                    alone = [run("mma", x[i:i + 1]) for i in range(x.shape[0])]
                    for rows in MMA_ROWS:
                        got, want = run("mma", x[:rows]), run("fma", x[:rows])
                        err = relative_error(got, want)
                        invariant = all(torch.equal(got[i], alone[i][0]) for i in range(rows))
                        figures[f"int{bits}_{n}x{k}_rows{rows}"] = {"max_rel_error_vs_fma": float(f"{err:.3g}"),
                                                                    "row_alone_eq_in_batch": invariant}
                        if not err <= selftest.TOLERANCE or not invariant:
                            bad.append(f"int{bits} {n}x{k} rows {rows} ({err:.3g}, invariant {invariant})")
                    for variant in ("fma", "mma"):
                        seconds = _time(lambda: run(variant, x[:8]))
                        figures[f"int{bits}_{n}x{k}_rows8_{variant}_weight_gb_s"] = round(w.numel() / seconds / 1e9, 1)
    finally:
        linear.set_decode_variant(before)
    if bad:
        return "fail", "tensor-core GEMV vs FMA GEMV: " + "; ".join(bad), figures
    return "pass", (f"{len(figures)} figures: tensor-core GEMV within {selftest.TOLERANCE} of the FMA GEMV, "
                    "each row's bits the same alone and among the rows"), figures


def _with_variant(linear, variant, x, w, scale, bias, bits):
    linear.set_decode_variant(variant)
    return linear.quant_linear(x, w, scale, bias, bits, exact_rows=True)


def _time(fn, repeat: int = 20) -> float:
    """Seconds per call on the device (CUDA events, after a warm-up call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def main(argv=None) -> int:
    out, size = (argv or sys.argv[1:])[:2]
    torch.save(all_cases(torch.device("cpu"), size), Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
