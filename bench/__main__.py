"""``python -m bench``: our ChatGLM2-6B engine vs. chatglm.cpp 0.4.2 on this CPU.

    python -m bench                  # full ChatGLM2-6B shapes (28 layers), < 30 min
    python -m bench --small          # 4 layers, same widths, a few minutes
    python -m bench --json           # last stdout line is one JSON object
    python -m bench --threads 2

Both sides use random weights of the real shapes (speed does not depend on values).
The peer side builds chatglm-cpp once (12-18 min, cached in ~/.cache/glm-bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from . import chatglm_cpp
from .bandwidth import measure_bandwidth_subprocess


# =============================================================================
# OUR ENGINE -- TO BE FILLED IN BY THE glm/ TEAM
# =============================================================================
def measure_ours(args) -> dict | None:
    """Measure our engine (glm/) the same way chatglm.cpp is measured; None = not yet.

    TODO(glm team): glm.load a random full-size int4 checkpoint (args.layers layers,
    hidden 4096, 32 heads, 2 kv groups, ffn 13696, vocab 65024), preferably in a
    subprocess so peak RSS is its own, with args.threads threads, random token ids
    (< 64789), exactly the same workload as chatglm_cpp.measure():
      * decode 128 new tokens after a 16-token prompt (batch 1)
      * prefill a 512-token prompt, then decode 32 tokens at ~512 context
      * batch 8: 8 sequences decoded together
    If args.nice < 0, start the measuring subprocess with
    preexec_fn=lambda: chatglm_cpp.raise_priority(args.nice), like the peer side.
    Return a dict with (at least) these keys; everything else is passed through:
        decode_tok_s          batch-1 decode tokens/s (16-token prompt, 128 new)
        decode_ctx512_tok_s   batch-1 decode tokens/s at ~512 context
        prefill_tok_s         512-token prompt / prefill seconds
        batch8_tok_s          aggregate tokens/s of 8 sequences decoded together
        load_s                load time
        peak_rss_bytes        peak RSS of the measuring process
        checkpoint_bytes      size on disk of the int4 checkpoint that was loaded
        streamed_weight_bytes weight bytes read per decode step (for the roofline)
    """
    return None


# =============================================================================


def _ratio(a, b):
    try:
        return None if a is None or b in (None, 0) else round(a / b, 3)
    except TypeError:
        return None


def summarize(ours: dict | None, peer: dict, bandwidth_gbs: float | None) -> dict:
    """Headline figures. Peer reference = chatglm.cpp q4_0 (our engine is int4)."""
    ref = peer.get("q4_0") or next(iter(peer.values()), None) or {}
    o = ours or {}
    batch8 = o.get("batch8_speedup")
    if batch8 is None:
        batch8 = _ratio(o.get("batch8_tok_s"), o.get("decode_tok_s"))
    roof = None
    if o.get("decode_tok_s") and o.get("streamed_weight_bytes") and bandwidth_gbs:
        roof = round(o["decode_tok_s"] * o["streamed_weight_bytes"] / (bandwidth_gbs * 1e9), 3)
    return dict(
        decode_tok_s=o.get("decode_tok_s"),
        decode_vs_chatglm_cpp=_ratio(o.get("decode_tok_s"), ref.get("decode_tok_s")),
        prefill_vs_chatglm_cpp=_ratio(o.get("prefill_tok_s"), ref.get("prefill_tok_s")),
        batch8_speedup=batch8,
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
    ("batch8_tok_s", "batch 8 aggregate tok/s"),
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
    args = ap.parse_args(argv)
    args.layers = 4 if args.small else 28
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

    quiet()
    log("measuring our engine ...")
    ours = measure_ours(args)
    if ours is None:
        log("measure_ours() returned None (our engine's side is not wired up yet)")
    elif bw and ours.get("decode_tok_s") and ours.get("streamed_weight_bytes"):
        ours.setdefault("roofline_fraction",
                        round(ours["decode_tok_s"] * ours["streamed_weight_bytes"] / (bw * 1e9), 3))

    cols = {f"chatglm.cpp {dt}": r for dt, r in peer.items()}
    cols["ours"] = ours
    print(f"\nChatGLM2-6B shapes, {args.layers} layers, {args.threads} threads, random weights; "
          f"read bandwidth {bw} GB/s; {platform.processor() or platform.machine()}")
    print_table(cols)
    summary = summarize(ours, peer, bw)
    print("\n" + "  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    result = dict(summary, layers=args.layers, small=args.small, threads=args.threads, bandwidth_gb_s=bw,
                  bandwidth_median_gb_s=bw_median,
                  chatglm_cpp=peer, ours=ours, elapsed_s=round(time.time() - t_start, 1))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
