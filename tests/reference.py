"""Access to ../shared/reference (ground truth from outside the project)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from devtools import vectors

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("GLM_REFERENCE", ROOT.parent / "shared" / "reference"))


def reference_path(*parts: str) -> Path:
    """A file under ../shared/reference; fails (never skips) with a clear message if missing."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"reference file {path} is missing: tests need ../shared/reference beside the "
                    f"checkout (or GLM_REFERENCE pointing at it)", pytrace=False)
    return path


class DataReader(vectors.DataReader):
    """chatglm.cpp's file `name` under ../shared/reference/chatglm_cpp (devtools.vectors reads it)."""

    def __init__(self, name: str):
        super().__init__(reference_path("chatglm_cpp", name))
