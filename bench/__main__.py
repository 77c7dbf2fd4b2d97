"""``python -m bench``: our ChatGLM2-6B engine vs. chatglm.cpp 0.4.2 on this CPU.

    python -m bench                  # full ChatGLM2-6B shapes (28 layers), < 30 min
    python -m bench --small          # 4 layers, same widths, a few minutes
    python -m bench --json           # last stdout line is one JSON object
    python -m bench --threads 2
    python -m bench --device cuda    # the Triton backend on a GPU (bench/gpu.py; --tiny with
                                     # --device interpret runs it here under the Triton interpreter)

Both sides use random weights of the real shapes (speed does not depend on values).
The peer side builds chatglm-cpp once (12-18 min, cached in ~/.cache/glm-bench/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from . import chatglm_cpp
from .chat import measure_chat
from . import ours as ours_side
from .bandwidth import measure_bandwidth_subprocess


def measure_ours(args, dtype: str = "float32") -> dict | None:
    """Our engine (glm/) on the same workload as chatglm_cpp.measure(), in a subprocess (bench/ours.py)."""
    preexec = (lambda: chatglm_cpp.raise_priority(args.nice)) if args.nice < 0 else None
    return ours_side.measure(args.layers, threads=args.threads, dtype=dtype, preexec_fn=preexec)


def _ratio(a, b):
    try:
        return None if a is None or b in (None, 0) else round(a / b, 3)
    except TypeError:
        return None


def summarize(ours: dict | None, peer: dict, bandwidth_gbs: float | None) -> dict:
    """Headline figures. Peer reference = chatglm.cpp q4_0 (our engine is int4)."""
    ref = peer.get("q4_0") or next(iter(peer.values()), None) or {}
    o = ours or {}
    roof = None
    if o.get("decode_tok_s") and o.get("streamed_weight_bytes") and bandwidth_gbs:
        roof = round(o["decode_tok_s"] * o["streamed_weight_bytes"] / (bandwidth_gbs * 1e9), 3)
    return dict(
        decode_tok_s=o.get("decode_tok_s"),
        decode_vs_chatglm_cpp=_ratio(o.get("decode_tok_s"), ref.get("decode_tok_s")),
        prefill_vs_chatglm_cpp=_ratio(o.get("prefill_tok_s"), ref.get("prefill_tok_s")),
        batch8_speedup=o.get("batch8_speedup"),  # measure(): over the best single-sequence figure
        peak_rss_vs_checkpoint=_ratio(o.get("peak_rss_bytes"), o.get("checkpoint_bytes")),
        roofline_fraction=roof,
    )


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, int) and v > 10_000_000:
        return f"{v / 1e9:.2f} GB"
    return str(v)


ROWS = [
    ("load_s", "load (s)"),
    ("first_prefill_s", "first forward, 16 tok (s)"),
    ("decode_tok_s", "decode tok/s (16 prompt, 128 new)"),
    ("decode_ms_median", "decode ms/token (median)"),
    ("decode_tok_s_from_median", "decode tok/s from median step"),
    ("decode_ctx512_tok_s", "decode tok/s @ ~512 ctx"),
    ("prefill_s", "prefill 512 tok (s)"),
    ("prefill_tok_s", "prefill tok/s (512)"),
    ("batch1_tok_s", "batch 1 aggregate tok/s"),
    ("batch2_tok_s", "batch 2 aggregate tok/s"),
    ("batch4_tok_s", "batch 4 aggregate tok/s"),
    ("batch8_tok_s", "batch 8 aggregate tok/s"),
    ("batch8_speedup", "batch 8 / best single-sequence"),
    *[(f"engine{b}_{k}", f"engine, {b} streams: {label}") for b in (1, 2, 4, 8)
      for k, label in (("tok_s", "aggregate tok/s"), ("ttft_median_s", "TTFT median (s)"),
                       ("ttft_max_s", "TTFT max (s)"))],
    ("peak_rss_bytes", "peak RSS"),
    ("model_bytes", "model file"),
    ("checkpoint_bytes", "checkpoint"),
    ("streamed_weight_bytes", "weight bytes / token"),
    ("roofline_fraction", "roofline fraction"),
    ("cpu_util_decode", "CPU util during decode"),
    ("max_threads_seen", "max threads seen"),
    ("other_load_cores", "other processes' load (cores)"),
]


def print_table(cols: dict[str, dict], out=sys.stdout) -> None:
    names = list(cols)
    w0 = max(len(label) for _, label in ROWS)
    ws = [max(12, len(n)) for n in names]
    print(" " * w0 + " | " + " | ".join(n.rjust(w) for n, w in zip(names, ws)), file=out)
    print("-" * (w0 + sum(w + 3 for w in ws)), file=out)
    for key, label in ROWS:
        vals = [_fmt((cols[n] or {}).get(key)) for n in names]
        if all(v == "-" for v in vals):
            continue
        print(label.ljust(w0) + " | " + " | ".join(v.rjust(w) for v, w in zip(vals, ws)), file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="4 layers instead of 28 (same widths)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-dtypes", default="q4_0,q8_0",
                    help="chatglm.cpp formats to measure (comma list of q4_0,q8_0; '' to skip the peer)")
    ap.add_argument("--no-bandwidth", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each measurement wait up to this many seconds for other processes "
                         "to go idle (the box is shared; ggml is very sensitive to contention)")
    ap.add_argument("--nice", type=int, default=0,
                    help="priority boost for the measuring subprocesses, e.g. -10 (root; new session + "
                         "autogroup nice, since autogroup scheduling makes plain nice useless against "
                         "other sessions on a shared box)")
    ap.add_argument("--cold-load", action="store_true",
                    help="evict the chatglm.cpp model file from the page cache before measuring, so "
                         "load + first forward include reading it from disk")
    ap.add_argument("--ours-dtypes", default="float32,bfloat16,int8act",
                    help="activation modes of our engine to measure: float32 (the exact CPU default, "
                         "the headline when first), bfloat16, int8act (float32 with the opt-in int8 "
                         "activations of glm.load(int8_activations=True))")
    ap.add_argument("--no-chat", action="store_true",
                    help="skip the 4-round chat (time to first token per round with and without the prefix cache)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "interpret"),
                    help="cuda: the Triton backend on the GPU (bench/gpu.py); interpret: the same on "
                         "CPU tensors under TRITON_INTERPRET=1 (with --tiny), to check its logic")
    ap.add_argument("--tiny", action="store_true", help="with --device cuda/interpret: the 2-layer tiny checkpoint")
    ap.add_argument("--bandwidth-gbs", type=float, default=320.0,
                    help="with --device cuda/interpret: device bandwidth for the roofline (T4: 320)")
    args = ap.parse_args(argv)
    args.layers = 4 if args.small else 28
    if args.device != "cpu":
        from . import gpu
        return gpu.main(args)
    t_start = time.time()

    def log(msg):
        print(f"[bench +{time.time() - t_start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    def quiet():
        if args.quiet_wait > 0:
            load = chatglm_cpp.wait_for_quiet(args.quiet_wait)
            if load >= 0.3:
                log(f"WARNING: machine still busy ({load:.2f} cores), measuring anyway")

    bw = bw_median = None
    if not args.no_bandwidth:
        quiet()
        bw_stats = measure_bandwidth_subprocess(args.threads, nice=args.nice)
        bw, bw_median = round(bw_stats["best"], 2), round(bw_stats["median"], 2)
        log(f"read bandwidth best {bw} GB/s, median {bw_median} GB/s ({args.threads} threads)")

    peer: dict[str, dict] = {}
    dtypes = [d for d in args.peer_dtypes.split(",") if d]
    if dtypes:
        try:
            site = chatglm_cpp.ensure_built()
            log(f"chatglm.cpp {chatglm_cpp.VERSION} native build: {site}")
        except Exception as e:  # keep going: our side can still be measured
            site = None
            log(f"ERROR: chatglm.cpp build failed: {e!r}")
            peer = {dt: {"error": f"build failed: {e!r}"} for dt in dtypes}
        for dt in dtypes if site else []:
            try:
                path = chatglm_cpp.ensure_model(dt, args.layers)
                quiet()
                log(f"measuring chatglm.cpp {dt} on {path.name} ...")
                r = chatglm_cpp.measure(path, threads=args.threads, site=site, nice=args.nice,
                                        cold=args.cold_load)
            except Exception as e:
                log(f"ERROR: chatglm.cpp {dt} measurement failed: {e!r}")
                peer[dt] = {"error": repr(e)[-2000:]}
                continue
            r["streamed_weight_bytes"] = chatglm_cpp.streamed_weight_bytes(dtype=dt, num_layers=args.layers)
            if bw:
                r["roofline_fraction"] = round(r["decode_tok_s"] * r["streamed_weight_bytes"] / (bw * 1e9), 3)
            peer[dt] = r
            log(f"chatglm.cpp {dt}: decode {r['decode_tok_s']} tok/s, prefill {r['prefill_tok_s']} tok/s, "
                f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB")

    runs: dict[str, dict] = {}
    for dt in [d for d in args.ours_dtypes.split(",") if d]:
        quiet()
        log(f"measuring our engine ({dt} activations) ...")
        try:
            r = measure_ours(args, dt)
        except Exception as e:
            log(f"ERROR: our engine ({dt}) failed: {e!r}")
            runs[dt] = {"error": repr(e)[-2000:]}
            continue
        if bw:
            r["roofline_fraction"] = round(r["decode_tok_s"] * r["streamed_weight_bytes"] / (bw * 1e9), 3)
        runs[dt] = r
        log(f"ours {dt}: decode {r['decode_tok_s']} tok/s, prefill {r['prefill_tok_s']} tok/s, "
            f"batch8 {r.get('batch8_tok_s')} tok/s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB")
    ours = next(iter(runs.values()), None)

    chat = None
    if not args.no_chat:
        quiet()
        log("measuring a 4-round chat (float32), with and without the prefix cache ...")
        try:
            preexec = (lambda: chatglm_cpp.raise_priority(args.nice)) if args.nice < 0 else None
            chat = measure_chat(args.layers, threads=args.threads, preexec_fn=preexec)
        except Exception as e:
            log(f"ERROR: chat measurement failed: {e!r}")
            chat = {"error": repr(e)[-2000:]}

    cols = {f"chatglm.cpp {dt}": r for dt, r in peer.items()}
    cols |= {f"ours {dt}": r for dt, r in runs.items()}
    print(f"\nChatGLM2-6B shapes, {args.layers} layers, {args.threads} threads, random weights; "
          f"read bandwidth {bw} GB/s; {platform.processor() or platform.machine()}")
    print_table(cols)
    summary = summarize(ours, peer, bw)
    modes = {dt: summarize(r, peer, bw) for dt, r in runs.items() if "error" not in r}
    print()
    for dt, sm in modes.items():
        print(f"ours {dt}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in sm.items() if k != "decode_tok_s"))
    print("\n" + "  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    for r in (chat or {}).get("rounds", []):
        print(f"chat round {r['round']}: {r['prompt_tokens']} prompt tokens, {r['cached_tokens']} cached; "
              f"TTFT {r['ttft_cached_s']} s cached, {r['ttft_uncached_s']} s uncached, "
              f"{r['ttft_new_only_s']} s for its new tokens alone; same output: {r['same_output']}")
    result = dict(summary, layers=args.layers, small=args.small, threads=args.threads, bandwidth_gb_s=bw,
                  bandwidth_median_gb_s=bw_median,
                  chatglm_cpp=peer, ours=runs, modes=modes, chat=chat, elapsed_s=round(time.time() - t_start, 1))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
