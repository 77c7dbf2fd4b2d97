"""Memory read bandwidth: the roofline basis for batch-1 decode.

Decode at batch 1 has to stream every weight byte once per token, so
``tokens/s <= bandwidth / bytes_of_weights``. ``roofline_fraction`` in the report is
``decode_tok_s * weight_bytes / bandwidth``.
"""

from __future__ import annotations

import time


def measure_bandwidth(threads: int = 2, *, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    return measure_bandwidth_stats(threads, size_bytes=size_bytes, repeats=repeats)["best"]


def measure_bandwidth_stats(threads: int = 2, *, size_bytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Read bandwidth in GB/s (1e9 bytes/s) with ``threads`` threads: best and median
    of ``repeats`` passes (``measure_bandwidth`` returns the best = the roofline basis).

    On this shared VM the result swings between ~30 and ~60 GB/s depending on what the
    neighbours do, so it is measured in the same run as the decode figures. Sums a ``size_bytes`` float32 tensor with torch (a pure streaming read; the
    result is a scalar). The tensor is far larger than the L3 cache. Restores torch's
    previous thread count afterwards.
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(size_bytes // 4, dtype=torch.float32)  # touch every page once
        x.sum()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - t)
        del x
        times.sort()
        n = x_bytes(size_bytes)
        return dict(best=n / times[0] / 1e9, median=n / times[len(times) // 2] / 1e9)
    finally:
        torch.set_num_threads(prev)


def x_bytes(size_bytes: int) -> int:
    return (size_bytes // 4) * 4


def measure_bandwidth_subprocess(threads: int = 2, *, nice: int = 0, size_bytes: int = 1 << 30) -> dict:
    """measure_bandwidth_stats() in a fresh process (optionally at raised priority, see
    bench.chatglm_cpp.raise_priority), so the 1 GiB tensor never inflates our RSS.
    Returns {"best": GB/s, "median": GB/s}."""
    import os
    import subprocess
    import sys

    from .chatglm_cpp import raise_priority

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", str(threads),
                          "--bytes", str(size_bytes)], check=True, capture_output=True, text=True,
                         preexec_fn=(lambda: raise_priority(nice)) if nice else None)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=measure_bandwidth.__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bytes", type=int, default=1 << 30)
    a = ap.parse_args()
    import json

    print(json.dumps(measure_bandwidth_stats(a.threads, size_bytes=a.bytes)))
