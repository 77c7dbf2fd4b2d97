"""python -m glm.gpu compile --arch 75: compile every Triton kernel of the GPU path for sm_<arch>."""
from __future__ import annotations

import argparse
import sys

from .compile import compile_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm.gpu")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile every kernel for a GPU architecture (no GPU needed)")
    c.add_argument("--arch", type=int, default=75, help="compute capability as an integer (75 = T4)")
    args = parser.parse_args(argv)
    return 0 if compile_all(args.arch) else 1


if __name__ == "__main__":
    sys.exit(main())
