"""Each coglet 0.23.1 behaviour cog_compat.py works around, shown on the pinned server itself.

Every test here runs the real server (requirements-test.txt's coglet) on a probe predictor of a few
lines, without the workaround, and asserts the server's raw behaviour. A test that fails means the
pinned server no longer behaves so: the workaround it names can go (and the test with it).
The workarounds themselves are checked through predict.py in test_service_http.py / test_hostile.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from devtools.cogserver import REPO, CogServer

# An async generator predict(), as the server's docs suggest for streaming.
ASYNC_GENERATOR = '''
import asyncio
from typing import AsyncIterator

import cog
from cog import BasePredictor, Input


class Predictor(BasePredictor):
    @cog.streaming
    async def predict(self, n: int = Input(default=3, ge=1, le=100),
                      delay: float = Input(default=0.5, ge=0, le=10)) -> AsyncIterator[str]:
        for i in range(n):
            yield f"{i};"
            await asyncio.sleep(delay)
'''

# predict.py's shape: an async predict() returning a sync generator, with none of cog_compat's help.
SYNC_GENERATOR = '''
import sys
import time
from typing import Iterator, Optional

import cog
from cog import BasePredictor, ConcatenateIterator, Input


class Predictor(BasePredictor):
    @cog.streaming
    async def predict(self, n: int = Input(default=3, ge=1, le=1000), delay: float = Input(default=0.05, ge=0, le=10),
                      note: Optional[str] = Input(default=None)) -> ConcatenateIterator[str]:
        print("written by predict()", file=sys.stderr, flush=True)
        kind = type(n).__name__

        def chunks() -> Iterator[str]:
            print(f"written by the generator ({note})", file=sys.stderr, flush=True)
            yield f"n is {kind};"
            for i in range(int(n)):
                time.sleep(delay)
                yield f"{i};"
        return chunks()
'''


def _app(root, source: str) -> str:
    os.makedirs(root)
    with open(os.path.join(root, "predict.py"), "w", encoding="utf-8") as fh:
        fh.write(source)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "script", "openapi-schema")], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(root)


@pytest.fixture(scope="module")
def sync_app(tmp_path_factory) -> str:
    return _app(tmp_path_factory.mktemp("probe") / "sync", SYNC_GENERATOR)


@pytest.fixture(scope="module")
def sync_server(sync_app):
    with CogServer(sync_app) as srv:
        srv.wait_for({"READY"}, timeout=120)
        yield srv


def _timed_sse(server, body, on_output=None):
    """The SSE events of one prediction, each with its arrival time (s after the request)."""
    t0 = time.monotonic()
    arrivals = []

    def on_event(ev):
        arrivals.append(time.monotonic() - t0)
        if ev["event"] == "output" and on_output is not None:
            on_output(ev)

    events = server.sse(body, on_event=on_event)
    return list(zip(events, arrivals))


def test_an_async_generator_predict_is_sent_only_when_it_ends(tmp_path):
    """Workaround: predict.py's async predict() returns a sync generator, which the server streams."""
    n, delay = 3, 0.5
    with CogServer(_app(tmp_path / "async", ASYNC_GENERATOR)) as srv:
        srv.wait_for({"READY"}, timeout=120)
        timed = _timed_sse(srv, {"input": {"n": n, "delay": delay}})
    outputs = [t for ev, t in timed if ev["event"] == "output"]
    assert [ev["data"]["chunk"] for ev, _ in timed if ev["event"] == "output"] == ["0;", "1;", "2;"]
    # The generator yields its first chunk at once and its last after (n - 1) * delay: no chunk
    # reaches the client before the last one was made.
    assert min(outputs) >= (n - 1) * delay, timed


def test_a_returned_sync_generator_is_streamed(sync_server):
    """The other half of the streaming workaround: what predict.py relies on."""
    timed = _timed_sse(sync_server, {"input": {"n": 10, "delay": 0.2}})
    outputs = [t for ev, t in timed if ev["event"] == "output"]
    assert len(outputs) == 11 and outputs[0] < 1.0 < outputs[-1], timed


def test_cancel_does_not_reach_a_returned_generator(sync_server):
    """Workaround: cog_compat.on_server_cancel hooks the future the server cancels through."""
    pid = "probe-cancel"
    answers = []

    def cancel_after_the_second(ev):
        if ev["data"]["index"] == 1:
            answers.append(sync_server.cancel(pid).status_code)

    timed = _timed_sse(sync_server, {"id": pid, "input": {"n": 20, "delay": 0.1}}, cancel_after_the_second)
    final = timed[-1][0]["data"]
    assert answers == [200], final  # the server took the cancel (and reports the prediction canceled) ...
    # ... and the generator ran on to its end: every chunk made, 20 x 0.1 s after the cancel came.
    assert len(final["output"]) == 21 and final["metrics"]["predict_time"] >= 2.0, final


def test_a_line_written_outside_predicts_context_is_not_the_predictions(sync_server):
    """Workaround: predict.py reports from within predict()'s context (contextvars.copy_context);
    the engine writes a request's log lines in its submitter's context (glm.sequence.Sequence.log)."""
    r = sync_server.predict({"input": {"n": 1, "delay": 0, "note": "context probe"}}).json()
    assert r["status"] == "succeeded", r
    assert "written by predict()" in r["logs"]
    assert "written by the generator" not in r["logs"], r["logs"]  # the server's thread iterates it
    time.sleep(0.2)
    line = next(line for line in sync_server.logs(200_000).splitlines() if "(context probe)" in line)
    assert '"target":"coglet::user"' in line, line  # filed as a worker log instead


def test_a_whole_number_float_reaches_an_integer_input_as_a_float(sync_server):
    """Workaround: cog_compat.whole_number."""
    r = sync_server.predict({"input": {"n": 2.0, "delay": 0}}).json()
    assert r["status"] == "succeeded" and r["output"][0] == "n is float;", r


def test_an_explicit_null_for_an_optional_input_is_refused(sync_server):
    """Workaround (README, docs/SERVICE.md): clients leave an optional input out instead of sending null."""
    r = sync_server.predict({"input": {"n": 1, "note": None}})
    assert r.status_code == 422 and "null is not of type" in r.text, r.text


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


def test_sigterm_closes_the_listener_and_waits_for_a_running_prediction_without_deadline(sync_app):
    """Workaround: cog_compat.watch_server_shutdown sees the closed port; predict.py drains."""
    with CogServer(sync_app) as srv:
        srv.wait_for({"READY"}, timeout=120)
        done = {}
        post = threading.Thread(target=lambda: done.update(r=requests.post(
            srv.url + "/predictions", json={"input": {"n": 40, "delay": 0.1}}, timeout=60)))
        post.start()
        deadline = time.monotonic() + 30
        while srv.log_count("written by the generator") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)  # the server only, as `docker stop` does
        while _accepts(srv.port) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        refused_after = time.monotonic() - t0
        assert refused_after < 2, refused_after
        assert srv.proc.poll() is None  # still running: waiting for the prediction
        post.join(60)
        body = done["r"].json()
        srv.proc.wait(timeout=30)
        ran = time.monotonic() - t0
    assert body["status"] == "succeeded" and len(body["output"]) == 41, body  # ran to its end
    assert ran >= 3.0, ran  # ~4 s of work left when SIGTERM came: no deadline cut it short
