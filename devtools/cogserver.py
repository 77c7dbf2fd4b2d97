"""Run the real Cog prediction server (cog/coglet from PyPI) on this checkout as a subprocess:
the launcher the service tests and the demo (devtools.demo) share.

- `make_tiny_checkpoint()` writes the small random-weight checkpoint (`python -m devtools.tiny`).
- `make_app_dir()` lays out a throwaway project dir (predict.py, cog_compat.py, a symlink to glm/,
  .cog/openapi_schema.json written by devtools.openapi_schema: the Input schema as `cog build`
  reads it statically, so the tests serve what the image serves) so tests never touch
  the work tree.
- `CogServer` starts `python -m cog.server.http` on a free port in its own process
  group, with the interpreter's bin dir first on PATH (coglet spawns its worker as a
  bare `python`), waits with a deadline for a health status, and always kills the
  whole group on stop (and at exit; and, on Linux, the kernel kills the server if the
  parent process dies first). Every wait has a timeout; a failure carries the server log.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
HTTP_TIMEOUT = 60  # seconds, any single HTTP call to the server
RETRIES_409 = 100  # x 50 ms: how long a client keeps retrying a spurious 409 (see CogServer.predict)


class ServerError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_app_dir(dest: str) -> str:
    """A copy of the service as `cog build` would lay it out: predict.py, cog_compat.py, glm/, .cog/."""
    os.makedirs(dest, exist_ok=True)
    for name in ("predict.py", "cog_compat.py"):
        shutil.copy2(os.path.join(REPO, name), os.path.join(dest, name))
    os.symlink(os.path.join(REPO, "glm"), os.path.join(dest, "glm"))
    proc = subprocess.run(
        [PYTHON, "-m", "devtools.openapi_schema"],  # reads dest's predict.py: cwd first on sys.path
        cwd=dest, capture_output=True, text=True, timeout=300, env=_env({"PYTHONPATH": REPO}),
    )
    if proc.returncode != 0:
        raise ServerError(f"python -m devtools.openapi_schema failed:\n{proc.stdout}\n{proc.stderr}")
    return dest


def make_tiny_checkpoint(dest: str, *args: str) -> str:
    proc = subprocess.run(
        [PYTHON, "-m", "devtools.tiny", dest, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=_env({}),
    )
    if proc.returncode != 0:
        raise ServerError(f"python -m devtools.tiny failed:\n{proc.stdout}\n{proc.stderr}")
    return dest


def _env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    # coglet starts its worker as a bare `python` found on PATH: put ours first.
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("COG_WEIGHTS", None)
    env.update(extra)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: SIGKILL the server if the test process dies without running its finalizers."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    os.setsid()  # own process group, so stop() can kill the worker with it


_RUNNING: "set[CogServer]" = set()


def _stop_all() -> None:
    for srv in list(_RUNNING):
        srv.stop()


import atexit  # noqa: E402

atexit.register(_stop_all)


def live_group_members(pgid: int) -> List[int]:
    """PIDs still running (not zombies) in process group `pgid` (Linux /proc)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            alive.append(int(entry))
    return alive


class CogServer:
    def __init__(self, app_dir: str, env: Optional[Dict[str, str]] = None, log_path: Optional[str] = None):
        self.app_dir = app_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(app_dir, f"server-{self.port}.log")
        self.extra_env = {
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(self.port),
            **(env or {}),
        }
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "CogServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=self.app_dir, env=_env(self.extra_env), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        _RUNNING.add(self)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # The worker lives in the same session/group; make sure nothing is left.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        _RUNNING.discard(self)

    def __enter__(self) -> "CogServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 20000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                data = fh.read()
        except OSError:
            return "<no log>"
        return data[-tail:].decode("utf-8", "replace")

    def log_count(self, needle: str) -> int:
        """How many times `needle` occurs in the whole server log so far."""
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read().decode("utf-8", "replace").count(needle)
        except OSError:
            return 0

    def fail(self, msg: str) -> None:
        raise ServerError(f"{msg}\n--- cog server log ({self.log_path}) ---\n{self.logs()}")

    # -- health ------------------------------------------------------------------
    def health(self) -> Dict:
        return requests.get(self.url + "/health-check", timeout=10).json()

    def wait_for(self, statuses: Iterable[str], timeout: float = 300) -> Dict:
        """Poll /health-check until its status is one of `statuses`; fail with logs otherwise."""
        want = set(statuses)
        deadline = time.monotonic() + timeout
        last: Dict = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                self.fail(f"server exited with code {self.proc.returncode} while waiting for {want}")
            try:
                last = self.health()
                if last.get("status") in want:
                    return last
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.25)
        self.fail(f"timed out after {timeout}s waiting for health {want}; last={json.dumps(last)[:2000]}")
        return last  # unreachable

    # -- predictions -------------------------------------------------------------
    def predict(self, body: Dict, headers: Optional[Dict] = None, timeout: float = HTTP_TIMEOUT,
                wait_ready: bool = True, retry_409: bool = True):
        """POST /predictions. By default first waits for READY, and retries a 409 like a client would:
        coglet 0.23.1 now and then answers 409 although a slot is free (right after READY or after a
        prediction ends; docs/SERVICE.md). Tests about 409 pass retry_409=False."""
        if wait_ready:
            self.wait_for({"READY"}, timeout=60)
        return self._post(body, headers or {}, timeout, retry_409, stream=False)

    def _post(self, body: Dict, headers: Dict, timeout: float, retry_409: bool, stream: bool):
        for _ in range(RETRIES_409):
            r = requests.post(self.url + "/predictions", json=body, headers=headers, timeout=timeout, stream=stream)
            if r.status_code != 409 or not retry_409:
                return r
            r.close()
            time.sleep(0.05)
        return r

    def sse(self, body: Dict, on_event=None, timeout: float = HTTP_TIMEOUT, wait_ready: bool = True,
            retry_409: bool = True) -> List[Dict]:
        """POST with Accept: text/event-stream; return parsed events [{'event', 'data'}] in order.

        `on_event(event)` is called as each arrives (e.g. to cancel mid-stream).
        """
        events: List[Dict] = []
        if wait_ready:
            self.wait_for({"READY"}, timeout=60)  # see predict()
        with self._post(body, {"Accept": "text/event-stream"}, timeout, retry_409, stream=True) as r:
            if r.status_code != 200:
                self.fail(f"SSE request got HTTP {r.status_code}: {r.text[:2000]}")
            assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
            name, data = None, []
            deadline = time.monotonic() + timeout
            for raw in r.iter_lines(decode_unicode=False):
                if time.monotonic() > deadline:
                    self.fail("SSE stream exceeded its deadline")
                line = raw.decode("utf-8")
                if line == "":
                    if name is not None or data:
                        ev = {"event": name or "message", "data": json.loads("\n".join(data)) if data else None}
                        events.append(ev)
                        if on_event is not None:
                            on_event(ev)
                        if ev["event"] == "completed":
                            break
                    name, data = None, []
                elif line.startswith("event:"):
                    name = line[len("event:"):].strip()
                elif line.startswith("data:"):
                    data.append(line[len("data:"):].lstrip(" "))
        return events

    def cancel(self, prediction_id: str):
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=10)
