"""Soak: a few hundred concurrent predictions through the REAL server, kept short enough for CI.

Sync and SSE requests at once, some cancelled mid-stream and some dropped by their client, on 8
slots. Every prediction that succeeds equals its solo in-process run; every cancelled one is a
prefix of it; afterwards all 8 slots serve at once again and the worker's memory has not grown.
"""
from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service_helpers import PROMPTS, assert_ready, reference, worker_rss_mb  # noqa: E402
from devtools.cogserver import CogServer  # noqa: E402

CONCURRENCY = 8
REQUESTS = 240
CLIENTS = 12          # more clients than slots: the server's 409 is part of the load
WARMUP = 40           # requests before the first RSS reading (allocator and caches settle)
RSS_GROWTH_MB = 40


@pytest.fixture(scope="module")
def soak_server(app_dir):
    with CogServer(app_dir, env={"COG_MAX_CONCURRENCY": str(CONCURRENCY)}) as srv:
        srv.wait_for({"READY"}, timeout=300)
        yield srv


def plan(n: int, rng: random.Random) -> list[dict]:
    """Distinct requests: prompt, seed, length, sampling; how each is sent and ended."""
    out = []
    for i in range(n):
        inp = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": rng.randint(4, 40), "seed": 50_000 + i,
               "temperature": rng.choice((0.0, 0.7, 1.0, 1.3)), "top_p": rng.choice((0.8, 1.0))}
        if rng.random() < 0.2:
            inp["top_k"] = rng.choice((5, 40))
        mode = rng.choices(("sync", "sse", "cancel", "disconnect"), weights=(60, 20, 12, 8))[0]
        out.append({"id": f"soak-{i}", "input": inp, "mode": mode})
    return out


def run_one(server: CogServer, req: dict) -> dict:
    """Send one request as its mode says; returns {'status', 'text'} (status None: client left)."""
    body = {"id": req["id"], "input": req["input"]}
    if req["mode"] == "sync":
        r = server.predict(body, wait_ready=False)
        b = r.json()
        return {"status": b["status"], "text": "".join(b.get("output") or []), "error": b.get("error")}
    if req["mode"] == "disconnect":
        with server._post(body, {"Accept": "text/event-stream"}, 60, True, stream=True) as r:
            for line in r.iter_lines():
                if line.startswith(b"event: output"):
                    break  # leave mid-stream: the connection closes here
        return {"status": None, "text": ""}
    cancelled = threading.Event()

    def on_event(ev):
        if req["mode"] == "cancel" and ev["event"] == "output" and not cancelled.is_set():
            cancelled.set()
            server.cancel(req["id"])

    events = server.sse(body, on_event=on_event, wait_ready=False)
    final = events[-1]["data"]
    return {"status": final["status"], "text": "".join(final.get("output") or []), "error": final.get("error")}


def test_soak(soak_server, reference_model):
    rng = random.Random(17)
    reqs = plan(REQUESTS, rng)
    assert_ready(soak_server)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        first = list(pool.map(lambda r: run_one(soak_server, r), reqs[:WARMUP]))
        assert_ready(soak_server)
        rss_before = worker_rss_mb(soak_server)[0]
        rest = list(pool.map(lambda r: run_one(soak_server, r), reqs[WARMUP:]))
    elapsed = time.monotonic() - t0
    results = first + rest

    mismatches, counts = [], {}
    for req, res in zip(reqs, results):
        counts[res["status"]] = counts.get(res["status"], 0) + 1
        if res["status"] is None:
            continue
        want = reference(reference_model, **req["input"])[0]
        if res["status"] == "succeeded":
            ok = res["text"] == want
        elif res["status"] == "canceled":
            ok = want.startswith(res["text"])
        else:
            ok = False
        if not ok:
            mismatches.append((req, res))

    # No stuck slot: once idle, 8 predictions run at once (each accepted, decoded together).
    assert_ready(soak_server)
    probe = [{"prompt": PROMPTS[i], "max_tokens": 24, "seed": 90_000 + i, "temperature": 1.0, "top_p": 1.0}
             for i in range(CONCURRENCY)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        bodies = list(pool.map(lambda inp: soak_server.predict({"input": inp}, wait_ready=False).json(), probe))
    assert_ready(soak_server)
    rss_after = worker_rss_mb(soak_server)[0]
    health = soak_server.health()
    peak = max(int(re.search(r"peak_batch=(\d+)", b["logs"])[1]) for b in bodies)
    print(f"\nsoak: {REQUESTS} requests in {elapsed:.1f}s, outcomes {counts}, mismatches {len(mismatches)}, "
          f"worker RSS {rss_before:.0f} -> {rss_after:.0f} MB, health {health['status']}, "
          f"peak_batch of the final 8: {peak}")

    assert not mismatches, mismatches[:3]
    assert counts.get("succeeded", 0) >= REQUESTS // 2, counts
    assert counts.get("canceled", 0) >= 1, counts
    for inp, b in zip(probe, bodies):
        assert b["status"] == "succeeded" and "".join(b["output"]) == reference(reference_model, **inp)[0], b.get("error")
    assert health["status"] == "READY", health
    assert rss_after - rss_before < RSS_GROWTH_MB, (rss_before, rss_after)
