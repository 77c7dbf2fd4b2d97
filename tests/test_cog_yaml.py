"""cog.yaml is valid for Cog and consistent with the project's pins and layout."""
from __future__ import annotations

import json
import os
import re

import pytest

import jsonschema
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_CANDIDATES = [
    os.path.join(REPO, "..", "shared", "reference", "cog", "config_schema_v1.0.json"),
    os.path.join(REPO, "shared", "reference", "cog", "config_schema_v1.0.json"),
    "/work/shared/reference/cog/config_schema_v1.0.json",
]


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
    path = next((p for p in SCHEMA_CANDIDATES if os.path.isfile(p)), None)
    if path is None:
        pytest.fail("Cog's config schema is missing: expected ../shared/reference/cog/config_schema_v1.0.json "
                    "beside the checkout (see ../shared/reference/README.md)")
    with open(path, encoding="utf-8") as fh:
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
    assert "torch==2.13.0" in _requirements("requirements.txt")
    for needed in ("sentencepiece", "safetensors", "huggingface-hub", "ninja", "numpy"):
        assert needed in names, needed


def test_dockerignore_keeps_tests_out_and_weights_in():
    with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as fh:
        lines = [l.strip() for l in fh if l.strip() and not l.startswith("#")]
    for must in (".git", "tests", "**/__pycache__", ".pytest_cache"):
        assert must in lines, must
    assert not any(l.rstrip("/") in ("weights", "weights/*", "weights/**") for l in lines)
