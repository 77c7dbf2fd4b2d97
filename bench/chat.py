"""A multi-turn chat through the engine, with and without the prefix cache: time to first token per round.

Each round's prompt is the previous round's prompt and reply plus a new user turn (what a chat
client sends), as token ids: random ids of the real vocabulary, greedy decoding. Per round:
`ttft_cached_s` (engine with the prefix cache, in one process across the rounds),
`ttft_uncached_s` (a second engine without it, on the same prompts) and `ttft_new_only_s` (a prompt
of just the round's uncached tokens, from position 0, without the cache: the target "within 1.5x of
prefilling the new tokens alone"); `same_output` says whether both engines produced the same tokens.

    python -m bench.chat --layers 28                 # the full-size 4-round chat (CPU, float32)
    python -m bench.chat --layers 2 --first 1280 --rounds 2   # the issue's target: ~1,300-token history
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .ours import REPO, ensure_checkpoint

WORKER = r"""
import json, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import glm, glm.cpu.kernels
from glm.engine import Engine
from glm.sampling import SamplingParams
glm.cpu.kernels.get()
m = glm.load(args["path"], dtype=getattr(torch, args["dtype"]))
g = torch.Generator().manual_seed(0)
def ids(n): return torch.randint(0, 64789, (n,), generator=g).tolist()
params = SamplingParams(max_new_tokens=args["reply"], temperature=0.0)
cached = Engine(m.model, m.tokenizer, m.config, m.device, max_batch=1, prefix_cache_scope="shared")  # one client
uncached = Engine(m.model, m.tokenizer, m.config, m.device, max_batch=1, prefix_cache_tokens=0)

def ttft(engine, prompt):
    seq = engine.submit(prompt, params)
    t = time.perf_counter()
    while seq.t_first is None:
        engine.step()
    first = time.perf_counter() - t
    while not seq.done:
        engine.step()
    engine.step()  # reaped: into the cache
    return first, seq

with torch.inference_mode():
    ttft(uncached, ids(16)); ttft(uncached, ids(args["user"]))  # warm-up (first-call allocations, kernel load)
    prompt, rounds = ids(args["first"]), []
    for r in range(args["rounds"]):
        t_unc, s_unc = ttft(uncached, prompt)
        t_c, s_c = ttft(cached, prompt)
        new = len(prompt) - s_c.cached_tokens
        t_new = ttft(uncached, ids(new))[0] if s_c.cached_tokens else t_unc  # round 1: the same prompt
        rounds.append(dict(round=r + 1, prompt_tokens=len(prompt), cached_tokens=s_c.cached_tokens,
                           ttft_cached_s=round(t_c, 3), ttft_uncached_s=round(t_unc, 3),
                           ttft_new_only_s=round(t_new, 3),
                           cached_vs_uncached=round(t_c / t_unc, 3), cached_vs_new_only=round(t_c / t_new, 3),
                           same_output=s_c.tokens == s_unc.tokens))
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        prompt = s_c.tokens + ids(args["user"])
print(json.dumps(dict(layers=args["layers"], dtype=args["dtype"], threads=args["threads"], rounds=rounds)))
"""


def measure_chat(num_layers: int, threads: int = 2, dtype: str = "float32", rounds: int = 4, first: int = 64,
                 user: int = 64, reply: int = 24, preexec_fn=None, timeout: float = 7200) -> dict:
    path = ensure_checkpoint(num_layers)
    arg = json.dumps(dict(path=str(path), threads=threads, dtype=dtype, rounds=rounds, first=first, user=user,
                          reply=reply, layers=num_layers))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", WORKER, arg], cwd=REPO, env=env, stdout=subprocess.PIPE,
                       text=True, timeout=timeout, preexec_fn=preexec_fn)
    if r.returncode != 0:
        raise RuntimeError("the chat measurement failed (its stderr is above)")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--first", type=int, default=64, help="tokens of the first round's prompt")
    ap.add_argument("--user", type=int, default=64, help="tokens of each later user turn")
    ap.add_argument("--reply", type=int, default=24, help="tokens of each reply")
    a = ap.parse_args(argv)
    print(json.dumps(measure_chat(a.layers, a.threads, a.dtype, a.rounds, a.first, a.user, a.reply)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
