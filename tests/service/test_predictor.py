"""Unit tests of predict.py's own helpers, in-process (no server): weights discovery as setup does
it (glm.find_checkpoint with the default model preferred) and stop-sequence parsing."""
from __future__ import annotations

import os

import pytest


def _predict_module():
    import importlib

    return importlib.import_module("predict")


def _ckpt(path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        fh.write("{}")
    return str(path)


def test_find_checkpoint_layouts(tmp_path):
    import glm

    p = _predict_module()

    def find(root):  # as setup looks: the default model's directory preferred
        return glm.find_checkpoint(root, p.DEFAULT_MODEL_NAME)

    direct = _ckpt(tmp_path / "direct")
    assert find(direct) == direct
    one = tmp_path / "one"
    _ckpt(one / "chatglm2-6b")
    (one / ".tmp-chatglm2-6b-int4-x").mkdir()
    _ckpt(one / ".tmp-chatglm2-6b-int4-y")  # hidden (in-progress download): never picked
    assert find(str(one)) == str(one / "chatglm2-6b")
    many = tmp_path / "many"
    _ckpt(many / "chatglm-6b")
    _ckpt(many / "chatglm2-6b-int4")
    _ckpt(many / "aaa")
    assert find(str(many)) == str(many / "chatglm2-6b-int4")
    nodefault = tmp_path / "nodefault"
    _ckpt(nodefault / "zeta")
    _ckpt(nodefault / "alpha")
    assert find(str(nodefault)) == str(nodefault / "alpha")
    with pytest.raises(glm.WeightsError, match="does not exist"):
        find(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(glm.WeightsError, match="no checkpoint"):
        find(str(tmp_path / "empty"))
    with pytest.raises(glm.WeightsError, match="URL"):
        find("https://example.invalid/weights.tar")


def test_parse_stop_sequences():
    p = _predict_module()
    assert p.parse_stop_sequences("") == []
    assert p.parse_stop_sequences("<end>,问：") == ["<end>", "问："]
    assert p.parse_stop_sequences(" a , b,,") == ["a", "b"]


def test_stop_sequences_longer_than_any_valid_list_are_refused_before_splitting():
    import glm

    p = _predict_module()
    longest = ",".join("x" * 128 for _ in range(32))
    assert len(p.parse_stop_sequences(longest)) == 32
    bomb = "," * (p.MAX_STOP_SEQUENCES_CHARS + 1)
    with pytest.raises(glm.InputError, match=f"stop_sequences is {len(bomb)} characters, at most 8192"):
        p.parse_stop_sequences(bomb)
