"""The README's deploy path as cog 0.23.1's own code runs it (devtools/cogport.py is the port of the Go
source in the PyPI sdist cog-0.23.1.tar.gz; script/deploy runs it, through devtools/deploy.py, before
`cog push`):

- pkg/weightslegacy/weights.go 13-166, FindWeights: with --separate-weights every directory outside
  .cog/, .git/, __pycache__/ that holds a non-code file of 10 MiB or more becomes a
  `COPY <dir> /src/<dir>` of the weights image (pkg/dockerfile/standard_generator.go 429-444);
  filepath.Walk never follows a symlink.
- pkg/image/build.go 45-48 (the context leaves .cog/ out), standard_generator.go 308-375
  (`COPY . /src`; the weights dirs left out of the runner's context) and .dockerignore as BuildKit
  applies it (moby/patternmatcher v0.6.1, which cog 0.23.1's go.mod pins).
- build.go 183-192 and 247-276, standard_generator.go 337-352: the weights image is
  `<image>-weights`, built only when the CRC32 manifest differs from .cog/cache/weights_manifest.json
  (pkg/weightslegacy/manifest.go), and the runner starts `FROM <image>-weights AS weights`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import cogport, deploy
from devtools.cogport import Entry, PatternMatcher, find_weights

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
MANIFEST = json.loads((REPO / "weights" / "manifest.json").read_text())


def sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def fake_checkpoint(dest: Path, model: str = "chatglm2-6b-int4", scale: float = 1.0) -> Path:
    """What script/download-weights leaves in weights/<model>/: the manifest's files at their sizes
    (sparse: no disk), `scale` < 1 shrinks the weight files (still >= 10 MiB) for checksumming."""
    d = dest / model
    for name, meta in MANIFEST["models"][model]["files"].items():
        size = meta.get("size") or 1000
        if name.endswith(".bin") and scale < 1:
            size = max(12 * MIB, int(size * scale))
        sparse(d / name, size)
    (d / "config.json").write_text('{"model_type": "chatglm"}\n')
    (d / "download.json").write_text("{}\n")
    return d


def project_tree(root: Path) -> Path:
    """The checkout's tracked files that matter to cog (cog.yaml, .dockerignore, code), no venv."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("cog.yaml", ".dockerignore", "predict.py", "cog_compat.py", "requirements.txt", "requirements-test.txt"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "glm", root / "glm", ignore=shutil.ignore_patterns("__pycache__"))
    for package in ("script", "devtools"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "weights").mkdir()
    for name in ("README.md", "manifest.json"):
        shutil.copy2(REPO / "weights" / name, root / "weights" / name)
    return root


# ---------------------------------------------------------------------------- the ports themselves
@pytest.mark.parametrize("paths, dirs, root_files", [
    # cases of cog's own pkg/weightslegacy/weights_test.go (sizes at or just under the threshold)
    ({"large-a": 10 * MIB, "large-b": 10 * MIB, "small": 10 * MIB - 1}, [], ["large-a", "large-b"]),
    ({"models/large-a": 10 * MIB, "models/small": 10 * MIB - 1}, ["models"], []),
    ({"models/root-large": 10 * MIB, "models/code/predict.py": 1024}, [], []),
    ({"models2/b/large": 10 * MIB, "models2/a/large": 10 * MIB, "models/large": 10 * MIB},
     ["models", "models2/a", "models2/b"], []),
    # the prefixes are plain string prefixes of the whole path; .git anywhere; suffixes
    ({".cog/venv/lib/libtorch.so": 99 * MIB, ".github/big": 99 * MIB, "a/.git/objects/pack": 99 * MIB,
      "logs/run.log": 99 * MIB, "__pycache__/x": 99 * MIB}, [], []),
    ({".venv/lib/libtorch.so": 99 * MIB, "glm/__pycache__/big.bin": 99 * MIB},
     [".venv/lib", "glm/__pycache__"], []),
])
def test_find_weights_is_cogs(paths, dirs, root_files):
    entries = [Entry(p, False, s) for p, s in paths.items()]
    assert find_weights(entries) == (dirs, root_files)


