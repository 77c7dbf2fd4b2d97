"""``python -m bench --device cuda``: the Triton backend on a GPU (the T4 is the target).

    python -m bench --device cuda            # full ChatGLM2-6B shapes, random int4 weights
    python -m bench --device cuda --small    # 4 layers, same widths
    python -m bench --device interpret --tiny   # the same code on CPU tensors under TRITON_INTERPRET=1,
                                                # the 2-layer tiny checkpoint: checks the logic here

Measures decode tok/s at batch 1 and 8 through the engine as a server runs it (setup's warm-up and
CUDA graphs, the staged step, sampling on the device with temperature 0.8 and top_p 0.8 as users send
it, the ids copied back each step), prefill tok/s (the GEMM + SDPA path, then `prefill_exact_rows_tok_s`: fixed-size tensor-core chunks,
as with the prefix cache on), time to first token through the engine, a 2-round chat's round-2 time
to first token with and without the prefix cache, peak device memory, and the roofline
fraction: decode tok/s x bytes moved per step (from glm.gpu.linear.bytes_moved, the kernels' own
count, plus the KV cache read) / the device's bandwidth (320 GB/s for a T4).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

T4_BANDWIDTH = 320e9

# (prompt tokens, decode steps) per size: the tiny workload keeps the interpreter under minutes.
# ttft_prompt + chat_reply: round 2's history (the bound table's 1,300 tokens); long_prompt: its 8k row.
WORKLOADS = {"full": dict(prompt=512, decode=128, batch_decode=32, ttft_prompt=1000, chat_turn=64, chat_reply=300,
                          long_prompt=8192),
             "tiny": dict(prompt=12, decode=4, batch_decode=2, ttft_prompt=16, chat_turn=4, chat_reply=2,
                          long_prompt=40)}


def checkpoint(args) -> Path:
    from devtools.tiny import write_checkpoint
    if args.tiny:
        path = Path(tempfile.mkdtemp(prefix="glm-bench-tiny-"))
        return write_checkpoint(path, bits=4)
    from .ours import ensure_checkpoint
    return ensure_checkpoint(args.layers)


def step_bytes(model, batch: int, context: int) -> int:
    """DRAM bytes of one decode step of `batch` sequences at `context` tokens each, from the kernels'
    own counts: every linear (weights once for all rows) and each sequence's KV cache read once."""
    from glm.gpu.linear import bytes_moved
    from glm.kvpool import KVPool
    from glm.quant import HalfLinear, QuantLinear
    total = 0
    for m in model.model.modules():
        if isinstance(m, QuantLinear):
            total += bytes_moved(batch, m.out_features, m.in_features, m.bits, m.bias is not None)
        elif isinstance(m, HalfLinear):
            total += bytes_moved(batch, m.out_features, m.in_features, 16, m.bias is not None)
    if model.config.family == "chatglm":  # the tied head reads the embeddings
        total += bytes_moved(batch, model.config.vocab_size, model.config.hidden_size, 16)
    return total + batch * context * KVPool.bytes_per_token(model.config, model.dtype)


