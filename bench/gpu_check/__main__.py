"""script/gpu-check [--out DIR] [--quick] [--interpret] [--wheels DIR] [--reference DIR]

Proves the GPU path on the first GPU it meets, in one run (<= 8 minutes on an H100):
  environment   GPU, capability, driver, torch/triton, free memory
  correctness   the device tests of tests/, THUDM's reference vectors and the kernel self-test on the
                Triton backend, every kernel on the device vs the Triton interpreter, the design's
                bitwise invariants, the tensor-core decode GEMV vs the FMA one, 8 concurrent streams =
                their solo runs, exact prefix-cache reuse, CUDA graph replay = eager decode (absent
                without glm.gpu.graphs)
  speed         a full-size random ChatGLM2-6B int4 checkpoint (and ChatGLM-6B int8 unless --quick)
                written on the spot: load, TTFT at 1k tokens, prefill, decode at batch 1 and 8 and at
                8k context, chat round 2 with and without the prefix cache, peak memory, bandwidth
  server        one streamed prediction through the real Cog server (skipped without cog/coglet)
Prints a summary (also DIR/gpu-check.txt) and writes DIR/gpu-check.json; exits 0 only when every correctness item passed
(or is absent) and no item failed. Each item runs under its own time limit; a failure never stops the
items after it.

--interpret: the same items on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1) on the
tiny checkpoints, to test this program's logic without a GPU; its timing figures mean nothing.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The interpreter's limits: its speed is the host's, and a shared CI box can be several times slower
# than an idle one (the run's deadline still bounds the whole).
INTERPRET_SLOWDOWN = 3
DEFAULT_REFERENCE = Path(os.environ.get("GLM_REFERENCE", REPO.parent / "shared" / "reference"))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="script/gpu-check", description=__doc__.split("\n\n")[1].splitlines()[0])
    ap.add_argument("--out", default="gpu-check-out", help="folder for gpu-check.json (default ./gpu-check-out)")
    ap.add_argument("--quick", action="store_true", help="leave out the full-size ChatGLM-6B int8 figures")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU tensors through the Triton interpreter, tiny checkpoints (logic only)")
    ap.add_argument("--wheels", type=Path, help="install cog and coglet from this folder (pip --no-index) if missing")
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                    help="a copy of shared/reference: THUDM's vectors and the real tokenizers "
                         "(default $GLM_REFERENCE or ../shared/reference)")
    ap.add_argument("--deadline", type=float, default=570.0,
                    help="seconds for the whole run; items not started by then are skipped and a hung "
                         "one is stopped with a stack dump (default 570: inside a 10-minute lease)")
    return ap.parse_args(argv)


class Checks:
    """Runs the items in order, each under min(its limit, the time left), into one Report."""

    def __init__(self, args, report, start: float):
        self.args, self.report, self.start = args, report, start

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def __call__(self, name: str, kind: str, check, limit_s: float):
        from .report import Item, line, run_item
        limit_s *= INTERPRET_SLOWDOWN if self.args.interpret else 1
        if self.left() < 15:
            item = Item(name, kind, "skipped", f"the run's deadline ({self.args.deadline:.0f}s) was reached")
        else:
            item = run_item(name, kind, check, min(limit_s, self.left() - 10))
        self.report.add(item)
        print(line(item), flush=True)
        return item


def main(argv=None) -> int:
    args = parse(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    sys.path.insert(0, str(REPO))
    import torch

    from .report import Report, summary

    if not args.interpret and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device (run it on a GPU machine, or with --interpret here)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.interpret else "cuda")
    meta = {"interpret": args.interpret, "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = Report(out / "gpu-check.json", meta)
    start = time.monotonic()
    faulthandler.dump_traceback_later(args.deadline + 20, exit=True)  # a hang in native code: stop, JSON kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the work folder
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        run_all(Checks(args, report, start), args, device, work)
    finally:
        faulthandler.cancel_dump_traceback_later()
        shutil.rmtree(work, ignore_errors=True)
    report.meta["seconds"] = round(time.monotonic() - start, 1)
    report.write()
    text = summary(report)
    (out / "gpu-check.txt").write_text(text + "\n")
    print("\n" + text)
    return 0 if report.ok else 1


def run_all(check: Checks, args, device, work: Path) -> None:
    from . import correctness, environment, kernels, server, speed

    cuda = device.type == "cuda"
    size = "full" if cuda else "small"
    check("environment", "environment", lambda: environment.describe(device), 60)
    check("kernel_selftest", "correctness", lambda: correctness.selftest(device), 120)
    check("reference_vectors", "correctness", lambda: correctness.reference_vectors(device, args.reference), 120)
    check("kernels_vs_interpreter", "correctness",
          lambda: kernels.compare_with_interpreter(device, size, work, check.left() - 15), 300)
    check("kernels_bitwise", "correctness", lambda: kernels.bitwise_invariants(device, size), 180)
    check("mma_gemv", "correctness", lambda: kernels.mma_gemv(device), 120)

    tiny = work / "tiny-int4"
    loaded = {}
    # One model for the engine items (exact rows are a setting of each engine's steps, not the model's).
    tiny_model = lambda: loaded.get("m") or loaded.setdefault("m", _load_tiny(tiny, device))  # noqa: E731
    # The interpreter takes about 2 CPU-seconds a forward pass of the tiny model: fewer streams and tokens there.
    streams, new_tokens = (8, 12) if cuda else (3, 4)
    check("batch_invariance", "correctness", lambda: correctness.batch_invariance(tiny_model(), streams, new_tokens), 240)
    check("prefix_cache_exact", "correctness", lambda: correctness.prefix_cache_exact(tiny_model(), 8 if cuda else 2), 180)
    check("cuda_graphs", "correctness",
          lambda: correctness.cuda_graphs(tiny_model(), cuda, streams, new_tokens), 180)
    check("device_tests", "correctness",
          lambda: correctness.device_tests(cuda, work, args.reference, check.left() - 15), 300)

    # Before the speed figures, which take the most time: the deadline never cuts a check.
    check("cog_server_stream", "server",
          lambda: server.streamed_prediction(_tiny(tiny), work, cuda, args.wheels, check.left() - 15), 300)

    run = speed.Run(device, speed.WORKLOADS["full" if cuda else "tiny"])
    families = [("chatglm2", "chatglm2-6b-int4")] + ([] if args.quick else [("chatglm", "chatglm-6b-int8")])
    for family, name in families:
        path = work / name
        check(f"{name}_write", "speed", lambda: speed.write_checkpoint(path, family, cuda, args.reference, cuda,
                                                                        check.left() - 15), 300)
        check(f"{name}_load", "speed", lambda: speed.load(run, path) if path.is_dir() else _no(path), 240)
        check(f"{name}_ttft_prefill", "speed", lambda: speed.ttft_and_prefill(run), 120)
        check(f"{name}_decode", "speed", lambda: speed.decode_batches(run), 180)
        if family == "chatglm2":  # ChatGLM-6B has no prefix cache and a 2k context
            check(f"{name}_decode_long", "speed", lambda: speed.decode_long(run), 180)
            check(f"{name}_chat_round2", "speed", lambda: speed.chat_round2(run), 180)
        check(f"{name}_peak_memory", "speed", lambda: speed.peak_memory(run), 30)
        speed.unload(run)
        shutil.rmtree(path, ignore_errors=True)



def _tiny(path: Path) -> Path:
    """The tiny int4 checkpoint, written once (what the demo and the tests run on)."""
    if not (path / "pytorch_model.bin").is_file():
        from devtools.tiny import write_checkpoint
        write_checkpoint(path, bits=4)
    return path


def _load_tiny(path: Path, device):
    import glm
    return glm.load(_tiny(path), device=device, backend="triton")


def _no(path: Path):
    from .report import Skip
    raise Skip(f"no checkpoint at {path} (see the write item)")


if __name__ == "__main__":
    sys.exit(main())