@pytest.mark.parametrize("pattern, path, matches", [
    # expectations of moby/patternmatcher v0.6.1's TestMatches table
    ("**", "dir/file", True), ("dir/**", "dir/dir2/file", True), ("abc/**", "abc", False),
    ("**/dir", "dir/file", True), ("**/dir2/*", "dir/dir2/file", True), ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False), ("**/*.txt", "file.txt", True), ("a/*.txt", "a/dir/file.txt", False),
    ("a**/*.txt", "a/dir/dir/file.txt", True), ("a[b-d]e", "ace", True), ("a[b-d]e", "aae", False),
    (".*", ".foo", True), (".*", "foo", False), ("abc.def", "abcZdef", False), ("abc?def", "abcZdef", True),
    ("**/.foo", "bar.foo", False), ("a(b)c/def", "a(b)c/def", True), ("dist/*.whl", "dist/a.b+c-py3-none-any.whl", True),
    # what this project's .dockerignore relies on
    ("*.log", "glm/x.log", False), ("**/__pycache__", "glm/gpu/__pycache__/k.pyc", True),
    ("weights/.tmp-*", "weights/.tmp-chatglm2-6b-int4-x1y2/pytorch_model.bin", True), (".venv", ".venv", True),
])
def test_dockerignore_matching_is_dockers(pattern, path, matches):
    assert PatternMatcher([pattern]).matches(path) is matches


def test_dockerignore_exceptions_and_file_reading(tmp_path):
    assert PatternMatcher(["**", "!util/docker/web"]).matches("util/docker/web/foo") is False
    assert PatternMatcher(["**", "!util/docker/web", "util/docker/web/foo"]).matches("util/docker/web/foo") is True
    (tmp_path / ".dockerignore").write_bytes(b"\xef\xbb\xbf# comment\n  /tests/  \n\n! keep\n ./a/../b \n")
    assert cogport.read_dockerignore(str(tmp_path / ".dockerignore")) == ["tests", "!keep", "b"]


def test_weights_manifest_is_cogs_crc32(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "check").write_bytes(b"123456789")  # CRC-32/IEEE check value 0xCBF43926
    assert cogport.weights_manifest(str(tmp_path), ["w"], []) == {"w/check": "2639f4cb"}  # little-endian hex


# ---------------------------------------------------------------------------- this checkout
def test_the_checkout_ships_one_checkpoint_and_its_code(tmp_path):
    """The checkout as script/bootstrap, script/test and script/demo leave it, plus a checkpoint as
    script/download-weights leaves it: FindWeights (fed, through the walker parameter it takes in Go,
    this tree's walk followed by the checkpoint's) selects weights/<name> and nothing else, and
    `COPY . /src` takes the code only: no venv, cache, test, dev tool or benchmark file."""
    name = "zz-test-checkpoint"
    assert not (REPO / "weights" / name).exists()
    venv = REPO / ".venv"
    assert not (venv.is_dir() and not venv.is_symlink()), \
        ".venv is a directory inside the checkout: run script/bootstrap (it moves it to .cog/venv)"
    ckpt = fake_checkpoint(tmp_path, "chatglm2-6b-int4")
    entries = [*cogport.walk(str(REPO)), Entry(f"weights/{name}", True, 0),
               *cogport.walk(str(ckpt), f"weights/{name}/")]
    dirs, root_files = find_weights(entries)
    real = sorted(d.name for d in (REPO / "weights").iterdir() if (d / "config.json").is_file())
    assert root_files == []
    assert dirs == [f"weights/{n}" for n in sorted([*real, name])]

    ctx = cogport.context_files(str(REPO), cogport.weights_excludes(dirs, root_files))
    paths = [e.path for e in ctx]
    assert {"predict.py", "cog_compat.py", "cog.yaml", "requirements.txt", "glm/__init__.py",
            "glm/cpu/csrc/module.cpp"} <= set(paths)
    top = {p.split("/")[0] for p in paths}
    assert top <= {"predict.py", "cog_compat.py", "cog.yaml", "requirements.txt", "requirements-test.txt", "README.md", "glm",
                   "docs", "weights", ".dockerignore"}, top
    assert (REPO / "devtools" / "tiny.py").is_file() and (REPO / "script" / "deploy").is_file()  # there, not shipped
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in paths if p.startswith("weights/") and p not in ("weights/README.md", "weights/manifest.json")]
    assert max(e.size for e in ctx) < 256 * 1024
    assert sum(e.size for e in ctx) < 2 * MIB


