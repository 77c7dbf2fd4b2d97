"""What cog 0.23.1 does with this checkout when it builds and pushes an image, ported from its Go
source (the PyPI sdist cog-0.23.1.tar.gz) so that script/deploy (devtools.deploy) and the tests can
check a tree without Docker or the cog CLI. Standard library only: script/deploy runs it with any python3.

- find_weights: pkg/weightslegacy/weights.go FindWeights (lines 13-166). `--separate-weights`
  walks the whole project (filepath.Walk never follows a symlink) and takes every directory that
  holds a non-code file of 10 MiB or more, outside paths starting with .cog, .git or __pycache__,
  for "weights": each gets a `COPY <dir> /src/<dir>` in a FROM-scratch image
  (pkg/dockerfile/standard_generator.go 429-444).
- context_files: what `COPY . /src` takes. The build context is the project dir filtered by
  cog's own exclude patterns (pkg/image/build.go 45-48: `.cog/`; with --separate-weights also the
  weights dirs, standard_generator.go 370-373 and build.go 271-276) and by .dockerignore, which
  BuildKit's Dockerfile frontend applies (moby/patternmatcher v0.6.1: ignorefile.ReadAll and
  MatchesOrParentMatches, ported in read_dockerignore and PatternMatcher).
- weights_manifest / weights_image: the legacy weights cache. `cog build` and `cog push` with
  --separate-weights build the weights image as `<image>-weights` only when the CRC32 manifest of
  the weights files differs from .cog/cache/weights_manifest.json (build.go 253-269); the cache
  records no image name, and the runner Dockerfile starts `FROM <image>-weights AS weights`
  (standard_generator.go 337-352). Build as X, then push as Y: Y-weights was never built.
"""
from __future__ import annotations

import json
import os
import re
import stat
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

SIZE_THRESHOLD = 10 * 1024 * 1024  # weights.go 82
IGNORED_PREFIXES = (".cog", ".git", "__pycache__")  # weights.go 13 (dotcog.Name, ...)
IGNORED_SUFFIXES = (  # weights.go 15-21
    ".py", ".ipynb", ".whl",
    ".jpg", ".jpeg", ".png", ".webp", ".svg", ".gif", ".avif", ".heic",
    ".mp4", ".mov", ".avi", ".wmv", ".mkv", ".webm",
    ".mp3", ".wav", ".ogg", ".flac", ".aac", ".m4a",
    ".log",
)
COG_EXCLUDES = (".cog/",)  # build.go 48: defaultExcludePatterns
WEIGHTS_MANIFEST_CACHE = os.path.join(".cog", "cache", "weights_manifest.json")  # build.go 112


@dataclass(frozen=True)
class Entry:
    path: str   # relative, "/"-separated, no "./" (filepath.Walk(".") yields "a/b")
    is_dir: bool
    size: int


# ---------------------------------------------------------------------------- the walk
def walk(root: str, prefix: str = "") -> Iterator[Entry]:
    """filepath.Walk(root): lexical order, lstat (a symlink is a small non-directory entry)."""
    names = sorted(os.listdir(root))
    for name in names:
        full = os.path.join(root, name)
        rel = f"{prefix}{name}"
        st = os.lstat(full)
        is_dir = stat.S_ISDIR(st.st_mode)
        yield Entry(rel, is_dir, 0 if is_dir else st.st_size)
        if is_dir:
            yield from walk(full, rel + "/")


# ---------------------------------------------------------------------------- FindWeights
def _is_git_file(path: str) -> bool:  # weights.go 106-110
    return ".git" in os.path.dirname(path).split("/")


def _is_code_file(path: str) -> bool:  # weights.go 101-104
    return os.path.splitext(path)[1] in (".py", ".ipynb")


def _is_non_model_file(path: str) -> bool:  # weights.go 68-80
    return path.startswith(IGNORED_PREFIXES) or path.endswith(IGNORED_SUFFIXES)


