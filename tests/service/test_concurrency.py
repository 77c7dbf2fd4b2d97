"""Many predictions at once through the REAL Cog server (coglet), COG_MAX_CONCURRENCY=8.

predict() is async, so the server runs up to 8 at once and the engine thread batches them into one
forward step; each prediction must still return exactly what it returns alone (the in-process
reference), a cancel must stop only its own prediction, requests beyond capacity get 409 without
disturbing the accepted ones, and the worker's memory must not grow with the number of requests.
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from service_helpers import LONG, PROMPTS, assert_ready, reference  # noqa: E402
from devtools.cogserver import PYTHON, REPO, CogServer  # noqa: E402

CONCURRENCY = 8


def distinct_inputs(n: int, max_tokens: int, salt: int = 0) -> list[dict]:
    """n requests that differ in prompt, seed, length and sampling settings."""
    out = []
    for i in range(n):
        inp = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max(4, max_tokens - 7 * (i % 5)),
               "seed": 1000 * salt + i, "temperature": (0.6, 1.0, 0.0, 1.3)[i % 4], "top_p": (0.8, 1.0, 0.95)[i % 3]}
        if i % 3 == 1:
            inp["top_k"] = 20
        if i % 4 == 3:
            inp["repetition_penalty"] = 1.15
        out.append(inp)
    return out


def expected(reference_model, inp: dict) -> str:
    kw = dict(inp)
    if "stop_sequences" in kw:
        kw["stop"] = [s.strip() for s in kw.pop("stop_sequences").split(",") if s.strip()]
    return reference(reference_model, **kw)[0]


def peak_batch(logs: str) -> int:
    m = re.search(r"peak_batch=(\d+)", logs)
    assert m, logs
    return int(m.group(1))


@pytest.fixture(scope="module")
def busy_server(app_dir):
    with CogServer(app_dir, env={"COG_MAX_CONCURRENCY": str(CONCURRENCY)}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        yield srv


def post(server: CogServer, inp: dict, retry_409: bool = True) -> requests.Response:
    return server.predict({"input": inp}, wait_ready=False, retry_409=retry_409)


def test_concurrent_predictions_each_match_their_solo_output(busy_server, reference_model):
    inputs = distinct_inputs(CONCURRENCY, max_tokens=160)
    inputs[5]["stop_sequences"] = "，,。"
    assert_ready(busy_server)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        responses = list(pool.map(lambda inp: post(busy_server, inp), inputs))
    bodies = [r.json() for r in responses]
    for inp, r, body in zip(inputs, responses, bodies):
        assert r.status_code == 200 and body["status"] == "succeeded", body
        assert "".join(body["output"]) == expected(reference_model, inp), inp
    # They really ran together: the engine decoded them in shared steps.
    peaks = [peak_batch(b["logs"]) for b in bodies]
    assert max(peaks) >= CONCURRENCY // 2, peaks
    assert_ready(busy_server)


def test_cancelling_one_leaves_the_others_intact(busy_server, reference_model, long_seed):
    others = distinct_inputs(CONCURRENCY - 1, max_tokens=LONG, salt=1)
    cancel_id = "cancel-one-of-many"
    assert_ready(busy_server)
    started_before = busy_server.log_count("Starting prediction")
    with ThreadPoolExecutor(len(others)) as pool:
        futures = [pool.submit(post, busy_server, inp) for inp in others]
        seen = {"n": 0, "after": 0}

        def on_event(ev):
            if ev["event"] != "output":
                return
            seen["n"] += 1
            if "canceled_at" in seen:
                seen["after"] += 1
            # Cancel mid-stream once all 8 predictions have started (on a loaded machine the
            # other 7 POSTs can arrive after this one's first tokens).
            elif seen["n"] >= 3 and busy_server.log_count("Starting prediction") - started_before >= CONCURRENCY:
                r = busy_server.cancel(cancel_id)
                assert r.status_code == 200, r.text
                seen["canceled_at"] = time.monotonic()

        events = busy_server.sse({"id": cancel_id, "input": {"max_tokens": LONG, "temperature": 1.0, "top_p": 1.0,
                                                             "seed": long_seed}},
                                 on_event=on_event, wait_ready=False)
        bodies = [f.result().json() for f in futures]
    final = events[-1]["data"]
    assert final["status"] == "canceled", final
    assert len(final.get("output") or []) < LONG
    assert "finish_reason=canceled" in final["logs"], final["logs"]
    assert peak_batch(final["logs"]) >= 2, final["logs"]  # it was cancelled while running beside others
    for inp, body in zip(others, bodies):
        assert body["status"] == "succeeded", body
        assert "".join(body["output"]) == expected(reference_model, inp), inp
    assert_ready(busy_server)


def test_bursts_above_capacity_lose_nothing_accepted(busy_server, reference_model):
    """50 requests in bursts of 10 at 8 slots: each is either refused with 409 or returns its exact output."""
    accepted = refused = 0
    for burst in range(5):
        inputs = distinct_inputs(10, max_tokens=64, salt=10 + burst)
        assert_ready(busy_server)
        with ThreadPoolExecutor(len(inputs)) as pool:
            responses = list(pool.map(lambda inp: post(busy_server, inp, retry_409=False), inputs))
        for inp, r in zip(inputs, responses):
            if r.status_code == 409:
                refused += 1
                assert "capacity" in r.text.lower(), r.text
                continue
            body = r.json()
            assert r.status_code == 200 and body["status"] == "succeeded", (r.status_code, body)
            assert "".join(body["output"]) == expected(reference_model, inp), inp
            accepted += 1
    assert accepted + refused == 50
    assert accepted >= 5 * CONCURRENCY, (accepted, refused)
    assert refused >= 1, "no burst ever exceeded the server's capacity"
    assert_ready(busy_server)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads worker memory from /proc (Linux)")
def test_worker_memory_stays_flat_over_500_requests(busy_server, reference_model):
    workers = _children(busy_server.proc.pid)
    assert len(workers) == 1, workers
    worker = workers[0]
    inputs = distinct_inputs(500, max_tokens=24, salt=100)
    done, lock = [], threading.Lock()
    rss = {}

    def run(inp):
        r = post(busy_server, inp)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "succeeded", (r.status_code, body)
        with lock:
            done.append(1)
            if len(done) in (100, 500):
                rss[len(done)] = _rss_mb(worker)
        return "".join(body["output"])

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outputs = list(pool.map(run, inputs))
    for inp, out in list(zip(inputs, outputs))[::50]:  # spot-check the text too
        assert out == expected(reference_model, inp), inp
    growth = rss[500] - rss[100]
    print(f"worker RSS after 100 requests {rss[100]:.1f} MB, after 500 {rss[500]:.1f} MB (+{growth:.1f} MB)")
    assert growth < 8, rss
    assert_ready(busy_server)


def test_kv_budget_makes_requests_wait_or_fail_clearly(app_dir, reference_model, long_seed):
    """GLM_KV_BUDGET_TOKENS=100: requests of 16 + 80 and 16 + 60 tokens cannot share it, so the second
    waits (they are in flight together but never decode together) and both are exact; a request
    needing more than the whole budget fails at once."""
    with CogServer(app_dir, env={"COG_MAX_CONCURRENCY": "4", "GLM_KV_BUDGET_TOKENS": "100"}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        inputs = [{"max_tokens": 80, "seed": long_seed, "temperature": 1.0, "top_p": 1.0},
                  {"max_tokens": 60, "seed": 8, "temperature": 1.0, "top_p": 1.0}]
        started = srv.log_count("Starting prediction")
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, srv, inputs[0])
            deadline = time.monotonic() + 60
            while srv.log_count("Starting prediction") == started:  # the second is sent once the first runs
                assert time.monotonic() < deadline, srv.logs()
                time.sleep(0.005)
            first_done = []
            first.add_done_callback(lambda _: first_done.append(time.monotonic()))
            second_sent = time.monotonic()
            second = pool.submit(post, srv, inputs[1])
            bodies = [first.result().json(), second.result().json()]
        for inp, body in zip(inputs, bodies):
            assert body["status"] == "succeeded", body
            assert "".join(body["output"]) == expected(reference_model, inp)
            assert peak_batch(body["logs"]) == 1, body["logs"]
        # ... because the second waited: it was sent while the first ran, and its first token came
        # only once the first was done (its time to first token spans at least half the overlap).
        overlap = first_done[0] - second_sent
        assert overlap > 0, "the first request finished before the second was sent"
        ttft = float(re.search(r"time_to_first_token=([0-9.]+)", bodies[1]["logs"]).group(1))
        assert ttft >= 0.5 * overlap, (ttft, overlap)
        t = time.monotonic()
        body = post(srv, {"max_tokens": 200}).json()
        assert body["status"] == "failed", body
        assert "budget of 100" in body["error"], body["error"]
        assert time.monotonic() - t < 20  # refused, not queued: nothing else is running it could wait for
        assert_ready(srv)


ASYNC_GENERATOR_PREDICTOR = """
import asyncio
import cog
from cog import AsyncConcatenateIterator, BasePredictor


