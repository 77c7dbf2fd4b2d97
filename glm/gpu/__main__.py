"""python -m glm.gpu compile --arch 75: compile every Triton kernel of the GPU path for sm_<arch>;
python -m glm.gpu bytes: the bytes-per-decode-token table (glm/gpu/roofline.py)."""
from __future__ import annotations

import argparse
import sys

from . import _interpreting, roofline
from .compile import compile_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm.gpu")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile every kernel for a GPU architecture (no GPU needed)")
    c.add_argument("--arch", type=int, default=75, help="compute capability as an integer (75 = T4)")
    b = sub.add_parser("bytes", help="bytes per decode token and the tok/s bound on a T4, per path")
    b.add_argument("--bandwidth", type=float, default=320e9, help="bytes/s (T4: 320e9)")
    args = parser.parse_args(argv)
    if args.command == "bytes":
        print(roofline.table(_models(), args.bandwidth))
        return 0
    if _interpreting():
        # Under the interpreter @triton.jit gives interpreted functions, which do not compile.
        print("python -m glm.gpu compile: unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    return 0 if compile_all(args.arch) else 1


def _models() -> dict:
    from ..config import ChatGLMConfig
    v2 = ChatGLMConfig(quantization_bit=4)
    v1 = ChatGLMConfig(family="chatglm", kv_heads=32, ffn_hidden_size=16384, vocab_size=130528,
                       quantization_bit=8)
    return {"ChatGLM2-6B int4": v2, "ChatGLM-6B int8": v1}


if __name__ == "__main__":
    sys.exit(main())
