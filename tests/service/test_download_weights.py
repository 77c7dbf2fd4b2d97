"""Tests of script/download-weights (devtools/download_weights.py) against a local stand-in for the Hub:
verification, atomic placement, the repo's pinned manifest."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from devtools import download_weights as dw
from devtools.cogserver import REPO

REV = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(tmp_path, sharded=False):
    """A local stand-in for a Hub repo, plus a manifest pinning its files."""
    import hashlib
    import json

    hub = tmp_path / "hub"
    hub.mkdir()
    blobs = {"config.json": b'{"model_type": "chatglm"}', "tokenizer.model": b"spm" * 100}
    if sharded:
        blobs["pytorch_model-00001-of-00002.bin"] = os.urandom(5000)
        blobs["pytorch_model-00002-of-00002.bin"] = os.urandom(3000)
        blobs["pytorch_model.bin.index.json"] = json.dumps({"weight_map": {
            "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}).encode()
    else:
        blobs["pytorch_model.bin"] = os.urandom(8000)
    for name, data in blobs.items():
        (hub / name).write_bytes(data)
    entry = {"repo": "THUDM/fake", "revision": REV,
             "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in blobs.items()}}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"default": "fake", "models": {"fake": entry}}))
    return hub, manifest, entry


def _patch_fetch(monkeypatch, dw, hub, fail_after=None, commit=REV):
    calls = []

    def fake_fetch(repo, revision, filenames, dest):
        calls.append((repo, revision, list(filenames)))
        for i, name in enumerate(filenames):
            if fail_after is not None and i >= fail_after:
                raise dw.DownloadError("connection reset (simulated)")
            shutil.copy2(hub / name, os.path.join(dest, name))
        os.makedirs(os.path.join(dest, ".cache", "huggingface"), exist_ok=True)  # as hf_hub_download does
        return commit

    monkeypatch.setattr(dw, "fetch_files", fake_fetch)
    return calls


def _leftovers(dest):
    return [n for n in os.listdir(dest) if n.startswith(".")]


def test_download_verifies_and_moves_into_place(tmp_path, monkeypatch):
    import json

    hub, manifest, entry = _fake_hub(tmp_path, sharded=True)
    calls = _patch_fetch(monkeypatch, dw, hub)
    dest = tmp_path / "weights"
    final = dw.download("fake", str(manifest), str(dest))
    assert final == str(dest / "fake")
    assert calls == [("THUDM/fake", REV, sorted(entry["files"]))]
    for name in entry["files"]:
        assert (hub / name).read_bytes() == (dest / "fake" / name).read_bytes()
    assert not (dest / "fake" / ".cache").exists()
    prov = json.loads((dest / "fake" / "download.json").read_text())
    assert prov["verified"] is True and prov["revision"] == REV
    assert _leftovers(dest) == []
    # Second run: already complete, nothing fetched.
    dw.download("fake", str(manifest), str(dest))
    assert len(calls) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_download_rejects_corrupt_file_and_leaves_nothing(tmp_path, monkeypatch, damage):
    hub, manifest, _ = _fake_hub(tmp_path)
    blob = hub / "pytorch_model.bin"
    data = blob.read_bytes()
    blob.write_bytes(bytes([data[0] ^ 1]) + data[1:] if damage == "flip" else data[:100])
    _patch_fetch(monkeypatch, dw, hub)
    dest = tmp_path / "weights"
    with pytest.raises(dw.DownloadError, match="pytorch_model.bin: (sha256|size)"):
        dw.download("fake", str(manifest), str(dest))
    assert not (dest / "fake").exists()
    assert _leftovers(dest) == []


def test_partial_download_leaves_nothing(tmp_path, monkeypatch):
    hub, manifest, _ = _fake_hub(tmp_path)
    _patch_fetch(monkeypatch, dw, hub, fail_after=1)
    dest = tmp_path / "weights"
    with pytest.raises(dw.DownloadError, match="simulated"):
        dw.download("fake", str(manifest), str(dest))
    assert os.listdir(dest) == []


def test_failed_redownload_keeps_previous_checkpoint(tmp_path, monkeypatch):
    hub, manifest, entry = _fake_hub(tmp_path)
    dest = tmp_path / "weights"
    good = dest / "fake"
    good.mkdir(parents=True)
    (good / "config.json").write_text("old")
    _patch_fetch(monkeypatch, dw, hub, fail_after=2)
    with pytest.raises(dw.DownloadError):
        dw.download("fake", str(manifest), str(dest))
    assert (good / "config.json").read_text() == "old"
    assert _leftovers(dest) == []
    _patch_fetch(monkeypatch, dw, hub)
    dw.download("fake", str(manifest), str(dest))
    assert (good / "config.json").read_bytes() == (hub / "config.json").read_bytes()
    assert _leftovers(dest) == []


def test_missing_shard_in_index_is_rejected(tmp_path, monkeypatch):
    import json

    hub, manifest, entry = _fake_hub(tmp_path, sharded=True)
    doc = json.loads(manifest.read_text())
    del doc["models"]["fake"]["files"]["pytorch_model-00002-of-00002.bin"]
    manifest.write_text(json.dumps(doc))
    _patch_fetch(monkeypatch, dw, hub)
    dest = tmp_path / "weights"
    with pytest.raises(dw.DownloadError, match="shards not downloaded"):
        dw.download("fake", str(manifest), str(dest))
    assert not (dest / "fake").exists() and _leftovers(dest) == []


def test_revision_mismatch_is_rejected(tmp_path, monkeypatch):
    hub, manifest, _ = _fake_hub(tmp_path)
    _patch_fetch(monkeypatch, dw, hub, commit="f" * 40)
    with pytest.raises(dw.DownloadError, match="manifest pins"):
        dw.download("fake", str(manifest), str(tmp_path / "weights"))


def test_unpinned_model_needs_allow_unverified(tmp_path, monkeypatch, capsys):
    import json

    hub, manifest, entry = _fake_hub(tmp_path)
    doc = json.loads(manifest.read_text())
    doc["models"]["fake"]["revision"] = None
    doc["models"]["fake"]["files"]["pytorch_model.bin"] = {"sha256": None, "size": None}
    manifest.write_text(json.dumps(doc))
    calls = _patch_fetch(monkeypatch, dw, hub, commit=None)
    dest = tmp_path / "weights"
    with pytest.raises(dw.DownloadError, match="--allow-unverified"):
        dw.download("fake", str(manifest), str(dest))
    assert calls == [] and not dest.exists()
    dw.download("fake", str(manifest), str(dest), allow_unverified=True, print_manifest=True)
    assert calls and calls[0][1] == "main"
    printed = json.loads(capsys.readouterr().out)
    assert printed["fake"]["files"]["pytorch_model.bin"]["size"] == 8000
    prov = json.loads((dest / "fake" / "download.json").read_text())
    assert prov["verified"] is False


def test_repo_manifest_covers_supported_models():
    import json

    with open(os.path.join(REPO, "weights", "manifest.json"), encoding="utf-8") as fh:
        doc = json.load(fh)
    assert doc["default"] == "chatglm2-6b-int4"
    want = {"chatglm2-6b-int4", "chatglm2-6b", "chatglm2-6b-32k", "chatglm2-6b-32k-int4",
            "chatglm-6b", "chatglm-6b-int8", "chatglm-6b-int4"}
    assert set(doc["models"]) == want
    for name, entry in doc["models"].items():
        assert entry["repo"] == f"THUDM/{name}"
        files = entry["files"]
        assert "config.json" in files
        assert ("tokenizer.model" in files) != ("ice_text.model" in files)
        assert any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files)
        shards = [f for f in files if f.startswith("pytorch_model-")]
        assert bool(shards) == ("pytorch_model.bin.index.json" in files)
        for meta in files.values():
            assert set(meta) == {"sha256", "size"}


def test_repo_manifest_is_pinned_from_the_reference():
    """Every model verifies by default: the Hub revision and each LFS file's sha256 and size are
    those of ../shared/reference/weights-pins.json; only chatglm-6b-int8's weight size is unknown."""
    import json

    pins_path = os.path.join(REPO, "..", "shared", "reference", "weights-pins.json")
    if not os.path.isfile(pins_path):
        pytest.fail(f"missing {pins_path} (see ../shared/reference/README.md)")
    with open(pins_path, encoding="utf-8") as fh:
        pins = json.load(fh)["repos"]
    doc = dw.load_manifest(dw.DEFAULT_MANIFEST)
    unsized = []
    for name, entry in doc["models"].items():
        assert dw.missing_pins(entry) == [], name
        pin = pins[entry["repo"]]
        assert entry["revision"] == pin["revision"], name
        lfs = {f: m for f, m in entry["files"].items() if not dw.pinned_by_revision(f)}
        assert set(lfs) == set(pin["files"]), name
        for f, meta in lfs.items():
            assert meta == {"sha256": pin["files"][f]["sha256"], "size": pin["files"][f]["size"]}, (name, f)
            if meta["size"] is None:
                unsized.append((name, f))
        for f, meta in entry["files"].items():
            if dw.pinned_by_revision(f):
                assert meta == {"sha256": None, "size": None}, (name, f)
    assert unsized == [("chatglm-6b-int8", "pytorch_model.bin")]
    assert doc["models"]["chatglm-6b-int8"].get("note")