class Predictor(BasePredictor):
    @cog.streaming
    async def predict(self, n: int = 5) -> AsyncConcatenateIterator[str]:
        for i in range(n):
            await asyncio.sleep(0.3)
            yield f"{i} "
"""


def test_coglet_sends_an_async_generators_chunks_only_at_its_end(tmp_path):
    """Why predict() returns a generator instead of being an async generator (AsyncConcatenateIterator):
    coglet 0.23.1 collects an async generator and sends all its chunks when it ends (measured here: 5
    chunks 0.3 s apart all arrive at 1.5 s). If this fails, coglet streams them now and predict() can
    become an async generator (with plain asyncio cancellation)."""
    (tmp_path / "predict.py").write_text(ASYNC_GENERATOR_PREDICTOR)
    subprocess.run([PYTHON, os.path.join(REPO, "script", "openapi-schema")], cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    with CogServer(str(tmp_path), env={"COG_MAX_CONCURRENCY": "2"}) as srv:
        srv.wait_for({"READY"}, timeout=120)
        arrivals = []
        events = srv.sse({"input": {"n": 5}},
                         on_event=lambda ev: ev["event"] == "output" and arrivals.append(time.monotonic()))
    assert [e["data"]["chunk"] for e in events if e["event"] == "output"] == ["0 ", "1 ", "2 ", "3 ", "4 "]
    assert max(arrivals) - min(arrivals) < 0.3, arrivals  # streamed, they would span 1.2 s
