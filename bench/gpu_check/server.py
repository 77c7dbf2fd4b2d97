"""The real server: one streamed prediction through the Cog HTTP server (devtools/cogserver.py) on the
tiny checkpoint, on the GPU unless --interpret; its metrics and the service's log lines."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .report import Skip

REPO = Path(__file__).resolve().parents[2]
PROMPT = "[Round 1]\n\n问：你好\n\n答："
# The service's own log lines worth showing: setup's device and backend, the request's summary.
LOG_MARKERS = ("loading checkpoint", "loaded ", "backend", "GPU memory plan", "engine:", "warm-up", "prompt_tokens=",
               "self-test", "Traceback", "Error")


def install_wheels(wheels: Path, timeout_s: float) -> str:
    """cog and coglet from a folder of wheels, offline."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                           "cog", "coglet"], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install from {wheels} failed: {(proc.stderr or proc.stdout)[-1000:]}")
    return f"installed cog, coglet from {wheels}"


def message(line: str) -> str:
    """The text of one server log line (coglet writes JSON records: fields.message)."""
    try:
        return json.loads(line)["fields"]["message"].strip()
    except (ValueError, KeyError, TypeError):
        return line.strip()


def missing_packages() -> list[str]:
    return [name for name in ("cog", "coglet") if importlib.util.find_spec(name) is None]


def streamed_prediction(tiny_checkpoint: Path, workdir: Path, cuda: bool, wheels: Path | None, timeout_s: float):
    note = install_wheels(wheels, min(timeout_s, 300)) + "; " if wheels and missing_packages() else ""
    if missing := missing_packages():
        raise Skip(f"{' and '.join(missing)} not importable (install them, or pass --wheels DIR)")
    sys.path.insert(0, str(REPO))
    from devtools.cogserver import CogServer, make_app_dir

    app = make_app_dir(str(workdir / "app"))
    weights = Path(app) / "weights" / "chatglm2-6b-int4"
    shutil.copytree(tiny_checkpoint, weights)
    env = {"GLM_DEVICE": "cuda" if cuda else "cpu"}
    log_path = str(workdir / "cog-server.log")
    with CogServer(app, env=env, log_path=log_path) as server:
        server.wait_for({"READY"}, timeout=min(timeout_s, 300))
        body = {"input": {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.8, "top_p": 0.8, "seed": 3}}
        events = server.sse(body, timeout=min(timeout_s, 120))
        log = server.logs()
    outputs = [e for e in events if e["event"] == "output"]
    done = next((e["data"] for e in events if e["event"] == "completed"), None) or {}
    streamed = "".join(e["data"]["chunk"] for e in outputs)
    want = in_process_text(tiny_checkpoint, cuda, body["input"])
    lines = [message(ln)[:300] for ln in log.splitlines() if any(m in ln for m in LOG_MARKERS)][-12:]
    figures = {"events": len(events), "output_events": len(outputs), "status": done.get("status"),
               "metrics": done.get("metrics"), "output": "".join(done.get("output") or [])[:200], "log": lines}
    device_line = f"on {'cuda' if cuda else 'cpu'}"
    if done.get("status") != "succeeded" or not outputs:
        return "fail", f"{note}prediction ended {done.get('status')!r} with {len(outputs)} output events", figures
    if streamed != want:
        return "fail", f"{note}the streamed text differs from the same request in-process: {streamed!r} != {want!r}", figures
    if not (done.get("metrics") or {}).get("time_to_first_token"):
        return "fail", f"{note}no time_to_first_token among the metrics", figures
    if cuda and not any("cuda" in ln for ln in lines):
        return "fail", f"{note}the server's log does not say it serves on cuda", figures
    return "pass", f"{note}{len(outputs)} streamed output events {device_line} = the in-process text; metrics recorded", figures


def in_process_text(checkpoint: Path, cuda: bool, inp: dict) -> str:
    """The same request through glm in this process, on the device the server took (and so the same
    backend): what the streamed text must equal."""
    import glm
    model = glm.load(checkpoint, device="cuda" if cuda else "cpu")
    stream = model.generate(inp["prompt"], max_new_tokens=inp["max_tokens"], temperature=inp["temperature"],
                            top_p=inp["top_p"], seed=inp["seed"], fit_context=True)
    return "".join(stream)