def _real_shaped_hub(tmp_path, size=True):
    """A fake hub pinned like weights/manifest.json: LFS files by sha256 (size optional), the small
    JSON files only by the revision."""
    import hashlib
    import json

    hub, manifest, entry = _fake_hub(tmp_path)
    entry["files"]["config.json"] = {"sha256": None, "size": None}
    if not size:
        entry["files"]["pytorch_model.bin"]["size"] = None
    manifest.write_text(json.dumps({"default": "fake", "models": {"fake": entry}}))
    return hub, manifest, entry, hashlib.sha256((hub / "config.json").read_bytes()).hexdigest()


def test_download_pinned_like_the_repo_manifest(tmp_path, monkeypatch, capsys):
    import json

    hub, manifest, entry, config_sha = _real_shaped_hub(tmp_path, size=False)
    _patch_fetch(monkeypatch, dw, hub)
    dest = tmp_path / "weights"
    dw.download("fake", str(manifest), str(dest))  # no flag: a pinned manifest verifies by default
    prov = json.loads((dest / "fake" / "download.json").read_text())
    assert prov["verified"] is True and prov["files"]["config.json"]["sha256"] == config_sha
    err = capsys.readouterr().err
    assert f"config.json: fixed by revision {REV[:12]}" in err
    assert "verified pytorch_model.bin (sha256, 8000 bytes)" in err
    assert "verified tokenizer.model (sha256 and size" in err
    assert dw.already_complete(str(dest / "fake"), entry)


@pytest.mark.parametrize("damage", ["sha256", "size"])
def test_download_pinned_like_the_repo_manifest_rejects_a_bad_file(tmp_path, monkeypatch, damage):
    hub, manifest, _, _ = _real_shaped_hub(tmp_path, size=damage == "size")
    blob = hub / "pytorch_model.bin"
    data = blob.read_bytes()
    blob.write_bytes(bytes([data[0] ^ 1]) + data[1:] if damage == "sha256" else data + b"\0")
    _patch_fetch(monkeypatch, dw, hub)
    dest = tmp_path / "weights"
    with pytest.raises(dw.DownloadError, match=f"pytorch_model.bin: {damage} "):
        dw.download("fake", str(manifest), str(dest))
    assert not (dest / "fake").exists()
    assert os.listdir(dest) == []


def test_download_weights_cli_refuses_unverified(tmp_path):
    import json
    import subprocess

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"default": "m", "models": {"m": {
        "repo": "THUDM/m", "revision": None, "files": {"config.json": {"sha256": None, "size": None}},
        "note": "unpinned"}}}))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "script", "download-weights"),
         "--manifest", str(manifest), "--dest", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--allow-unverified" in proc.stderr
    assert not (tmp_path / "w").exists()
