"""Shared fixtures: small checkpoints made by devtools.tiny, once per test session, and what the
service tests (test_service_http.py, test_concurrency.py) share."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (glm/gpu) run under Triton's interpreter on CPU tensors; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glm.cpu import kernels  # noqa: E402
from devtools.tiny import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The int4 tiny checkpoint: what `python -m devtools.tiny DIR` writes (the demo's), served by the
    service tests."""
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


# ---- service tests: the app dir, the in-process reference
@pytest.fixture(scope="session")
def app_dir(tmp_path_factory, tiny_dir):
    """Project dir as `cog build` lays it out, weights in weights/<name>/ (no COG_WEIGHTS)."""
    from devtools.cogserver import make_app_dir

    d = make_app_dir(str(tmp_path_factory.mktemp("app") / "src"))
    os.makedirs(os.path.join(d, "weights"))
    shutil.copytree(tiny_dir, os.path.join(d, "weights", "chatglm2-6b-int4"))
    return d


@pytest.fixture(scope="session")
def reference_model(tiny_dir):
    """The same checkpoint loaded in-process: what a request's output must equal."""
    import glm

    return glm.load(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def long_seed(reference_model):
    """A seed whose sampled output runs to LONG tokens (no early EOS) at temperature 1."""
    from service_helpers import LONG, reference

    for seed in range(40):
        _, st = reference(reference_model, max_tokens=LONG, temperature=1.0, top_p=1.0, seed=seed)
        if st.finish_reason == "length":
            return seed
    pytest.fail(f"no seed in 0..39 samples {LONG} tokens without EOS on the tiny checkpoint; cancel tests need one")


# The fused CPU kernels (glm.cpu.kernels) and every ISA path this CPU has, for the kernel tests.
ISAS = ["scalar", "avx2", "avx512", "avx512bf16"]


@pytest.fixture(scope="session")
def mod():
    if kernels.disabled():
        pytest.skip("GLM_NO_KERNELS is set: fused kernels disabled")
    m = kernels.get()
    if m is None:
        pytest.skip(f"fused kernel extension could not be built: {kernels.error()}")
    return m


def available_isas():
    m = kernels.get() if not kernels.disabled() else None
    if m is None:
        return ["scalar"]
    return ISAS[: ISAS.index(m.max_isa()) + 1]


@pytest.fixture(params=available_isas())
def isa(request, mod):
    old = mod.isa()
    mod.set_isa(request.param)
    yield request.param
    mod.set_isa(old)
