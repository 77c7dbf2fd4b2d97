"""Benchmark of the fused CPU kernels (glm/cpu/csrc/linear.cpp, tiles.cpp) at full ChatGLM2-6B shapes.

Run:  python bench/kernels.py [--threads 2] [--quick]

Prints
  * measured memory bandwidth (large-tensor sum and copy, same thread count),
  * int4_linear per layer shape and M: us per call and GB/s of weight bytes streamed,
    for fp32 and bf16 activations, next to torch's own options measured in the same run:
    aten._weight_int4pack_mm_for_cpu (groupsize 128, bf16 x), torch._weight_int8pack_mm and
    plain bf16 torch.mm with a dense weight,
  * a whole decode step worth of weights (28 layers x 4 quantized linears + the fp16 output
    layer, distinct weight memory, so nothing is served from cache): ms per token.
Weights rotate through enough copies (>= 4x L3) that every call streams from DRAM.

--baseline REV builds the kernels of git revision REV as a second extension and times the decode
step of both in one process, alternating calls, so a kernel change is measured against its
parent under the same machine load (--layers N shrinks the step where memory is short).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from glm.cpu import kernels  # noqa: E402

LAYERS = {  # name: (N, K, has_bias)
    "qkv": (4608, 4096, True),
    "dense": (4096, 4096, False),
    "h_to_4h": (27392, 4096, False),
    "4h_to_h": (4096, 13696, False),
}
OUT_LAYER = (65024, 4096)
N_LAYERS = 28
ROTATE_BYTES = 160 << 20  # > 4x the 32 MiB L3


def _timed_calls(fn, args_list, clock, min_time, min_reps):
    """Per-call durations by `clock`, after two warm-up calls: at least min_reps calls and min_time
    seconds of wall time, cycling through args_list (weight copies)."""
    for a in args_list[:2]:
        fn(*a)
    times = []
    t_end = time.perf_counter() + min_time
    i = 0
    while len(times) < min_reps or time.perf_counter() < t_end:
        a = args_list[i % len(args_list)]
        t0 = clock()
        fn(*a)
        times.append(clock() - t0)
        i += 1
    return times


def bench(fn, args_list, min_time=0.3, min_reps=5):
    """Seconds per call: min over >= min_reps calls (best case, least disturbed by other load on
    the machine; the median is kept in LAST_MEDIAN); cycles through args_list (weight copies)."""
    global LAST_MEDIAN
    times = _timed_calls(fn, args_list, time.perf_counter, min_time, min_reps)
    LAST_MEDIAN = statistics.median(times)
    return min(times)


LAST_MEDIAN = 0.0


def copies(make, nbytes):
    n = max(2, -(-ROTATE_BYTES // max(1, nbytes)))
    first = make()
    return [first] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in first) for _ in range(n - 1)]


def mem_bandwidth():
    """Read GB/s via a 1 GiB fp32 sum and via a 1 GiB fp32 matrix-vector product (MKL sgemv,
    the same streaming pattern as decode), read+write GB/s via a 1 GiB copy; best of >= 8 runs."""
    a = torch.empty(1 << 28, dtype=torch.float32).uniform_()  # 1 GiB
    b = torch.empty_like(a)
    b.copy_(a)
    nb = a.numel() * 4
    v = torch.randn(4096)
    mat = a.view(-1, 4096)
    t_sum = bench(lambda: a.sum(), [()], min_time=1.5, min_reps=8)
    t_mv = bench(lambda: torch.mv(mat, v), [()], min_time=1.5, min_reps=8)
    t_copy = bench(lambda: b.copy_(a), [()], min_time=1.5, min_reps=8)
    del a, b, mat
    return nb / t_sum / 1e9, nb / t_mv / 1e9, 2 * nb / t_copy / 1e9


def int4_weights(N, K, g):
    q = torch.randint(-128, 128, (N, K // 2), dtype=torch.int8, generator=g)
    scale = (torch.rand(N, generator=g) * 0.004 + 0.001).half()
    return q, scale


def torch_int4pack(N, K, g, groupsize=128):
    w = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
    sz = torch.ones(K // groupsize, N, 2, dtype=torch.bfloat16)
    sz[..., 0] = 0.01
    sz[..., 1] = 0.0
    return packed, sz


def fmt_row(cols, widths):
    return " ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def cpu_time(fn, args_list, min_time=0.4, min_reps=8):
    """CPU seconds per call of the calling thread (1 torch thread): min over repeated calls. CPU
    time excludes time descheduled by other jobs on a shared machine (DRAM stalls still count)."""
    return min(_timed_calls(fn, args_list, time.thread_time, min_time, min_reps))


def cpu_table(mod, Ms):
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, kernel ISA {mod.isa()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("int4_linear CPU time per call, us (min over calls; weights rotate through DRAM)")
    print(fmt_row(["layer", "M", "fp32 x", "bf16 x"], [9, 3, 9, 9]))
    tot = {}
    for name, (N, K, has_bias) in LAYERS.items():
        ws = copies(lambda: int4_weights(N, K, g), N * K // 2)
        bias = torch.randn(N).half() if has_bias else None
        for M in Ms:
            x32 = torch.randn(M, K)
            xbf = x32.bfloat16()
            t32 = cpu_time(lambda q, s: mod.int4_linear(x32, q, s, bias), ws)
            tb = cpu_time(lambda q, s: mod.int4_linear(xbf, q, s, bias), ws)
            a, b = tot.get(M, (0.0, 0.0))
            tot[M] = (a + t32, b + tb)
            print(fmt_row([name, M, f"{t32 * 1e6:.0f}", f"{tb * 1e6:.0f}"], [9, 3, 9, 9]), flush=True)
        del ws
    print("sum of the 4 layers (one transformer layer), us:")
    for M in Ms:
        print(fmt_row(["layer", M, f"{tot[M][0] * 1e6:.0f}", f"{tot[M][1] * 1e6:.0f}"], [9, 3, 9, 9]))
    return 0


def baseline_module(rev: str):
    """The kernels of git revision `rev`, built (cached per revision) as a second extension."""
    from torch.utils import cpp_extension

    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    src = Path(tempfile.gettempdir()) / f"glm-kernels-{sha[:12]}"
    names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", sha, "glm/csrc/", "glm/cpu/csrc/"], check=True,
                           capture_output=True, text=True).stdout.split()
    (src / "build").mkdir(parents=True, exist_ok=True)
    for name in names:
        blob = subprocess.run(["git", "-C", str(root), "show", f"{sha}:{name}"], check=True, capture_output=True).stdout
        (src / Path(name).name).write_bytes(blob)
    sources = sorted(str(src / Path(n).name) for n in names if n.endswith(".cpp"))
    return cpp_extension.load(name=f"glm_kernels_{sha[:12]}", sources=sources, extra_cflags=list(kernels.CFLAGS),
                              build_directory=str(src / "build"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer M values, no torch comparisons")
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--step-only", action="store_true", help="only the whole decode step")
    ap.add_argument("--baseline", metavar="REV", help="also time the decode step with git revision REV's kernels")
    ap.add_argument("--layers", type=int, default=N_LAYERS, help="layers in the decode step")
    ap.add_argument("--cpu", action="store_true",
                    help="only int4_linear CPU time per call (1 thread, thread_time) per layer and M")
    args = ap.parse_args()
    if args.cpu:
        args.threads = 1
    torch.set_num_threads(args.threads)
    mod = kernels.get()
    if mod is None:
        print("extension unavailable:", kernels.error())
        return 1
    mods = [("ours", mod)]
    if args.baseline:
        mods.append((args.baseline, baseline_module(args.baseline)))
        mods[1][1].set_isa(mod.isa())
    Ms = [int(m) for m in args.ms.split(",")]
    if args.cpu:
        return cpu_table(mod, Ms)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernel ISA {mod.isa()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("times: min over repeated calls (median in [brackets] where shown)")

    if not args.step_only:  # the bandwidth is the reference of the per-layer table only
        rd_sum, rd_mv, cp = mem_bandwidth()
        rd = max(rd_sum, rd_mv)
        print(f"memory bandwidth ({args.threads} threads): sum (read) {rd_sum:.1f} GB/s, "
              f"fp32 mv (read) {rd_mv:.1f} GB/s, copy (read+write) {cp:.1f} GB/s -> read ref {rd:.1f} GB/s")
        print()

    widths = [9, 3, 11, 7, 8, 11, 7, 8, 10, 10, 10]
    print("int4_linear: us per call (GB/s of weight bytes); torch options at the same shape")
    print(fmt_row(["layer", "M", "ours fp32x", "GB/s", "[med]", "ours bf16x", "GB/s", "[med]",
                   "t.int4pk", "t.int8pk", "t.bf16mm"], widths))
    results = {}
    for name, (N, K, has_bias) in ([] if args.step_only else LAYERS.items()):
        wbytes = N * K // 2
        ws = copies(lambda: int4_weights(N, K, g), wbytes)
        bias = torch.randn(N).half() if has_bias else None
        if not args.quick:
            t4 = copies(lambda: torch_int4pack(N, K, g), wbytes)
            t8 = copies(lambda: (torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g),
                                 torch.rand(N, dtype=torch.bfloat16)), N * K)
            tbf = copies(lambda: (torch.randn(N, K, dtype=torch.bfloat16, generator=g),), 2 * N * K)
        for M in Ms:
            x32 = torch.randn(M, K)
            xbf = x32.bfloat16()
            t32 = bench(lambda q, s: mod.int4_linear(x32, q, s, bias), ws)
            m32 = LAST_MEDIAN
            tb = bench(lambda q, s: mod.int4_linear(xbf, q, s, bias), ws)
            mb = LAST_MEDIAN
            results[(name, M)] = (t32, tb)
            row = [name, M, f"{t32 * 1e6:.0f}", f"({wbytes / t32 / 1e9:.1f})", f"[{m32 * 1e6:.0f}]",
                   f"{tb * 1e6:.0f}", f"({wbytes / tb / 1e9:.1f})", f"[{mb * 1e6:.0f}]"]
            if not args.quick:
                ta = bench(lambda p, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(xbf, p, 128, sz), t4)
                tc = bench(lambda w, s: torch._weight_int8pack_mm(xbf, w, s), t8)
                td = bench(lambda w: torch.mm(xbf, w.t()), tbf)
                row += [f"{ta * 1e6:.0f}", f"{tc * 1e6:.0f}", f"{td * 1e6:.0f}"]
            print(fmt_row(row, widths), flush=True)
        del ws
        if not args.quick:
            del t4, t8, tbf
    print("  (torch int4pk: bf16 x, groupsize 128, 0.5 B/weight + scales; int8pk: 1 B/weight;"
          " bf16mm: 2 B/weight)")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    print()
    if 1 in Ms and results:
        print(f"int4_linear M=1 weight streaming as % of the measured read bandwidth ({rd:.1f} GB/s):")
        for name, (N, K, _) in LAYERS.items():
            wb = N * K // 2
            t32, tb = results[(name, 1)]
            print(f"  {name:8s} fp32 x {100 * wb / t32 / 1e9 / rd:5.0f}%   bf16 x {100 * wb / tb / 1e9 / rd:5.0f}%")
        print()
    if 1 in Ms and 8 in Ms and results:
        print("M=8 / M=1 time ratio (int4_linear):")
        for name in LAYERS:
            r32 = results[(name, 8)][0] / results[(name, 1)][0]
            rb = results[(name, 8)][1] / results[(name, 1)][1]
            print(f"  {name:8s} fp32 x {r32:.2f}   bf16 x {rb:.2f}")
        print()
        print("per-token estimate from the per-call minima above "
              "(28 x [qkv + dense + h_to_4h + 4h_to_h] int4 + fp16 output layer):")
        out_w = (torch.randn(*OUT_LAYER, generator=g) * 0.02).half()
        outs = copies(lambda: (out_w,), out_w.numel() * 2)[:1]
        for M in (1, 8):
            for i, xdtype in enumerate((torch.float32, torch.bfloat16)):
                x = torch.randn(M, OUT_LAYER[1]).to(xdtype)
                t_out = bench(lambda w: mod.half_linear(x, w, None), outs)
                t_layers = N_LAYERS * sum(results[(name, M)][i] for name in LAYERS)
                print(f"  M={M} x {str(xdtype).replace('torch.', ''):8s}: {1e3 * (t_layers + t_out):6.1f} ms "
                      f"(layers {1e3 * t_layers:.1f} + output layer {1e3 * t_out:.1f})")
        del out_w, outs
        print()

    # whole decode step over distinct memory: N layers x 4 int4 linears + fp16 output layer
    print(f"decode step ({args.layers} layers of distinct int4 weights + fp16 output layer 65024x4096):")
    layer0 = {name: int4_weights(N, K, g) for name, (N, K, _) in LAYERS.items()}
    layers = [layer0] + [{k: (q.clone(), s.clone()) for k, (q, s) in layer0.items()}
                         for _ in range(args.layers - 1)]
    qkv_bias = torch.randn(LAYERS["qkv"][0]).half()
    out_w = (torch.randn(*OUT_LAYER, generator=g) * 0.02).half()
    total_bytes = sum(q.numel() for lay in layers for q, _ in lay.values()) + out_w.numel() * 2
    # x modes: fp32, bf16, and fp32 with int8 activations (int4_linear_i8, the int8act load option)
    for xmode in ("float32", "bfloat16", "int8act"):
        for M in (1, 8):
            xdtype = torch.bfloat16 if xmode == "bfloat16" else torch.float32
            xs = {n: torch.randn(M, K).to(xdtype) for n, (_, K, _) in LAYERS.items()}

            def step(m):
                linear = m.int4_linear_i8 if xmode == "int8act" else m.int4_linear
                for lay in layers:
                    for n, (q, s) in lay.items():
                        linear(xs[n], q, s, qkv_bias if n == "qkv" else None)
                m.half_linear(xs["qkv"], out_w, None)

            ts = {name: [] for name, _ in mods}
            cs = {name: [] for name, _ in mods}
            for m in dict(mods).values():
                step(m)
            for i in range(5 if len(mods) == 1 else 9):
                for name, m in mods if i % 2 == 0 else mods[::-1]:  # alternate who goes first
                    c0, t0 = time.thread_time(), time.perf_counter()
                    step(m)
                    ts[name].append(time.perf_counter() - t0)
                    cs[name].append(time.thread_time() - c0)
            t_out = bench(lambda: mod.half_linear(xs["qkv"], out_w, None), [()])
            for name, _ in mods:
                t = min(ts[name])
                cpu_note = ""
                if torch.get_num_threads() == 1:  # CPU time excludes time descheduled by other load
                    cpu_note = f" [CPU time {min(cs[name]) * 1e3:.1f} ms]"
                label = "" if len(mods) == 1 else f"{name:>8s} "
                print(f"  {label}x {xmode:8s} M={M}: {t * 1e3:.1f} ms per step "
                      f"[median {statistics.median(ts[name]) * 1e3:.1f}]{cpu_note} "
                      f"({total_bytes / t / 1e9:.1f} GB/s over {total_bytes / 1e9:.2f} GB)", flush=True)
            if len(mods) == 2:
                (a, ta), (b, tb) = ts.items()
                print(f"    {a} / {b}: {min(ta) / min(tb):.3f} (min), {statistics.median(ta) / statistics.median(tb):.3f} (median)")
            print(f"    of which output layer {t_out * 1e3:.1f} ms ({out_w.numel() * 2 / t_out / 1e9:.1f} GB/s)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
