"""What the service tests share besides the server launcher (devtools/cogserver.py): the in-process
reference a response must equal, the default and varied prompts, a readiness check, a webhook sink
and the worker's memory."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterable, List

from devtools.cogserver import HTTP_TIMEOUT, CogServer

DEFAULT_PROMPT = "[Round 1]\n\n问：你好\n\n答："
# Prompts that differ in script, length and rounds, for many requests at once.
PROMPTS = [
    "[Round 1]\n\n问：你好\n\n答：",
    "[Round 1]\n\n问：讲个故事 😀\n\n答：",
    "[Round 1]\n\n问：What is the capital of France?\n\n答：",
    "[Round 1]\n\n问：写一首关于秋天的诗\n\n答：",
    "[Round 1]\n\n问：1+1=?\n\n答：",
    "[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：再见\n\n答：",
    "[Round 1]\n\n问：Tell me about ChatGLM2, its architecture and its tokenizer.\n\n答：",
    "[Round 1]\n\n问：北京\n\n答：",
]
# Long enough to still be generating when a cancel arrives (~400 tokens/s on the tiny checkpoint).
LONG = 400


def reference(engine, prompt=DEFAULT_PROMPT, max_tokens=2048, temperature=0.75, top_p=0.8,
              top_k=0, repetition_penalty=1.0, stop=(), seed=None):
    """What glm generates in-process for the same inputs (same clamp as the service): (text, stream)."""
    stream = engine.generate(
        prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop), fit_context=True,
    )
    chunks = list(stream)
    return "".join(chunks), stream


def assert_ready(server: "CogServer") -> None:
    h = server.wait_for({"READY"}, timeout=60)
    assert h["status"] == "READY"


class WebhookReceiver:
    """A tiny local HTTP server collecting webhook POST bodies, in arrival order."""

    def __init__(self):
        received = self.received = []
        cond = self.cond = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                with cond:
                    received.append(body)
                    cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for_status(self, statuses: Iterable[str], timeout: float = HTTP_TIMEOUT) -> List[Dict]:
        want = set(statuses)
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(b and b.get("status") in want for b in self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no webhook with status in {want}; got {self.received!r}")
                self.cond.wait(left)
            return list(self.received)


def worker_rss_mb(server: CogServer) -> tuple[float, float]:
    """(RSS, peak RSS) of the server's Python worker (the process that runs predict()), in MB."""
    pid = worker_pid(server)
    status = Path(f"/proc/{pid}/status").read_text()
    return (int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024, int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024)


def worker_pid(server: CogServer) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"_run_worker" in cmd and int(stat[stat.rindex(")") + 2:].split()[2]) == server.proc.pid:
            return int(entry.name)
    raise AssertionError("worker process not found")
