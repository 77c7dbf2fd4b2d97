"""Push this checkout to Replicate as r8.im/<you>/<model>, with the weights in a layer of their own.

    script/deploy r8.im/<you>/<model> [more `cog push` flags, e.g. --use-cog-base-image=false]
    script/deploy --check          # only the checks on the tree; needs no cog or Docker

Runs `COGLET_WHEEL=pypi:0.23.1 cog push r8.im/<you>/<model> --separate-weights` after checking,
with cog 0.23.1's own rules (devtools/cogport.py), what that push will do with this tree:

- the weights image takes exactly one directory, weights/<name>/ with a checkpoint, and nothing
  else (a venv, a cache or an interrupted download's weights/.tmp-* would break the build or ship);
- the cached weights manifest (.cog/cache/weights_manifest.json) is dropped when the image it
  stands for, r8.im/<you>/<model>-weights, is not in the local Docker: cog skips building that
  image whenever the manifest is unchanged, also after a `cog build -t <another name>`, and the
  push then fails to pull it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from devtools import cogport

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COG_VERSION = "0.23.1"
COGLET_WHEEL = f"pypi:{COG_VERSION}"
TARGET = re.compile(r"r8\.im/[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*")
INSTALL_COG = (
    f'sudo curl -o /usr/local/bin/cog -L "https://github.com/replicate/cog/releases/download/v{COG_VERSION}/'
    'cog_$(uname -s)_$(uname -m | sed \'s/aarch64/arm64/\')" && sudo chmod +x /usr/local/bin/cog'
)


class DeployError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[deploy] {msg}", file=sys.stderr, flush=True)


def is_checkpoint(root: str, d: str) -> bool:
    parts = d.split("/")
    return len(parts) == 2 and parts[0] == "weights" and os.path.isfile(os.path.join(root, d, "config.json"))


def stray_weights(d: str) -> str:
    """Why a directory other than a checkpoint would ship as weights, and the fix."""
    if d.startswith((".venv/", "venv/")):
        return (f"{d}: a virtualenv inside the checkout, which cog takes for weights; "
                "run script/bootstrap (it moves the venv to .cog/venv, which cog skips)")
    if d.startswith(("weights/.tmp-", "weights/.old-")) and d.count("/") == 1:
        return f"{d}: left by an interrupted script/download-weights; remove it: rm -rf {d}"
    return (f"{d}: holds a file of 10 MiB or more, so cog would ship it as weights; "
            "move it out of the checkout (or under .cog/, which cog skips)")


def tree_problems(root: str) -> list:
    """What stops `cog push --separate-weights` from building a good image of root, with the fix."""
    dirs, root_files = cogport.find_weights(cogport.walk(root))
    checkpoints = [d for d in dirs if is_checkpoint(root, d)]
    problems = [stray_weights(d) for d in dirs if d not in checkpoints]
    problems += [f"{f}: a file of 10 MiB or more at the top of the checkout, which cog would ship as weights; "
                 "move it out" for f in root_files]
    if not checkpoints:
        problems.append("no checkpoint in weights/: run script/download-weights first")
    elif len(checkpoints) > 1:
        problems.append(f"several checkpoints ({', '.join(checkpoints)}), each shipped in the image; "
                        "keep the one to serve in weights/ and move the others out")
    ignore = cogport.PatternMatcher(cogport.read_dockerignore(os.path.join(root, ".dockerignore")))
    problems += [f"{d} is in .dockerignore, so the weights image cannot COPY it" for d in checkpoints
                 if ignore.matches(d)]
    return problems


def cog_version() -> str:
    if shutil.which("cog") is None:
        raise DeployError(f"no cog on PATH; install cog {COG_VERSION}: {INSTALL_COG}")
    out = subprocess.run(["cog", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\b(\d+\.\d+\.\d+\S*)", out)
    return m.group(1) if m else out.strip()


def require_cog() -> None:
    version = cog_version()
    if version != COG_VERSION:
        raise DeployError(f"cog {version} on PATH; this project is built and checked with cog {COG_VERSION} "
                          f"(its rules are what devtools/cogport.py checks): {INSTALL_COG}")


def docker_has_image(name: str) -> bool:
    if shutil.which("docker") is None:
        return False  # unknown: treat as absent, which costs at most a rebuild of the weights image
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def drop_stale_weights_cache(root: str, target: str, has_image=docker_has_image) -> None:
    cache = os.path.join(root, cogport.WEIGHTS_MANIFEST_CACHE)
    weights_image = cogport.weights_image(target)
    if os.path.exists(cache) and not has_image(weights_image):
        log(f"{weights_image} is not in the local Docker, so cog must build it: removing "
            f"{cogport.WEIGHTS_MANIFEST_CACHE} (it would say 'Weights unchanged' and skip the build)")
        os.remove(cache)


def check(root: str) -> None:
    problems = tree_problems(root)
    if problems:
        raise DeployError("this checkout cannot be pushed as it is:\n  - " + "\n  - ".join(problems))


def main(argv: list) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    target, extra = argv[0], argv[1:]
    try:
        if target != "--check" and not TARGET.fullmatch(target):
            raise DeployError(f"{target!r} is not a Replicate model: use r8.im/<you>/<model> (lower case, no tag)")
        check(REPO)
        if target == "--check":
            log("the tree is ready: the weights image takes " + ", ".join(cogport.find_weights(cogport.walk(REPO))[0]))
            return 0
        require_cog()
        drop_stale_weights_cache(REPO, target)
    except DeployError as e:
        log(f"ERROR: {e}")
        return 2
    cmd = ["cog", "push", target, "--separate-weights", *extra]
    log(f"COGLET_WHEEL={COGLET_WHEEL} {' '.join(cmd)}")
    os.chdir(REPO)
    os.execvpe("cog", cmd, {**os.environ, "COGLET_WHEEL": COGLET_WHEEL})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
