"""Access to ../shared/reference (ground truth from outside the project)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("GLM_REFERENCE", ROOT.parent / "shared" / "reference"))


def reference_path(*parts: str) -> Path:
    """A file under ../shared/reference; fails (never skips) with a clear message if missing."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"reference file {path} is missing: tests need ../shared/reference beside the "
                    f"checkout (or GLM_REFERENCE pointing at it)", pytrace=False)
    return path


class DataReader:
    """Sequential reader of chatglm.cpp's headerless .data files (VECTORS.md section 1)."""

    def __init__(self, name: str):
        self.path = reference_path("chatglm_cpp", name)
        self.buf = self.path.read_bytes()
        self.offset = 0

    def read(self, *shape: int, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape))
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.offset).reshape(shape)
        self.offset += arr.nbytes
        return arr.copy()

    def assert_consumed(self) -> None:
        assert self.offset == len(self.buf), f"{self.path.name}: {len(self.buf) - self.offset} bytes left unread"