def test_a_venv_in_the_tree_is_moved_by_bootstrap_and_then_deploys(tmp_path):
    """An older checkout's .venv/ directory: FindWeights takes its libraries for weights (the
    weights image would COPY a dockerignored path and the build fails) and script/deploy refuses;
    script/bootstrap moves it to .cog/venv behind a .venv link, and the tree deploys."""
    root = project_tree(tmp_path / "checkout")
    fake_checkpoint(root / "weights")
    venv = root / ".venv"
    sparse(venv / "lib" / "python3.11" / "site-packages" / "torch" / "lib" / "libtorch_cpu.so", 400 * MIB)
    (venv / "bin").mkdir()
    os.symlink(sys.executable, venv / "bin" / "python")
    # the requirements this tree's bootstrap installs: none (an empty pair), already stamped
    (root / "requirements.txt").write_text("")
    (root / "requirements-test.txt").write_text("")
    (venv / f".installed-{hashlib.sha256(b'').hexdigest()[:16]}").touch()
    shutil.rmtree(root / "glm")  # bootstrap ends with `import glm.cpu.kernels`: a stub, no torch here
    (root / "glm").mkdir()
    (root / "glm" / "__init__.py").write_text("")
    (root / "glm" / "cpu").mkdir()
    (root / "glm" / "cpu" / "__init__.py").write_text("")
    (root / "glm" / "cpu" / "kernels.py").write_text("def status():\n    return 'not built in this test'\n")

    dirs, _ = find_weights(cogport.walk(str(root)))
    assert dirs == ["weights/chatglm2-6b-int4", ".venv/lib/python3.11/site-packages/torch/lib"]  # by depth
    problems = deploy.tree_problems(str(root))
    assert problems == [".venv/lib/python3.11/site-packages/torch/lib: a virtualenv inside the checkout, which cog "
                        "takes for weights; run script/bootstrap (it moves the venv to .cog/venv, which cog skips)"]

    proc = subprocess.run([str(root / "script" / "bootstrap")], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bootstrap: moving .venv/ to .cog/venv" in proc.stderr
    assert os.readlink(venv) == ".cog/venv" and (root / ".cog" / "venv" / "bin" / "python").exists()
    assert find_weights(cogport.walk(str(root))) == (["weights/chatglm2-6b-int4"], [])
    assert deploy.tree_problems(str(root)) == []
    ctx = [e.path for e in cogport.context_files(str(root), cogport.weights_excludes(["weights/chatglm2-6b-int4"], []))]
    assert not [p for p in ctx if p.startswith((".venv", ".cog", "weights/chatglm2"))]
    proc = subprocess.run([sys.executable, "script/deploy", "--check"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0 and "the weights image takes weights/chatglm2-6b-int4" in proc.stderr, proc.stderr


@pytest.mark.parametrize("leftover", [".tmp-chatglm2-6b-int4-k3j2h1", ".old-chatglm2-6b-int4-9x8y7z"])
def test_an_interrupted_download_is_refused_with_the_fix(tmp_path, leftover):
    root = project_tree(tmp_path)
    fake_checkpoint(root / "weights")
    sparse(root / "weights" / leftover / "pytorch_model.bin", 2 * 1024 * MIB)
    dirs, _ = find_weights(cogport.walk(str(root)))
    assert dirs == [f"weights/{leftover}", "weights/chatglm2-6b-int4"]
    # dockerignored, so neither `COPY . /src` nor the weights image's COPY can take it
    assert PatternMatcher(cogport.read_dockerignore(str(root / ".dockerignore"))).matches(f"weights/{leftover}")
    assert deploy.tree_problems(str(root)) == [
        f"weights/{leftover}: left by an interrupted script/download-weights; remove it: rm -rf weights/{leftover}"]
    proc = subprocess.run([sys.executable, "script/deploy", "r8.im/you/chatglm2"], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and f"rm -rf weights/{leftover}" in proc.stderr, proc.stderr


def test_no_checkpoint_or_two_are_refused(tmp_path):
    root = project_tree(tmp_path)
    assert deploy.tree_problems(str(root)) == ["no checkpoint in weights/: run script/download-weights first"]
    fake_checkpoint(root / "weights", "chatglm2-6b-int4")
    fake_checkpoint(root / "weights", "chatglm-6b-int4")
    assert deploy.tree_problems(str(root)) == [
        "several checkpoints (weights/chatglm-6b-int4, weights/chatglm2-6b-int4), each shipped in the image; "
        "keep the one to serve in weights/ and move the others out"]


# ---------------------------------------------------------------------------- build, then push
def test_build_then_push_under_another_name(tmp_path):
    """The old README: `cog build --separate-weights -t chatglm2-6b-int4`, then `cog push
    r8.im/<you>/<model> --separate-weights`. The push finds the weights unchanged, builds no
    r8.im/<you>/<model>-weights, and its runner cannot start FROM it (replicate/cog#1254, #1323).
    script/deploy drops the cache when that image is not in the local Docker."""
    root = project_tree(tmp_path)
    fake_checkpoint(root / "weights", scale=0.0)
    images: set = set()
    target = "r8.im/you/chatglm2-6b-int4"

    assert cogport.build_separate_weights(str(root), "chatglm2-6b-int4", images) == [
        "chatglm2-6b-int4-weights", "chatglm2-6b-int4"]
    cache = json.loads((root / ".cog" / "cache" / "weights_manifest.json").read_text())
    assert sorted(cache["files"]) == sorted(f"weights/chatglm2-6b-int4/{n}" for n in
                                            ["config.json", "download.json", "pytorch_model.bin", "tokenizer.model"])
    with pytest.raises(cogport.MissingImage, match=f"FROM {target}-weights AS weights"):
        cogport.build_separate_weights(str(root), target, set(images))

    deploy.drop_stale_weights_cache(str(root), target, has_image=lambda name: name in images)
    assert not (root / ".cog" / "cache" / "weights_manifest.json").exists()
    assert cogport.build_separate_weights(str(root), target, images) == [f"{target}-weights", target]
    # the next deploy of a code change: the weights image exists, the cache stays, only the runner is built
    deploy.drop_stale_weights_cache(str(root), target, has_image=lambda name: name in images)
    assert cogport.build_separate_weights(str(root), target, images) == [target]


def test_deploy_refuses_a_wrong_target_or_cog(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, str(REPO / "script" / "deploy"), "r8.im/You/model:v1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'r8.im/You/model:v1' is not a Replicate model: use r8.im/<you>/<model> (lower case, no tag)" in proc.stderr
    fake_cog = tmp_path / "cog"
    fake_cog.write_text("#!/bin/sh\necho 'cog version 0.16.9 (built 2025-06-01)'\n")
    fake_cog.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(deploy.DeployError, match="cog 0.16.9 on PATH; this project is built and checked with cog 0.23.1"):
        deploy.require_cog()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(deploy.DeployError, match="no cog on PATH; install cog 0.23.1: sudo curl"):
        deploy.require_cog()


def test_deploy_runs_cog_push_with_the_pins(tmp_path):
    """script/deploy end to end on a tree that deploys, with a cog 0.23.1 and a Docker without the
    weights image standing in on PATH: the stale cache goes, then exactly this push runs."""
    root = project_tree(tmp_path / "checkout")
    fake_checkpoint(root / "weights")
    cache = root / ".cog" / "cache" / "weights_manifest.json"
    cache.parent.mkdir(parents=True)
    cache.write_text('{"files": {}}\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cog").write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "cog version 0.23.1 (built x)"; exit 0; }\n'
                                 'echo "cwd=$PWD COGLET_WHEEL=$COGLET_WHEEL args=$*"\n')
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")  # `docker image inspect X`: no such image
    for tool in ("cog", "docker"):
        (bin_dir / tool).chmod(0o755)
    proc = subprocess.run([sys.executable, "script/deploy", "r8.im/you/chatglm2-6b-int4", "--use-cog-base-image=false"],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert not cache.exists()
    assert "r8.im/you/chatglm2-6b-int4-weights is not in the local Docker" in proc.stderr
    assert proc.stdout.strip() == (f"cwd={root} COGLET_WHEEL=pypi:0.23.1 args=push r8.im/you/chatglm2-6b-int4 "
                                   "--separate-weights --use-cog-base-image=false")