def find_weights(entries: Iterable[Entry]) -> Tuple[List[str], List[str]]:
    """(dirs, root files) that `cog build --separate-weights` puts in the weights image."""
    files, code_files = [], []
    for e in entries:  # weights.go 29-53
        if e.is_dir or _is_git_file(e.path):
            continue
        if _is_code_file(e.path):
            code_files.append(e.path)
            continue
        if e.size < SIZE_THRESHOLD or _is_non_model_file(e.path):
            continue
        files.append(e.path)
    files.sort(key=lambda p: (len(p.split("/")), p.split("/")))  # sortFilesByLevels, 84-98
    dirs, root_files = [], []
    for f in files:  # getDirsAndRootfiles, 134-154
        d = os.path.dirname(f)
        if d in ("", "."):
            root_files.append(f)
        elif not any((d + "/").startswith(p + "/") for p in dirs):  # hasParent, 156-166
            dirs.append(d)
    # filterDirsContainingCode (112-132): a plain string prefix, as in Go
    dirs = [d for d in dirs if not any(c.startswith(d) for c in code_files)]
    return dirs, root_files


# ---------------------------------------------------------------------------- .dockerignore
def read_dockerignore(path: str) -> List[str]:
    """patternmatcher/ignorefile.ReadAll: comments, whitespace, Clean, leading '/' dropped."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    patterns = []
    for line in data.decode("utf-8").splitlines():
        if line.startswith("#"):
            continue
        p = line.strip()
        if not p:
            continue
        invert = p.startswith("!")
        if invert:
            p = p[1:].strip()
        if p:
            p = _clean(p)
            if len(p) > 1 and p.startswith("/"):
                p = p[1:]
        patterns.append("!" + p if invert else p)
    return patterns


def _clean(p: str) -> str:
    """Go's filepath.Clean for "/"-separated paths."""
    rooted = p.startswith("/")
    parts: List[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and parts and parts[-1] != "..":
            parts.pop()
        elif part == ".." and rooted:
            continue
        else:
            parts.append(part)
    out = "/".join(parts)
    return ("/" + out) if rooted else (out or ".")


class _Pattern:
    """patternmatcher.Pattern: exact, prefix ('a/**'), suffix ('**/a') or regexp match."""

    def __init__(self, cleaned: str, exclusion: bool):
        self.cleaned, self.exclusion = cleaned, exclusion
        self.dirs = cleaned.split("/")
        self.kind, self.regexp = self._compile(cleaned)

    @staticmethod
    def _compile(pattern: str):  # patternmatcher.go 345-439
        reg, kind, i, n = "^", "exact", 0, len(pattern)
        pos = 0
        while pos < n:
            ch = pattern[pos]
            pos += 1
            if ch == "*":
                if pos < n and pattern[pos] == "*":
                    pos += 1
                    if pos < n and pattern[pos] == "/":
                        pos += 1
                    if pos >= n:
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            reg += ".*"
                            kind = "regexp"
                    else:
                        reg += "(.*/)?"
                        kind = "regexp"
                    if i == 0:
                        kind = "suffix"
                else:
                    reg += "[^/]*"
                    kind = "regexp"
            elif ch == "?":
                reg += "[^/]"
                kind = "regexp"
            elif ch in ".+()|{}$":
                reg += "\\" + ch
            elif ch == "\\":
                if pos < n:
                    reg += "\\" + pattern[pos]
                    pos += 1
                    kind = "regexp"
                else:
                    reg += "\\"
            elif ch in "[]":
                reg += ch
                kind = "regexp"
            else:
                reg += ch
            i += 1
        return kind, (re.compile(reg + "$") if kind == "regexp" else None)

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.cleaned
        if self.kind == "prefix":
            return path.startswith(self.cleaned[:-2])
        if self.kind == "suffix":
            suffix = self.cleaned[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        return self.regexp.match(path) is not None


class PatternMatcher:
    """patternmatcher.New + MatchesOrParentMatches (patternmatcher.go 42-76, 128-163)."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = []
        for p in patterns:
            p = p.strip()
            if not p:
                continue
            p = _clean(p)
            exclusion = p.startswith("!")
            if exclusion:
                p = p[1:]
            self.patterns.append(_Pattern(p, exclusion))
        self.exclusions = any(p.exclusion for p in self.patterns)

    def matches(self, path: str) -> bool:
        parent = os.path.dirname(path)
        parent_dirs = parent.split("/") if parent else []
        matched = False
        for p in self.patterns:
            if p.exclusion != matched:
                continue
            hit = p.match(path) or any(p.match("/".join(parent_dirs[:i + 1])) for i in range(len(parent_dirs)))
            if hit:
                matched = not p.exclusion
        return matched


def context_files(root: str, extra_excludes: Sequence[str] = ()) -> List[Entry]:
    """The files `COPY . /src` takes from root: cog's excludes, then .dockerignore."""
    cog = PatternMatcher([*COG_EXCLUDES, *extra_excludes])
    ignore = PatternMatcher(read_dockerignore(os.path.join(root, ".dockerignore")))
    return list(_unexcluded(root, "", cog, ignore))


def _unexcluded(root: str, prefix: str, *matchers: PatternMatcher) -> Iterator[Entry]:
    for name in sorted(os.listdir(os.path.join(root, prefix))):
        rel = prefix + name
        excluded = any(m.matches(rel) for m in matchers)
        st = os.lstat(os.path.join(root, rel))
        if stat.S_ISDIR(st.st_mode):
            # a directory excluded with no '!' pattern that could bring back part of it is skipped
            if excluded and not any(m.exclusions for m in matchers):
                continue
            yield from _unexcluded(root, rel + "/", *matchers)
        elif not excluded:
            yield Entry(rel, False, st.st_size)


def weights_excludes(dirs: Sequence[str], root_files: Sequence[str]) -> List[str]:
    """standard_generator.go 370-373: the runner's context leaves the weights out."""
    return [p for d in dirs for p in (d, d + "/**/*")] + list(root_files)


# ---------------------------------------------------------------------------- the weights image
def weights_image(image_name: str) -> str:
    """The weights image's name (build.go 260) and the runner's first stage (generator 342)."""
    return image_name + "-weights"


def weights_manifest(root: str, dirs: Sequence[str], root_files: Sequence[str]) -> Dict[str, str]:
    """GenerateWeightsManifest (standard_generator.go 1266-1293) with manifest.go's AddFile:
    {path: CRC32 (IEEE) as little-endian hex} of every file in the weights dirs."""
    paths = [e.path for d in dirs for e in walk(os.path.join(root, d), d + "/") if not e.is_dir]
    manifest = {}
    for p in [*paths, *root_files]:
        crc = 0
        with open(os.path.join(root, p), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                crc = zlib.crc32(block, crc)
        manifest[p] = crc.to_bytes(4, "little").hex()
    return manifest


def load_weights_manifest(path: str):
    """manifest.go LoadManifest: {"files": {path: {"crc32": hex}}}, or None when absent."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return {p: m["crc32"] for p, m in (doc.get("files") or {}).items()}


def save_weights_manifest(path: str, manifest: Dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"files": {p: {"crc32": c} for p, c in manifest.items()}}, fh)
        fh.write("\n")


class MissingImage(Exception):
    """BuildKit cannot resolve the runner's `FROM <image>-weights AS weights`."""


def build_separate_weights(root: str, image_name: str, local_images: set) -> List[str]:
    """build.go 247-276 on a model of the local Docker image store (local_images, updated):
    returns the images built. Raises MissingImage where the real build fails to pull."""
    dirs, root_files = find_weights(walk(root))
    manifest = weights_manifest(root, dirs, root_files)
    cache = os.path.join(root, WEIGHTS_MANIFEST_CACHE)
    cached = load_weights_manifest(cache)
    built = []
    if cached is None or cached != manifest:  # build.go 258: changed, else "Weights unchanged"
        local_images.add(weights_image(image_name))
        built.append(weights_image(image_name))
        save_weights_manifest(cache, manifest)
    if weights_image(image_name) not in local_images:
        raise MissingImage(f"FROM {weights_image(image_name)} AS weights: not in the local image store, "
                           "and the registry does not have it either")
    local_images.add(image_name)
    return built + [image_name]