def run(args) -> dict:
    import torch

    import glm
    from glm.sampling import SamplingParams
    from glm.kvpool import KVPool
    from glm.llm import Stream

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    w = WORKLOADS["tiny" if args.tiny else "full"]
    path = checkpoint(args)
    t = time.perf_counter()
    m = glm.load(path, device=device, backend="triton")
    sync()
    out = dict(device=args.device, load_s=round(time.perf_counter() - t, 2), layers=m.config.num_layers,
               backend=m.model.ops.name)
    if out["backend"] != "triton":
        raise RuntimeError("the Triton self-test failed on this device (see the log); nothing to measure")
    model, cfg = m.model, m.config
    g = torch.Generator().manual_seed(0)

    def ids(n, b=1):
        return torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device)

    pool = KVPool(cfg, w["prompt"] + w["decode"], device, m.dtype)  # the model-level prefill runs

    def caches(b):
        n = w["prompt"] + w["decode"]
        return [pool.cache(i * n, n) for i in range(b)]

    def prefill(cs, n, exact=False):
        for c in cs:
            model(ids(n), [0], [c], last_only=True, prefill=exact)

    def engine_decode(batch, steps):
        """Seconds of each engine step that decoded, and the tokens they made, for `batch` sampled
        streams after their prefill (each step ends with its ids on the host: no sync needed)."""
        eng = m.use_engine(max_batch=batch, kv_budget_tokens=batch * (w["prompt"] + steps + 1),
                           prefix_cache_tokens=0)
        if cuda:
            eng.warm_up()  # as setup does: compiles every variant, captures the decode graphs
        prompt = ids(w["prompt"])[0].tolist()
        seqs = [eng.submit(prompt, SamplingParams(max_new_tokens=steps + 1, temperature=0.8, top_p=0.8, seed=i))
                for i in range(batch)]
        while any(not s.new_tokens for s in seqs):
            eng.step()
        times, made = [], 0
        while True:
            before = sum(s.new_tokens for s in seqs)
            t = time.perf_counter()
            if not eng.step():
                break
            new = sum(s.new_tokens for s in seqs) - before
            if new:
                times.append(time.perf_counter() - t)
                made += new
        return times, made

    def first_token(engine, prompt, reply=2):
        seq = engine.submit(prompt, SamplingParams(max_new_tokens=reply, temperature=0))
        while engine.step():  # to its end, and reaped: into the prefix cache
            pass
        return Stream(engine, seq)

    budget = max(2 * (w["ttft_prompt"] + w["chat_turn"] + w["chat_reply"]), w["long_prompt"] + 4)
    long_prompt = ids(w["long_prompt"] - 2)[0].tolist()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        cs = caches(1)
        prefill(cs, w["prompt"])  # warm-up: compiles the prefill kernels
        sync()
        t = time.perf_counter()
        prefill(cs, w["prompt"])
        sync()
        out["prefill_tok_s"] = round(w["prompt"] / (time.perf_counter() - t), 2)
    out["decode_sampling"] = "temperature 0.8, top_p 0.8"
    times, made = engine_decode(1, w["decode"])
    out["batch1_decode_tok_s"] = round(made / sum(times), 2)
    out["batch1_decode_ms_median"] = round(1000 * statistics.median(times), 2)
    times, made = engine_decode(8, w["batch_decode"])
    out["batch8_decode_tok_s"] = round(made / sum(times), 2)
    out["batch8_decode_ms_median"] = round(1000 * statistics.median(times), 2)
    out["cuda_graphs"] = m.engine.runner.graphs is not None
    with torch.inference_mode():
        # A long prompt without the prefix cache: tensor-core linears and SDPA.
        out["ttft_long_prompt_tokens"] = len(long_prompt)
        out["ttft_long_uncached_engine_s"] = round(first_token(
            m.use_engine(max_batch=1, kv_budget_tokens=budget, prefix_cache_tokens=0), long_prompt).time_to_first_token, 3)
    with torch.inference_mode(), model.ops.rows_exactly():  # prefill as in an engine step with the prefix cache on
        cs = caches(1)
        prefill(cs, w["prompt"], exact=True)
        sync()
        t = time.perf_counter()
        prefill(cs, w["prompt"], exact=True)
        sync()
        out["prefill_exact_rows_tok_s"] = round(w["prompt"] / (time.perf_counter() - t), 2)

    # Time to first token through the engine (queue, prefill, first sample), one request.
    eng = m.use_engine(max_batch=1, kv_budget_tokens=budget, prefix_cache_scope="shared")  # one client
    out["ttft_long_cache_on_s"] = round(first_token(eng, long_prompt).time_to_first_token, 3)
    prompt1 = tuple(ids(w["ttft_prompt"])[0].tolist())
    turn1 = first_token(eng, list(prompt1), w["chat_reply"])
    out["ttft_prompt_tokens"] = w["ttft_prompt"]
    out["ttft_s"] = round(turn1.time_to_first_token, 3)  # prefix cache on: the exact-rows prefill
    # Round 2 of a chat: the history is cached (this engine) or prefilled again (one without the cache).
    history = next(e.tokens for e in eng.prefix_cache.entries  # prompt + reply, as far as computed
                   if e.tokens[:len(prompt1)] == prompt1)
    turn2 = history + tuple(ids(w["chat_turn"])[0].tolist())
    cached = first_token(eng, list(turn2))
    uncached = first_token(m.use_engine(max_batch=1, kv_budget_tokens=budget, prefix_cache_tokens=0), list(turn2))
    out["chat_round2_prompt_tokens"] = len(turn2)
    out["chat_round2_cached_tokens"] = cached.cached_prompt_tokens
    out["chat_round2_ttft_cached_s"] = round(cached.time_to_first_token, 3)
    out["chat_round2_ttft_uncached_s"] = round(uncached.time_to_first_token, 3)
    if cuda:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        out["device_name"] = torch.cuda.get_device_name(device)
    else:
        import resource
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ctx = w["prompt"]
    out["bytes_per_step_batch1"] = step_bytes(m, 1, ctx)
    out["bytes_per_step_batch8"] = step_bytes(m, 8, ctx)
    bandwidth = args.bandwidth_gbs * 1e9
    out["roofline_fraction_batch1"] = _sig(out["batch1_decode_tok_s"] * out["bytes_per_step_batch1"] / bandwidth)
    out["roofline_fraction_batch8"] = _sig(out["batch8_decode_tok_s"] / 8 * out["bytes_per_step_batch8"] / bandwidth)
    return out


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def main(args) -> int:
    if args.device == "interpret":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        if not args.tiny:
            print("--device interpret runs only the --tiny model (the interpreter is slow)", file=sys.stderr)
            return 2
    elif args.device != "cuda":
        print(f"unknown device {args.device!r}", file=sys.stderr)
        return 2
    result = run(args)
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k.ljust(width)}  {v}")
    if args.json:
        print(json.dumps(result))
    return 0
