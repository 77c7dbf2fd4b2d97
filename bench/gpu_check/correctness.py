"""Correctness on the device: the device tests of tests/ (pytest in a subprocess), THUDM's reference
vectors and the kernel self-test on the Triton backend, batch invariance of whole sequences through
the engine, exact prefix-cache reuse, and CUDA graph replay against eager steps.

Each check takes what it needs (device, paths) and returns (status, detail, figures); it raises
report.Absent when the feature it checks is not in this checkout.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .report import Absent, Skip

REPO = Path(__file__).resolve().parents[2]

# Test files whose tests compute on CUDA when torch has it (and skip or use the CPU without it).
DEVICE_TESTS = ["tests/kernels/test_quant.py", "tests/kernels/test_gpu_linear.py", "tests/kernels/test_gpu_compile.py",
                "tests/kernels/test_gpu_mma.py"]
# Under the interpreter: the CUDA-only tests (they skip there) and a few device tests, so that the
# item's own logic runs in minutes.
INTERPRET_TESTS = ["tests/kernels/test_quant.py::test_quant_linear_cuda_fp16_matches_reference",
                   "tests/kernels/test_gpu_linear.py::test_int4_nibble_order_high_nibble_first",
                   "tests/kernels/test_gpu_linear.py::test_bad_input_is_a_clear_error"]


# ---- the device tests of tests/
def junit_counts(xml_path: Path) -> dict:
    """passed / failed / errors / skipped counts and the names of the failed and skipped tests."""
    root = ET.parse(xml_path).getroot()
    out = {"passed": 0, "failed": [], "errors": [], "skipped": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None:
            out["failed"].append(name)
        elif case.find("error") is not None:
            out["errors"].append(name)
        elif (skip := case.find("skipped")) is not None:
            out["skipped"][name] = (skip.get("message") or "")[:200]
        else:
            out["passed"] += 1
    return out


def device_tests(cuda: bool, workdir: Path, reference: Path, timeout_s: float):
    tests = DEVICE_TESTS if cuda else INTERPRET_TESTS
    xml = workdir / "device-tests.xml"
    env = dict(os.environ, GLM_REFERENCE=str(reference), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *tests],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if not xml.is_file():
        return "fail", f"pytest wrote no report (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}", {}
    counts = junit_counts(xml)
    # On a GPU a test that skips for want of CUDA did not run where it should have.
    unrun = [n for n, why in counts["skipped"].items() if cuda and "cuda" in why.lower()]
    figures = {"tests": tests, **counts}
    bad = counts["failed"] + counts["errors"] + unrun
    if bad or counts["passed"] == 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        return "fail", f"failed/errors/not run: {bad or 'no test passed'}\n{tail}", figures
    return "pass", f"{counts['passed']} passed, {len(counts['skipped'])} skipped (pytest {' '.join(tests)})", figures


# ---- THUDM's reference vectors and the kernel self-test
def reference_vectors(device, reference: Path):
    """chatglm.cpp's vectors (prefill 3 tokens, then 2 decode steps) through the Triton backend on the
    device, on a pool-backed cache as the engine uses it: within 2% of the largest value."""
    from devtools.vectors import MODEL_FILES, DataReader, hidden_state_steps, vector_model
    from glm.gpu.ops import TritonOps
    from glm.kvpool import KVPool

    if not (reference / "chatglm_cpp" / "glm2_model.data").is_file():
        raise Skip(f"no reference vectors under {reference} (pass --reference DIR: a copy of shared/reference)")
    figures, bad = {}, []
    for name in MODEL_FILES:
        r = DataReader(reference / "chatglm_cpp" / name)
        cfg, model = vector_model(name, r, TritonOps())
        model = model.half().to(device).eval()
        cache = KVPool(cfg, 8, device, torch.float16).cache(0, 8)
        worst = max(float((got.float().cpu() - want).abs().max() / want.abs().max())
                    for got, want in hidden_state_steps(model, r, cfg, cache))
        figures[name] = float(f"{worst:.3g}")
        if not worst < 0.02:
            bad.append(name)
    if bad:
        return "fail", f"beyond 2% of the largest value: {', '.join(bad)}", figures
    return "pass", "max error relative to the largest value, per vector file", figures


def selftest(device):
    from glm.gpu import selftest as st
    failure = st.run(device)
    if failure is not None:
        return "fail", failure, {}
    return "pass", f"glm.gpu.selftest: {', '.join(st.CHECKS)} within {st.TOLERANCE}", {}


# ---- whole sequences through the engine
def _run_alone_or_together(engine, prompts, params, together: bool):
    """Token ids per request, and the largest batch any of them decoded in."""
    def drive(seqs):
        while engine.step():
            pass
        for s in seqs:
            if s.finish_reason == "error":
                raise RuntimeError(f"a request failed: {s.error!r}")
        return seqs
    if together:
        seqs = drive([engine.submit(p, sp) for p, sp in zip(prompts, params)])
    else:
        seqs = [drive([engine.submit(p, sp)])[0] for p, sp in zip(prompts, params)]
    return [s.tokens[len(s.prompt_ids):] for s in seqs], max(s.peak_batch for s in seqs)


def batch_requests(model, n: int = 8, new_tokens: int = 12):
    """n prompts of different lengths, with greedy, seeded top-p, top-k and repetition-penalty sampling."""
    import glm
    tok = model.tokenizer
    questions = ["你好", "晚上睡不着应该怎么办", "hello world", "1+1=?", "讲个笑话", "what is a GPU", "今天天气", "写一首诗"]
    prompts = [tok.encode(tok.build_prompt(questions[i % len(questions)] * (1 + i // 4))) for i in range(n)]
    kinds = [dict(temperature=0), dict(temperature=0.8, top_p=0.8), dict(temperature=1.0, top_k=5),
             dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1)]
    params = [glm.SamplingParams(max_new_tokens=new_tokens, seed=1000 + i, **kinds[i % len(kinds)]) for i in range(n)]
    return prompts, params


def batch_invariance(model, n: int = 8, new_tokens: int = 12):
    """n concurrent requests produce exactly the tokens each produces alone (sampling seeded).
    new_tokens > n: the first request still decodes when the last one joins (one prefill a step)."""
    prompts, params = batch_requests(model, n, new_tokens)
    engine = model.use_engine(max_batch=n, prefix_cache_tokens=0)
    alone, _ = _run_alone_or_together(engine, prompts, params, together=False)
    together, peak = _run_alone_or_together(engine, prompts, params, together=True)
    differ = [i for i in range(n) if alone[i] != together[i]]
    figures = {"streams": n, "peak_batch": peak, "tokens_per_stream": [len(t) for t in together]}
    if differ:
        return "fail", f"requests {differ} differ alone vs in a batch of {peak}", figures
    if peak < n:
        return "fail", f"only {peak} of {n} requests decoded together: the check did not test a full batch", figures
    return "pass", f"{n} streams (greedy, top-p, top-k, repetition penalty; seeded) = their solo runs", figures


def prefix_cache_exact(model, new_tokens: int = 8):
    """Round 2 of a chat reusing round 1's cached KV gives exactly the tokens of a full recomputation
    (the cached engine's steps compute rows exactly: glm.engine, ops.rows_exactly)."""
    import glm
    # Cache on, keyless requests in one scope (as one chat client's).
    cached_engine = model.use_engine(max_batch=2, prefix_cache_scope="shared")
    if not cached_engine.exact_rows:
        return "fail", "the engine left the prefix cache off: the model cannot reuse KV exactly", {}
    tok = model.tokenizer
    round1 = tok.encode(tok.build_prompt("你好"))
    sample = dict(max_new_tokens=new_tokens, temperature=0.8, top_p=0.8, seed=7)
    reply, _ = _run_alone_or_together(cached_engine, [round1], [glm.SamplingParams(**sample)], together=False)
    round2 = round1 + reply[0] + round1[-4:]  # a short next turn: only its rows are prefilled
    seq = cached_engine.submit(round2, glm.SamplingParams(**sample))
    while cached_engine.step():
        pass
    got, cached = seq.tokens[len(round2):], seq.cached_tokens
    fresh = model.use_engine(max_batch=2, prefix_cache_tokens=0)
    want, _ = _run_alone_or_together(fresh, [round2], [glm.SamplingParams(**sample)], together=False)
    figures = {"round2_prompt_tokens": len(round2), "cached_prompt_tokens": cached, "tokens": len(got)}
    if cached == 0:
        return "fail", "round 2 found nothing in the prefix cache", figures
    if got != want[0]:
        return "fail", f"round 2 with {cached} cached tokens differs from a recomputation", figures
    return "pass", f"round 2 with {cached}/{len(round2)} prompt tokens from the cache = recomputed", figures


def cuda_graphs(model, cuda: bool, n: int = 8, new_tokens: int = 12):
    """CUDA graph replay = the eager step: n concurrent seeded streams decode to the same tokens with
    the engine's decode graphs (captured and checked by Engine.warm_up, glm/gpu/graphs.py) as with
    the graphs off. Decode batches of 1..n rows replay every bucket, padded ones included. Under the
    interpreter nothing can be captured: what a graph computes (the eager forward on the staged rows
    padded to the bucket) stands in for the replay, which checks the padding, not the capture."""
    if importlib.util.find_spec("glm.gpu.graphs") is None:
        raise Absent("glm.gpu.graphs is not in this checkout: no CUDA graph replay to check")
    prompts, params = batch_requests(model, n, new_tokens)
    engine = model.use_engine(max_batch=n, prefix_cache_tokens=0)
    runner = engine.runner
    if cuda:
        engine.warm_up()
        if runner.graphs is None:
            return "fail", "Engine.warm_up captured no decode graph (its log line 'CUDA graphs off' says why)", {}
        graphs = runner.graphs
    else:
        graphs = _PaddedEagerGraphs(runner)
    runner.graphs = replays = _CountedReplays(graphs)
    replayed, peak = _run_alone_or_together(engine, prompts, params, together=True)
    runner.graphs = None
    eager, _ = _run_alone_or_together(engine, prompts, params, together=True)
    figures = {"captured": cuda, "streams": n, "peak_batch": peak, "replays_by_bucket": dict(sorted(replays.counts.items()))}
    differ = [i for i in range(n) if replayed[i] != eager[i]]
    if differ:
        return "fail", f"requests {differ} differ with graph replay vs eager decode", figures
    if not replays.counts:
        return "fail", "no decode step replayed a graph: the check did not test replay", figures
    how = "graph replay" if cuda else "the graphs' padded-bucket computation (interpreter: no capture)"
    return "pass", f"{n} streams decode the same tokens by {how} as eagerly; buckets {sorted(replays.counts)}", figures


class _CountedReplays:
    """A DecodeGraphs that counts its replays per bucket."""

    def __init__(self, graphs):
        self.graphs, self.counts = graphs, {}

    def get(self, rows):
        return self.graphs.get(rows)

    def replay(self, rows):
        self.counts[rows] = self.counts.get(rows, 0) + 1
        return self.graphs.replay(rows)


class _PaddedEagerGraphs:
    """In place of the captured graphs where CUDA is not: each bucket runs the forward that
    ModelRunner.prepare captures, eagerly, on the staged rows padded to the bucket."""

    def __init__(self, runner):
        from glm.gpu.graphs import BUCKETS
        self.runner, self.buckets = runner, [b for b in BUCKETS if b <= runner.staging.rows]

    def get(self, rows):
        return rows if rows in self.buckets else None

    def replay(self, rows):
        scratch = self.runner.pool.cache(0, 1)
        return self.runner._eager(self.runner.staging.inputs(rows), [0] * rows, [scratch] * rows)
