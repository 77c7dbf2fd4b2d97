"""cog.yaml is valid for Cog and consistent with the project's pins and layout."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import jsonschema
import yaml

REPO = str(Path(__file__).resolve().parents[2])
# The shared reference beside the checkout.
SCHEMA = os.path.join(REPO, "..", "shared", "reference", "cog", "config_schema_v1.0.json")


def _load_cog_yaml():
    with open(os.path.join(REPO, "cog.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _requirements(name):
    pins = {}
    with open(os.path.join(REPO, name), encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                pins[line] = line
    return list(pins)


def test_cog_yaml_matches_config_schema():
    if not os.path.isfile(SCHEMA):
        pytest.fail("Cog's config schema is missing: expected ../shared/reference/cog/config_schema_v1.0.json "
                    "beside the checkout (see ../shared/reference/README.md)")
    with open(SCHEMA, encoding="utf-8") as fh:
        schema = json.load(fh)
    jsonschema.validate(_load_cog_yaml(), schema)


def test_cog_yaml_settings():
    cfg = _load_cog_yaml()
    assert cfg["predict"] == "predict.py:Predictor"
    build = cfg["build"]
    assert build["gpu"] is True
    assert str(build["python_version"]) == "3.11"
    assert re.fullmatch(r"\d+\.\d+", str(build["cuda"]))
    assert build["python_requirements"] == "requirements.txt"
    assert os.path.isfile(os.path.join(REPO, build["python_requirements"]))


# pkg/dockerfile/base.go 24-52 of cog 0.23.1: the apt packages its cog-base images carry (its apt
# step drops these names there, standard_generator.go 520-536); NVIDIA's CUDA image has none of them.
COG_BASE_IMAGE_PACKAGES = {"build-essential", "cmake", "curl", "ffmpeg", "findutils", "g++", "gcc", "git", "wget"}


def test_the_image_has_a_c_compiler_on_any_base():
    """Triton's launcher stubs (triton/runtime/build.py: gcc or clang, else "Failed to find C
    compiler") and the CPU kernels (g++) compile at boot."""
    packages = _load_cog_yaml()["build"]["system_packages"]
    assert "build-essential" in packages
    assert set(packages) <= COG_BASE_IMAGE_PACKAGES, "a package the cog base image lacks adds an apt step there"


def test_concurrency_matches_the_engine_batch():
    import sys

    sys.path.insert(0, REPO)
    import predict

    assert _load_cog_yaml()["concurrency"]["max"] == predict.DEFAULT_CONCURRENCY


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-test.txt"])
def test_requirements_are_exact_pins(name):
    reqs = _requirements(name)
    assert reqs
    for r in reqs:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+\-]*", r), f"not an exact pin: {r}"


def test_runtime_requirements_cover_the_engine():
    names = {r.split("==")[0].lower().replace("_", "-") for r in _requirements("requirements.txt")}
    assert "torch" in names
    for needed in ("sentencepiece", "safetensors", "ninja", "numpy"):
        assert needed in names, needed


def test_development_tools_stay_out_of_the_image():
    """protobuf serves devtools.tiny only (SentencePiece model protos) and huggingface_hub
    script/download-weights only; the service never imports either, nor devtools/ (not in the image)."""
    runtime = {r.split("==")[0].lower() for r in _requirements("requirements.txt")}
    assert not runtime & {"protobuf", "huggingface_hub", "huggingface-hub"}
    assert _pin("protobuf", "requirements-test.txt") and _pin("huggingface_hub", "requirements-test.txt")
    service = [os.path.join(REPO, "predict.py"), os.path.join(REPO, "cog_compat.py")] + [
        str(p) for p in Path(REPO, "glm").rglob("*.py")]
    assert len(service) > 20 and not any(p.endswith("tiny.py") for p in service)
    for path in service:
        with open(path, encoding="utf-8") as fh:
            src = fh.read()
        assert not re.search(r"\bimport (devtools|tiny)\b|\bfrom (devtools|\.tiny|glm\.tiny)\b|_pb2\b|huggingface_hub",
                             src), path


def _pin(name, file):
    return next(r.split("==")[1] for r in _requirements(file) if r.split("==")[0].lower() == name)


def _reference(name):
    path = os.path.join(REPO, "..", "shared", "reference", "cog", name)
    if not os.path.isfile(path):
        pytest.fail(f"missing {path} (see ../shared/reference/README.md)")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def test_torch_and_cuda_are_a_pair_cog_knows():
    """cog 0.23.1 picks PyTorch's wheel index (and its prebuilt base image) only for a pair in its
    table; the tests run the same torch version as the image (requirements.txt has the one pin)."""
    import torch

    cuda = str(_load_cog_yaml()["build"]["cuda"])
    pin = _pin("torch", "requirements.txt")
    assert torch.__version__.split("+")[0] == pin, "the test venv runs another torch than the image"
    rows = [r for r in _reference("torch_compatibility.json")
            if r["Torch"].split("+")[0] == pin and r["CUDA"] == cuda]
    assert rows, f"torch {pin} with CUDA {cuda} is not in cog's table"
    assert rows[0]["Torch"] == f"{pin}+cu{cuda.replace('.', '')}"
    assert "3.11" in rows[0]["Pythons"]
    assert cuda.startswith("12."), "CUDA 13 needs a driver >= 580, which Replicate's hosts may not have"


def test_sdk_and_coglet_are_pinned_to_the_tested_versions():
    """build.sdk_version pins the cog SDK; cog strips cog/coglet from requirements.txt and would take
    the newest coglet < 1.0, so the README's build command and script/deploy's push pin it with
    COGLET_WHEEL."""
    assert str(_load_cog_yaml()["build"]["sdk_version"]) == _pin("cog", "requirements-test.txt")
    runtime = {r.split("==")[0].lower() for r in _requirements("requirements.txt")}
    assert not runtime & {"cog", "coglet"}
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    coglet = _pin("coglet", "requirements-test.txt")
    builds = [ln for ln in readme.splitlines() if re.match(r"\s*(COGLET_WHEEL=\S+ )?cog (build|push)\b", ln)]
    assert builds, "README shows no `cog build`"
    for ln in builds:
        assert ln.lstrip().startswith(f"COGLET_WHEEL=pypi:{coglet} cog build "), ln
    assert re.search(r"^script/deploy r8\.im/<you>/<model>", readme, re.M), "README deploys without script/deploy"
    from devtools import deploy

    assert deploy.COG_VERSION == _pin("cog", "requirements-test.txt") == coglet
    assert deploy.COGLET_WHEEL == f"pypi:{coglet}"


def test_dockerignore_keeps_tests_out_and_weights_in():
    with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as fh:
        lines = [l.strip() for l in fh if l.strip() and not l.startswith("#")]
    for must in (".git", "tests", "devtools", "**/__pycache__", ".pytest_cache", ".venv", ".cog/venv", "weights/.tmp-*",
                 "weights/.old-*"):
        assert must in lines, must
    assert not any(l.rstrip("/") in ("weights", "weights/*", "weights/**") for l in lines)
