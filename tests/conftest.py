"""Shared fixtures: small checkpoints made by glm.tiny, once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glm.tiny import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The int4 tiny checkpoint (the one the demo and the service tests use)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-int4"), bits=4)


@pytest.fixture(scope="session")
def tiny8_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-int8"), bits=8)


@pytest.fixture(scope="session")
def tiny_fp16_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-fp16"), bits=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import glm
    return glm.load(tiny_dir)
