"""Speed on a full-size random checkpoint written on the spot (devtools.tiny --full-size, drawn on the GPU):
load time, time to first token at 1k tokens, prefill and decode tok/s through the engine with
sampling on (top_p 0.8) at batch 1 and 8, decode at a long context, a chat's round-2 time to first
token with and without the prefix cache, peak GPU memory and the fraction of the bandwidth bound.

Under --interpret the same steps run on the tiny checkpoint with a tiny workload: the figures are
meaningless there, only the logic is checked.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .report import Skip

REPO = Path(__file__).resolve().parents[2]

# Tokens per request: prompt of the TTFT / prefill figure, prompt and new tokens of the decode figures,
# the long context's prompt and new tokens, the chat's reply and next question.
# The tiny workload (the interpreter: about 2 CPU-seconds a forward pass) keeps every step, smaller.
WORKLOADS = {"full": dict(ttft_prompt=1024, decode_prompt=128, decode_new=128, batches=(1, 8), long_prompt=8000,
                          long_new=64, chat_reply=64, chat_turn=64, warm_up=True),
             "tiny": dict(ttft_prompt=16, decode_prompt=8, decode_new=3, batches=(1, 2), long_prompt=24, long_new=3,
                          chat_reply=2, chat_turn=2, warm_up=False)}
# Spec memory bandwidth, bytes/s, by the name torch reports (the bound the fraction is of); an
# unknown GPU gets the measured device-to-device copy bandwidth only.
SPEC_BANDWIDTH = {"Tesla T4": 320e9, "NVIDIA L4": 300e9, "NVIDIA A10G": 600e9, "NVIDIA A100-SXM4-40GB": 1555e9,
                  "NVIDIA A100-SXM4-80GB": 2039e9, "NVIDIA A100 80GB PCIe": 1935e9, "NVIDIA H100 80GB HBM3": 3350e9,
                  "NVIDIA H100 PCIe": 2000e9, "NVIDIA H200": 4800e9}
TOP_P = dict(temperature=0.8, top_p=0.8)


@dataclass
class Run:
    """What the speed items share: the device, the workload, the loaded model (None until loaded)."""
    device: torch.device
    workload: dict
    model: object = None
    checkpoint: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def need_model(self):
        if self.model is None:
            raise Skip("no model loaded (see the load item)")
        return self.model


# ---- the checkpoint
def write_checkpoint(out: Path, family: str, full_size: bool, reference: Path, cuda: bool, timeout_s: float) -> dict:
    """`python -m devtools.tiny` in a subprocess (its memory is freed when it ends)."""
    args = [sys.executable, "-m", "devtools.tiny", str(out), "--family", family]
    if full_size:
        tok = reference / "tokenizers" / ("chatglm" if family == "chatglm" else "chatglm2") / \
            ("ice_text.model" if family == "chatglm" else "tokenizer.model")
        if not tok.is_file():
            raise Skip(f"no real tokenizer at {tok} (pass --reference DIR: a copy of shared/reference)")
        args += ["--full-size", "--tokenizer", str(tok), "--device", "cuda" if cuda else "cpu"]
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"devtools.tiny failed: {(proc.stderr or proc.stdout)[-1500:]}")
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"write_s": round(time.perf_counter() - t, 2), "checkpoint_mb": round(size / 1e6, 1)}


def load(run: Run, path: Path) -> dict:
    import glm
    run.model = None
    if run.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
    t = time.perf_counter()
    m = glm.load(path, device=run.device, backend="triton")
    run.sync()
    load_s = time.perf_counter() - t
    if m.model.ops.name != "triton":
        raise RuntimeError(f"loaded with ops {m.model.ops.name!r}, not triton: the self-test failed on this device (see the log)")
    run.model, run.checkpoint = m, path
    out = {"load_s": round(load_s, 2), "layers": m.config.num_layers, "family": m.config.family,
           "bits": m.config.quantization_bit}
    if run.cuda:
        out["weights_gib"] = round(torch.cuda.memory_allocated(run.device) / 2**30, 2)
    return out


# ---- requests through the engine
def _ids(model, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    # Ordinary pieces only (no special tokens): ids below the tokenizer's own vocabulary.
    top = min(model.config.vocab_size, 60000) - 1
    return torch.randint(100, top, (n,), generator=g).tolist()


def _finish(engine, seqs) -> None:
    while engine.step():
        pass
    for s in seqs:
        if s.error is not None:
            raise RuntimeError(f"a request failed: {s.error!r}")


def _ttft(engine, prompt, new_tokens: int = 1, **sampling) -> object:
    import glm
    seq = engine.submit(prompt, glm.SamplingParams(max_new_tokens=new_tokens, seed=1, **(sampling or TOP_P)))
    _finish(engine, [seq])
    return seq


def ttft_and_prefill(run: Run) -> dict:
    """Time to first token of a fresh request (queue, chunked prefill, first sample) at the workload's
    prompt length; prefill tok/s is that prompt over that time. One warm-up request first."""
    m, w = run.need_model(), run.workload
    engine = m.use_engine(max_batch=1, kv_budget_tokens=w["ttft_prompt"] + 8, prefix_cache_tokens=0)
    if w["warm_up"]:
        _ttft(engine, _ids(m, w["ttft_prompt"], 0))  # compiles the kernels of every shape involved
    seq = _ttft(engine, _ids(m, w["ttft_prompt"], 1))
    ttft = seq.t_first - seq.t_submit
    return {"prompt_tokens": w["ttft_prompt"], "ttft_s": round(ttft, 4), "prefill_tok_s": round(w["ttft_prompt"] / ttft, 1)}


def _decode_rate(engine, prompts, new_tokens: int) -> float:
    """Tokens per second of all requests together while every one of them is decoding."""
    import glm
    seqs = [engine.submit(p, glm.SamplingParams(max_new_tokens=new_tokens, seed=10 + i, **TOP_P))
            for i, p in enumerate(prompts)]
    t0 = n0 = None
    while engine.step():
        if any(s.done for s in seqs):
            break
        if t0 is None and all(s.t_first is not None for s in seqs):
            t0, n0 = time.perf_counter(), sum(s.new_tokens for s in seqs)
    t1, n1 = time.perf_counter(), sum(s.new_tokens for s in seqs)
    _finish(engine, seqs)
    if t0 is None or n1 <= n0:
        raise RuntimeError("the requests never decoded together (an early end of sequence?)")
    return (n1 - n0) / (t1 - t0)


def decode(run: Run, batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    m = run.need_model()
    engine = m.use_engine(max_batch=batch, kv_budget_tokens=batch * (prompt_tokens + new_tokens), prefix_cache_tokens=0)
    if run.workload["warm_up"]:
        _decode_rate(engine, [_ids(m, prompt_tokens, 100)] * batch, 4)  # this batch size's kernels
    rate = _decode_rate(engine, [_ids(m, prompt_tokens, 200 + i) for i in range(batch)], new_tokens)
    return {f"batch{batch}_decode_tok_s": round(rate, 2), "context_tokens": prompt_tokens + new_tokens // 2,
            **bandwidth_fraction(run, batch, prompt_tokens + new_tokens // 2, rate)}


def decode_batches(run: Run) -> dict:
    w = run.workload
    out = {}
    for batch in w["batches"]:
        out |= decode(run, batch, w["decode_prompt"], w["decode_new"])
    return out


def decode_long(run: Run) -> dict:
    m, w = run.need_model(), run.workload
    prompt = min(w["long_prompt"], m.config.max_context - w["long_new"])
    return decode(run, 1, prompt, w["long_new"])


def chat_round2(run: Run) -> dict:
    """Round 2 of a chat (round 1's prompt and reply, then a new question): its time to first token
    on an engine without the prefix cache (the GEMM prefill), then with the cache (round 1's KV
    reused), and on a fresh engine with the cache on (nothing to reuse, rows computed exactly: what
    the cache costs a request it cannot help)."""
    m, w = run.need_model(), run.workload
    round1 = _ids(m, w["ttft_prompt"], 2) + _ids(m, w["chat_reply"], 3)
    round2 = round1 + _ids(m, w["chat_turn"], 4)
    budget = 2 * (len(round2) + 8)
    plain = m.use_engine(max_batch=1, kv_budget_tokens=budget, prefix_cache_tokens=0)
    if w["warm_up"]:
        _ttft(plain, round2)
    uncached = _ttft(plain, round2)
    cached_engine = m.use_engine(max_batch=1, kv_budget_tokens=budget, prefix_cache_scope="shared")
    _ttft(cached_engine, round1)    # round 1: its KV stays in the cache
    cached = _ttft(cached_engine, round2)
    exact = _ttft(m.use_engine(max_batch=1, kv_budget_tokens=budget, prefix_cache_scope="shared"), round2)
    return {"round2_prompt_tokens": len(round2), "cached_prompt_tokens": cached.cached_tokens,
            "ttft_uncached_s": round(uncached.t_first - uncached.t_submit, 4),
            "ttft_cached_s": round(cached.t_first - cached.t_submit, 4),
            "ttft_uncached_exact_rows_s": round(exact.t_first - exact.t_submit, 4)}


# ---- memory and bandwidth
def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy (bytes read + written), the bandwidth a kernel can reach."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * n * 10 / (time.perf_counter() - t)


_measured_bandwidth: dict = {}


def bandwidth_fraction(run: Run, batch: int, context: int, tok_s: float) -> dict:
    """Decode tok/s x bytes one step moves (the kernels' own count, bench.gpu.step_bytes) / bandwidth."""
    if not run.cuda:
        return {}
    from bench.gpu import step_bytes
    step = step_bytes(run.model, batch, context)
    if run.device not in _measured_bandwidth:
        _measured_bandwidth[run.device] = copy_bandwidth(run.device)
    measured = _measured_bandwidth[run.device]
    out = {f"batch{batch}_bytes_per_step": step,
           f"batch{batch}_fraction_of_copy_bandwidth": round(tok_s / batch * step / measured, 3),
           "copy_bandwidth_gbs": round(measured / 1e9, 1)}
    spec = SPEC_BANDWIDTH.get(torch.cuda.get_device_name(run.device))
    if spec:
        out[f"batch{batch}_fraction_of_spec_bandwidth"] = round(tok_s / batch * step / spec, 3)
    return out


def peak_memory(run: Run) -> dict:
    if not run.cuda:
        import resource
        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(run.device) / 2**30, 2)}


def unload(run: Run) -> None:
    run.model = None
    import gc
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
