"""The main job end to end: start the real Cog server on this project and stream a prediction (SSE).

Run from the checkout as a module (script/demo does): `python -m devtools.demo [PROMPT] ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

import glm
from predict import DEFAULT_MODEL_NAME, weights_root
from devtools.cogserver import REPO, CogServer, make_tiny_checkpoint

# Under .cog/, which cog neither takes for weights nor copies into the image (devtools/cogport.py).
SCRATCH = Path(REPO) / ".cog" / "demo"
TINY = SCRATCH / "tiny-chatglm2-int4"


def pick_weights() -> str:
    """The checkpoint the server will find (glm.find_checkpoint, as predict.py's setup calls it), else the
    tiny random one."""
    try:
        path = glm.find_checkpoint(weights_root(), DEFAULT_MODEL_NAME)
        print(f"demo: real weights found in {path}")
        return path
    except glm.WeightsError as e:
        print(f"demo: NO REAL WEIGHTS ({e})\n"
              f"      -> using the project's own small RANDOM-WEIGHT checkpoint\n"
              f"      ({TINY.relative_to(REPO)}, made by `python -m devtools.tiny`): the reply is random tokens, not\n"
              f"      ChatGLM's answer. For the real model: script/download-weights, then run this again.")
    make_tiny_checkpoint(str(TINY))  # a few seconds; always in step with devtools.tiny
    return str(TINY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prompt", nargs="?", default="[Round 1]\n\n问：你好，请介绍一下你自己\n\n答：")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()

    os.chdir(REPO)  # weights/ and .cog/ are the checkout's
    weights = os.path.abspath(pick_weights())
    subprocess_env = {"COG_WEIGHTS": weights}
    os.system(f"{sys.executable} -m devtools.openapi_schema >/dev/null")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    server = CogServer(REPO, env=subprocess_env, log_path=str(SCRATCH / "server.log"))
    with server:
        print(f"demo: starting the Cog server (python -m cog.server.http) on {server.url} ...")
        t0 = time.monotonic()
        health = server.wait_for({"READY", "SETUP_FAILED"}, timeout=1800)
        if health["status"] != "READY":
            sys.exit(f"demo: setup failed:\n{health.get('setup', {}).get('logs', '')}")
        print(f"demo: READY after {time.monotonic() - t0:.1f}s; POST /predictions (Accept: text/event-stream)")
        body = {"input": {"prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": a.temperature,
                          "seed": a.seed}}
        print(f"--- prompt ---\n{a.prompt}\n--- streamed reply ---", flush=True)
        t0 = time.monotonic()
        with requests.post(server.url + "/predictions", json=body, headers={"Accept": "text/event-stream"},
                           stream=True, timeout=600) as r:
            r.raise_for_status()
            event = None
            for raw in r.iter_lines():
                line = raw.decode("utf-8")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "output":
                    sys.stdout.write(json.loads(line[5:])["chunk"])
                    sys.stdout.flush()
                elif line.startswith("data:") and event == "completed":
                    done = json.loads(line[5:])
                    print(f"\n--- {done.get('status')} in {time.monotonic() - t0:.1f}s ---")
                    logs = done.get("logs") or ""
                    print("server log:", *[ln for ln in logs.splitlines() if ln.strip()][-3:], sep="\n  ")
                    break


if __name__ == "__main__":
    main()
