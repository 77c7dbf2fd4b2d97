"""Fetch a THUDM ChatGLM checkpoint into weights/<name>/, verified against weights/manifest.json.

    script/download-weights [MODEL] [--dest weights]

MODEL defaults to chatglm2-6b-int4; see weights/manifest.json for the others. Only the files the
engine needs are fetched (config.json, tokenizer.model or ice_text.model, pytorch_model*.bin and
the shard index), at the revision pinned in the manifest, with huggingface_hub (pinned in
requirements-test.txt: run under the checkout's venv, .venv/bin/python, when python3 lacks it).

Safety: files land in a hidden temp dir next to the destination (weights/.tmp-*), every Git LFS
file (weights, tokenizer) is checked against the manifest's sha256 and size, and only then is the
directory renamed into place (an atomic rename on one filesystem). A failed or interrupted download
never leaves a weights/<name>/ that looks complete; the predictor ignores hidden directories.
Small non-LFS files (config.json, the shard index) are fixed by the pinned revision (a commit id);
their sha256 is recorded in weights/<name>/download.json.

A manifest entry that pins no revision or no LFS hash (null) is refused unless --allow-unverified is
given; then it fetches `main`, records what it got, and with --print-manifest prints the entry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
DEFAULT_MANIFEST = os.path.join(REPO_ROOT, "weights", "manifest.json")
DEFAULT_DEST = os.path.join(REPO_ROOT, "weights")
PROVENANCE = "download.json"  # written inside weights/<name>/
HEX = set("0123456789abcdef")


class DownloadError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[download-weights] {msg}", file=sys.stderr, flush=True)


def load_manifest(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise DownloadError(f"cannot read manifest {path}: {e}")
    if not isinstance(doc.get("models"), dict) or not doc["models"]:
        raise DownloadError(f"manifest {path} has no 'models'")
    return doc


def is_pinned_revision(rev: Optional[str]) -> bool:
    return isinstance(rev, str) and len(rev) == 40 and set(rev) <= HEX


def pinned_by_revision(name: str) -> bool:
    """Small non-LFS files: the pinned commit fixes their content; the manifest need not hash them."""
    return name.endswith(".json")


def missing_pins(entry: Dict) -> List[str]:
    """What the manifest does not pin for this model (empty = fully verifiable)."""
    gaps = []
    if not is_pinned_revision(entry.get("revision")):
        gaps.append("revision (40-hex commit id)")
    files = entry.get("files") or {}
    if not files:
        gaps.append("file list")
    for name, meta in sorted(files.items()):
        meta = meta or {}
        if pinned_by_revision(name):
            continue
        if not (isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64):
            gaps.append(f"{name}: sha256")
    return gaps


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_files(repo: str, revision: str, filenames: List[str], dest: str) -> Optional[str]:
    """Download `filenames` of model `repo` at `revision` into directory `dest`.

    Returns the resolved commit id when known. Tests replace this function with a local fake hub.
    """
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: run script/bootstrap (it installs the pin of "
                            "requirements-test.txt into the checkout's venv, which this script then uses)")
    commit = None
    try:
        commit = HfApi().model_info(repo, revision=revision).sha
    except Exception as e:  # informational only; the hashes are what we trust
        log(f"could not resolve {repo}@{revision} to a commit id: {e}")
    rev = commit or revision
    for name in filenames:
        log(f"fetching {repo}/{name} @ {rev}")
        hf_hub_download(repo_id=repo, filename=name, revision=rev, local_dir=dest)
    return commit


def verify(dir_: str, files: Dict[str, Dict], revision: str, allow_unverified: bool) -> Dict[str, Dict]:
    """Check every manifest file in dir_; return the measured {name: {sha256, size}}."""
    measured = {}
    for name, meta in sorted(files.items()):
        meta = meta or {}
        path = os.path.join(dir_, name)
        if not os.path.isfile(path):
            raise DownloadError(f"{name}: missing after download")
        size = os.path.getsize(path)
        want_size = meta.get("size")
        if want_size is not None and size != want_size:
            raise DownloadError(f"{name}: size {size} bytes, manifest says {want_size}")
        digest = sha256_of(path)
        want = meta.get("sha256")
        if want is not None and digest != want:
            raise DownloadError(f"{name}: sha256 {digest}, manifest says {want}")
        if want is not None:
            log(f"verified {name} (sha256{' and size' if want_size is not None else ''}, {size} bytes)")
        elif pinned_by_revision(name) and is_pinned_revision(revision):
            log(f"{name}: fixed by revision {revision[:12]} (sha256 {digest[:16]}..., {size} bytes)")
        elif allow_unverified:
            log(f"UNVERIFIED {name}: sha256 {digest}, {size} bytes (not in manifest)")
        else:  # pragma: no cover - guarded by missing_pins
            raise DownloadError(f"{name}: no sha256 in the manifest")
        measured[name] = {"sha256": digest, "size": size}
    check_complete(dir_, files)
    return measured


def check_complete(dir_: str, files: Dict[str, Dict]) -> None:
    """The checkpoint must be loadable as a whole: config, a tokenizer, all weight shards."""
    names = set(files)
    if "config.json" not in names:
        raise DownloadError("manifest lists no config.json")
    if not names & {"tokenizer.model", "ice_text.model"}:
        raise DownloadError("manifest lists no tokenizer (tokenizer.model or ice_text.model)")
    if not any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
        raise DownloadError("manifest lists no pytorch_model*.bin")
    index = os.path.join(dir_, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                shards = set(json.load(fh)["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise DownloadError(f"pytorch_model.bin.index.json: unreadable ({e})")
        lost = sorted(s for s in shards if not os.path.isfile(os.path.join(dir_, s)))
        if lost:
            raise DownloadError(f"pytorch_model.bin.index.json names shards not downloaded: {', '.join(lost)}")


def already_complete(final: str, entry: Dict) -> bool:
    """True when final/ holds a verified copy of exactly this pinned entry."""
    if missing_pins(entry) or not os.path.isdir(final):
        return False
    try:
        with open(os.path.join(final, PROVENANCE), encoding="utf-8") as fh:
            prov = json.load(fh)
    except (OSError, ValueError):
        return False
    if prov.get("revision") != entry["revision"] or prov.get("verified") is not True:
        return False
    recorded = prov.get("files") or {}
    for name, meta in entry["files"].items():
        path = os.path.join(final, name)
        want = meta.get("size") or (recorded.get(name) or {}).get("size")
        if not os.path.isfile(path) or os.path.getsize(path) != want:
            return False
    return True


def download(model: str, manifest_path: str = DEFAULT_MANIFEST, dest: str = DEFAULT_DEST,
             allow_unverified: bool = False, print_manifest: bool = False) -> str:
    doc = load_manifest(manifest_path)
    models = doc["models"]
    if model not in models:
        raise DownloadError(f"unknown model {model!r}; choose one of: {', '.join(sorted(models))}")
    entry = models[model]
    repo = entry["repo"]
    files = entry.get("files") or {}
    gaps = missing_pins(entry)
    if gaps and not allow_unverified:
        raise DownloadError(
            f"{model}: the manifest does not pin {', '.join(gaps)}, so the download cannot be "
            f"verified. Re-run with --allow-unverified to fetch {repo}@main anyway "
            f"(add --print-manifest to get the entry to commit)."
        )
    if not files:
        raise DownloadError(f"{model}: the manifest lists no files to fetch")
    final = os.path.join(dest, model)
    if already_complete(final, entry):
        log(f"{final} already holds the verified checkpoint; nothing to do")
        return final

    revision = entry.get("revision") if is_pinned_revision(entry.get("revision")) else "main"
    if gaps:
        log(f"WARNING: {model} is not fully pinned ({'; '.join(gaps)}); fetching {repo}@{revision} unverified")
    os.makedirs(dest, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{model}-", dir=dest)
    try:
        commit = fetch_files(repo, revision, sorted(files), tmp)
        if is_pinned_revision(entry.get("revision")) and commit and commit != entry["revision"]:
            raise DownloadError(f"{repo}: hub resolved {revision} to {commit}, manifest pins {entry['revision']}")
        measured = verify(tmp, files, commit or revision, allow_unverified)
        # Only the verified files go into place (no hub cache dirs or stray files).
        for extra in os.listdir(tmp):
            if extra not in files:
                p = os.path.join(tmp, extra)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        prov = {
            "model": model, "repo": repo, "revision": commit or revision,
            "verified": not gaps, "files": measured, "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(os.path.join(tmp, PROVENANCE), "w", encoding="utf-8") as fh:
            json.dump(prov, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{model}-", dir=dest)
            os.rmdir(old)
            os.rename(final, old)
        os.rename(tmp, final)
        tmp = None
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{model} ready in {final}" + (" (UNVERIFIED)" if gaps else " (verified)"))
    if print_manifest:
        print(json.dumps({model: {"repo": repo, "revision": commit or revision, "files": measured}}, indent=2))
    return final


VENV_PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")


def in_checkout_venv(argv) -> None:
    """Run under the checkout's venv (script/bootstrap), which holds the pinned huggingface_hub,
    when the interpreter that started this script has none."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        if os.access(VENV_PYTHON, os.X_OK) and os.path.realpath(sys.executable) != os.path.realpath(VENV_PYTHON):
            os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__), *argv])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fetch a verified THUDM ChatGLM checkpoint into weights/<name>/.")
    ap.add_argument("model", nargs="?", default=None, help="model name from the manifest (default: chatglm2-6b-int4)")
    ap.add_argument("--dest", default=DEFAULT_DEST, help="weights directory (default: weights/)")
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST, help="sha256 manifest (default: weights/manifest.json)")
    ap.add_argument("--allow-unverified", action="store_true",
                    help="fetch even when the manifest pins no revision or LFS hash for the model")
    ap.add_argument("--print-manifest", action="store_true",
                    help="print the measured manifest entry (revision, sha256, size) after download")
    args = ap.parse_args(argv)
    try:
        model = args.model or load_manifest(args.manifest).get("default", "chatglm2-6b-int4")
        download(model, args.manifest, args.dest, args.allow_unverified, args.print_manifest)
    except DownloadError as e:
        log(f"ERROR: {e}")
        return 2
    return 0


if __name__ == "__main__":
    in_checkout_venv(sys.argv[1:])
    sys.exit(main())
