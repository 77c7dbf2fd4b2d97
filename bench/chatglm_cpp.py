"""Peer side of the CPU benchmark: li-plus/chatglm.cpp (PyPI ``chatglm-cpp==0.4.2``).

Three pieces:

* :func:`ensure_built` -- downloads the 0.4.2 sdist, builds it for the native CPU
  (``-march=native`` through ``CMAKE_ARGS``; the ggml copy vendored in 0.4.2 ignores
  GGML_AVX512*/GGML_NATIVE on Linux and only greps /proc/cpuinfo for AVX2/FMA/F16C,
  so the compiler flag is the only way to get AVX-512/VNNI code paths) and installs
  the wheel into a private directory under ``~/.cache/glm-bench/``. Returns that
  directory; put it on ``PYTHONPATH`` to ``import chatglm_cpp``.
* :func:`write_random_ggml` / :func:`ensure_model` -- our own writer of chatglm.cpp's
  GGML file format (ChatGLM2 layout, q4_0 or q8_0) filled with random weights.
* :func:`measure` -- runs chatglm.cpp in a subprocess and reports load time, decode
  and prefill speed and peak RSS.

File format (learned from chatglm_cpp/convert.py and ``Pipeline``/``ModelLoader`` in
chatglm.cpp 0.4.2)::

    b"ggml" | i32 model_type (2 = CHATGLM2) | i32 version (2)
    ModelConfigRecordV2: i32 dtype, vocab, hidden, heads, kv_heads, layers, ffn,
                         f32 norm_eps, i32 num_virtual_tokens, f32 rope_theta,
                         i32 max_length, eos, pad
    i32 len | SentencePiece model proto bytes
    tensors until EOF: i32 name_len | name | i32 ndim | ndim x i32 shape (outermost
                       first, torch order) | i32 ggml_type | zero pad to 16 | data

q4_0 block (32 weights, 18 bytes): f16 d | 16 bytes of nibbles, w = (q - 8) * d.
q8_0 block (32 weights, 34 bytes): f16 d | 32 x int8, w = q * d.

The weights are mmapped by chatglm.cpp and used in place, so peak RSS includes the
touched pages of the model file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.4.2"
CACHE_DIR = Path(os.environ.get("GLM_BENCH_CACHE", "~/.cache/glm-bench")).expanduser()
# The shared reference beside the checkout (../shared); measure() and convert() take another path.
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tokenizers" / "chatglm2" / "tokenizer.model"

# ggml_type values (ggml.h)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
_DTYPES = {"q4_0": GGML_Q4_0, "q8_0": GGML_Q8_0}
_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q8_0: 34}
QK = 32
CHATGLM2_MODEL_TYPE = 2

# ChatGLM2-6B (THUDM/chatglm2-6b config.json)
CHATGLM2_6B = dict(
    num_layers=28,
    hidden=4096,
    heads=32,
    kv_groups=2,
    kv_channels=128,
    ffn=13696,
    vocab=65024,
    max_length=8192,
    norm_eps=1e-5,
    rope_theta=10000.0,
    eos_token_id=2,
    pad_token_id=0,
)
# SentencePiece pieces of the ChatGLM2 tokenizer; ids >= this are [MASK], [gMASK], ...
NORMAL_VOCAB = 64789


def _log(msg: str) -> None:
    print(f"[chatglm_cpp] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build


def _cpu_tag() -> str:
    """Short hash of the CPU model + flags: a -march=native build is only valid here."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        model = platform.processor()
    return hashlib.sha1(f"{model}|{flags}".encode()).hexdigest()[:10]


def _py_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def install_dir() -> Path:
    """Where ensure_built() installs the native build (importable via PYTHONPATH)."""
    return CACHE_DIR / f"chatglm_cpp-{VERSION}-{_py_tag()}-native-{_cpu_tag()}"


def _is_installed(site: Path) -> bool:
    return (site / "BUILD_INFO.json").is_file() and any((site / "chatglm_cpp").glob("_C*.so"))


# What building chatglm-cpp 0.4.2 needs (its pyproject: setuptools, cmake; pip's legacy path: wheel),
# pinned and installed into a venv of its own: the project's venv (Python 3.11's setuptools 65.5, no
# wheel) fails with "invalid command 'bdist_wheel'", and the machine's tools are whatever they are.
BUILD_REQUIREMENTS = ("setuptools==80.9.0", "wheel==0.45.1", "cmake==3.31.6")


def build_env(python: str, run) -> Path:
    """The venv (same interpreter version as ``python``) that holds BUILD_REQUIREMENTS; made once."""
    env = CACHE_DIR / f"buildenv-{_py_tag()}"
    stamp = env / ("installed-" + hashlib.sha1(" ".join(BUILD_REQUIREMENTS).encode()).hexdigest()[:12])
    if not stamp.exists():
        if env.exists():
            shutil.rmtree(env)
        run([python, "-m", "venv", str(env)])
        run([str(env / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             *BUILD_REQUIREMENTS])
        stamp.touch()
    return env


def ensure_built(python: str | None = None, *, force: bool = False, log_path: Path | None = None) -> str:
    """Build chatglm-cpp==0.4.2 for this CPU once and return its import path.

    The result is a directory containing the ``chatglm_cpp`` package (with the
    ``-march=native`` extension ``_C``); prepend it to ``PYTHONPATH``. Cached in
    ``~/.cache/glm-bench/chatglm_cpp-0.4.2-<pytag>-native-<cpuhash>/``; the sdist in
    ``~/.cache/glm-bench/src/``, the wheel in ``~/.cache/glm-bench/wheels/<...>/``, the build
    tools (BUILD_REQUIREMENTS) in ``~/.cache/glm-bench/buildenv-<pytag>/``.
    A cold build takes 12-18 min on 2 idle cores (abseil/re2/sentencepiece dominate), 44 min on
    2 cores shared at a load average of ~25.
    """
    import fcntl

    python = python or sys.executable
    site = install_dir()
    if _is_installed(site) and not force:
        return str(site)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building right now
        if _is_installed(site) and not force:
            return str(site)
        t0 = time.time()
        log_path = Path(log_path or CACHE_DIR / f"build-{site.name}.log")
        _log(f"building chatglm-cpp {VERSION} for this CPU (12-18 min on 2 cores); log: {log_path}")
        with open(log_path, "a") as log:

            def run(cmd, **kw):
                log.write(f"\n$ {' '.join(map(str, cmd))}\n")
                log.flush()
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, **kw)

            tools = build_env(python, run)
            tools_python = str(tools / "bin" / "python")
            src = CACHE_DIR / "src"
            src.mkdir(exist_ok=True)
            sdist = src / f"chatglm_cpp-{VERSION}.tar.gz"
            if not sdist.exists():
                # --no-build-isolation: otherwise pip builds the `cmake` PyPI package from
                # source (--no-binary applies to build requirements too) just to read metadata.
                run([tools_python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                     "--no-build-isolation", f"chatglm-cpp=={VERSION}", "-d", str(src)])
            wheel_dir = CACHE_DIR / "wheels" / site.name
            wheels = sorted(wheel_dir.glob("chatglm_cpp-*.whl")) if wheel_dir.exists() else []
            wheel_build_s = None  # None: a previously built wheel was reused
            if force or not wheels:
                t_wheel = time.time()
                tree = src / f"chatglm_cpp-{VERSION}"
                if tree.exists():
                    shutil.rmtree(tree)
                with tarfile.open(sdist) as tf:
                    tf.extractall(src, filter="data") if sys.version_info >= (3, 12) else tf.extractall(src)
                env = dict(os.environ)
                env["PATH"] = str(tools / "bin") + os.pathsep + env.get("PATH", "")  # the pinned cmake
                # setup.py appends $CMAKE_ARGS (split on spaces) to its cmake call.
                env["CMAKE_ARGS"] = "-DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native"
                env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
                if wheel_dir.exists():
                    shutil.rmtree(wheel_dir)
                wheel_dir.mkdir(parents=True)
                run([tools_python, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                     "-w", str(wheel_dir), str(tree)], env=env)
                wheels = sorted(wheel_dir.glob("chatglm_cpp-*.whl"))
                wheel_build_s = round(time.time() - t_wheel, 1)
            if site.exists():
                shutil.rmtree(site)
            run([tools_python, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheels[-1])])
            # smoke test: the extension imports
            env = dict(os.environ, PYTHONPATH=str(site))
            run([python, "-c", "import chatglm_cpp._C as C; print(C.Pipeline)"], env=env)
        info = dict(version=VERSION, wheel=wheels[-1].name, cmake_args="-march=native (C and CXX)",
                    cpu_tag=_cpu_tag(), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    wheel_build_s=wheel_build_s, total_s=round(time.time() - t0, 1))
        (site / "BUILD_INFO.json").write_text(json.dumps(info, indent=1))
        _log(f"built in {time.time() - t0:.0f} s -> {site}")
    return str(site)


# --------------------------------------------------------------------------- writer


def _tensor_list(cfg: dict, dtype: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, torch-order shape, ggml type) in the order the converter writes them."""
    h, L = cfg["hidden"], cfg["num_layers"]
    qkv = cfg["heads"] * cfg["kv_channels"] + 2 * cfg["kv_groups"] * cfg["kv_channels"]
    out = [("transformer.embedding.word_embeddings.weight", (cfg["vocab"], h), dtype)]
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), GGML_F32),
            (p + "self_attention.query_key_value.weight", (qkv, h), dtype),
            (p + "self_attention.query_key_value.bias", (qkv,), GGML_F32),
            (p + "self_attention.dense.weight", (h, cfg["heads"] * cfg["kv_channels"]), dtype),
            (p + "post_attention_layernorm.weight", (h,), GGML_F32),
            (p + "mlp.dense_h_to_4h.weight", (2 * cfg["ffn"], h), dtype),
            (p + "mlp.dense_4h_to_h.weight", (h, cfg["ffn"]), dtype),
        ]
    out += [
        ("transformer.encoder.final_layernorm.weight", (h,), GGML_F32),
        ("transformer.output_layer.weight", (cfg["vocab"], h), dtype),
    ]
    return out


def _write_quant(f, rng, n_weights: int, gtype: int, chunk_blocks: int = 1 << 21) -> None:
    """Write n_weights random weights as q4_0/q8_0 blocks, generated block-wise.

    Quantized bytes are drawn uniformly at random; the f16 scale d is drawn so that
    weights have std ~0.02 (finite activations through 28 layers). Nothing fp32-sized
    is ever materialised.
    """
    import numpy as np

    assert n_weights % QK == 0
    bb = _BLOCK_BYTES[gtype]
    # q4_0: (q-8)*d has std ~4.6 d; q8_0: q*d has std ~74 d.
    lo, hi = (0.003, 0.006) if gtype == GGML_Q4_0 else (0.0002, 0.0004)
    left = n_weights // QK
    while left:
        nb = min(left, chunk_blocks)
        buf = np.frombuffer(bytearray(rng.bytes(nb * bb)), dtype=np.uint8).reshape(nb, bb)
        d = rng.uniform(lo, hi, nb).astype(np.float16)
        buf[:, :2] = d.view(np.uint8).reshape(nb, 2)
        f.write(buf.data)
        left -= nb


def write_random_ggml(path, *, dtype: str = "q4_0", num_layers: int = 28, hidden: int = 4096,
                      heads: int = 32, kv_groups: int = 2, kv_channels: int = 128, ffn: int = 13696,
                      vocab: int = 65024, max_length: int = 8192, tokenizer_path=DEFAULT_TOKENIZER,
                      seed: int = 0) -> Path:
    """Write a random-weight ChatGLM2 GGML file that chatglm.cpp 0.4.2 loads.

    Full ChatGLM2-6B shapes by default (28 layers -> 3.5 GB for q4_0, 6.6 GB for q8_0).
    Written to ``path + '.tmp'`` and renamed at the end. Returns the path.
    """
    import numpy as np

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    gtype = _DTYPES[dtype]
    cfg = dict(CHATGLM2_6B, num_layers=num_layers, hidden=hidden, heads=heads, kv_groups=kv_groups,
               kv_channels=kv_channels, ffn=ffn, vocab=vocab, max_length=max_length)
    assert heads * kv_channels == hidden, "chatglm.cpp requires kv_channels * heads == hidden"
    sp_model = Path(tokenizer_path).read_bytes()
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb", buffering=1 << 20) as f:
        f.write(b"ggml")
        f.write(struct.pack("<ii", CHATGLM2_MODEL_TYPE, 2))  # model type, config version 2
        f.write(struct.pack("<iiiiiiififiii", gtype, cfg["vocab"], cfg["hidden"], cfg["heads"],
                            cfg["kv_groups"], cfg["num_layers"], cfg["ffn"], cfg["norm_eps"], 0,
                            cfg["rope_theta"], cfg["max_length"], cfg["eos_token_id"], cfg["pad_token_id"]))
        f.write(struct.pack("<i", len(sp_model)))
        f.write(sp_model)
        for name, shape, t in _tensor_list(cfg, gtype):
            nb = name.encode()
            f.write(struct.pack("<i", len(nb)) + nb)
            f.write(struct.pack(f"<i{len(shape)}ii", len(shape), *shape, t))
            f.write(b"\0" * (-f.tell() % 16))
            n = 1
            for s in shape:
                n *= s
            if t == GGML_F32:
                if name.endswith("bias"):
                    arr = rng.uniform(-0.01, 0.01, n).astype(np.float32)
                else:  # RMSNorm weights
                    arr = rng.uniform(0.9, 1.1, n).astype(np.float32)
                f.write(arr.tobytes())
            else:
                _write_quant(f, rng, n, t)
    os.replace(tmp, path)
    return path


def inspect_ggml(path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]]]:
    """Parse a file the way chatglm.cpp's ModelLoader does (header + tensor index).

    Returns (header dict, [(name, torch-order shape, ggml_type, data offset)]) and
    checks that the last tensor ends exactly at EOF.
    """
    with open(path, "rb") as f:
        data = f.read(1 << 16)
        size = os.fstat(f.fileno()).st_size
        magic, mt, ver = struct.unpack_from("<4sii", data, 0)
        assert magic == b"ggml" and mt == CHATGLM2_MODEL_TYPE and ver == 2, (magic, mt, ver)
        keys = ("dtype vocab hidden heads kv_groups num_layers ffn norm_eps num_virtual_tokens "
                "rope_theta max_length eos_token_id pad_token_id").split()
        hdr = dict(zip(keys, struct.unpack_from("<iiiiiiififiii", data, 12)))
        pos = 12 + 52
        (sp_len,) = struct.unpack_from("<i", data if pos + 4 <= len(data) else f.read(0), pos)
        pos += 4 + sp_len
        hdr["tokenizer_bytes"] = sp_len
        tensors = []
        while pos < size:
            f.seek(pos)
            head = f.read(4 + 256 + 4 + 16 + 4)
            (nl,) = struct.unpack_from("<i", head, 0)
            name = head[4:4 + nl].decode()
            (ndim,) = struct.unpack_from("<i", head, 4 + nl)
            shape = struct.unpack_from(f"<{ndim}i", head, 8 + nl)
            (t,) = struct.unpack_from("<i", head, 8 + nl + 4 * ndim)
            off = pos + 12 + nl + 4 * ndim
            off += -off % 16
            n = 1
            for s_ in shape:
                n *= s_
            nbytes = 4 * n if t == GGML_F32 else n // QK * _BLOCK_BYTES[t]
            tensors.append((name, tuple(shape), t, off))
            pos = off + nbytes
        assert pos == size, f"tensor data overruns EOF ({pos} vs {size})"
    return hdr, tensors


def expected_size(*, dtype: str = "q4_0", num_layers: int = 28, **shape) -> int:
    """Approximate (header-free) size in bytes of the weights written by write_random_ggml."""
    cfg = dict(CHATGLM2_6B, num_layers=num_layers, **shape)
    g = _DTYPES[dtype]
    total = 0
    for _, shp, t in _tensor_list(cfg, g):
        n = 1
        for s in shp:
            n *= s
        total += 4 * n if t == GGML_F32 else n // QK * _BLOCK_BYTES[t]
    return total


def streamed_weight_bytes(*, dtype: str = "q4_0", num_layers: int = 28, **shape) -> int:
    """Weight bytes one decode step must read (everything but the embedding table,
    of which only one row is gathered): the numerator of the roofline."""
    cfg = dict(CHATGLM2_6B, num_layers=num_layers, **shape)
    total = 0
    for name, shp, t in _tensor_list(cfg, _DTYPES[dtype]):
        if "word_embeddings" in name:
            continue
        n = 1
        for s in shp:
            n *= s
        total += 4 * n if t == GGML_F32 else n // QK * _BLOCK_BYTES[t]
    return total


def ensure_model(dtype: str = "q4_0", num_layers: int = 28, *, directory=None, force: bool = False) -> Path:
    """Random ChatGLM2-6B-shaped GGML file, cached in ~/.cache/glm-bench/models/."""
    directory = Path(directory or CACHE_DIR / "models")
    path = directory / f"chatglm2-6b-random-{dtype}-L{num_layers}.ggml"
    if path.exists() and not force and path.stat().st_size >= expected_size(dtype=dtype, num_layers=num_layers):
        return path
    t0 = time.time()
    write_random_ggml(path, dtype=dtype, num_layers=num_layers)
    _log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.1f} s")
    return path


# --------------------------------------------------------------------------- threads

_SHIM_C = r"""
/* LD_PRELOAD shim: chatglm.cpp 0.4.2 picks its ggml thread count from
   std::thread::hardware_concurrency() (n<=4 -> n, else n/2) and its Python binding
   has no thread option, so we pin the value it sees. */
#include <stdlib.h>
namespace std { struct thread { static unsigned int hardware_concurrency() noexcept; }; }
unsigned int std::thread::hardware_concurrency() noexcept {
    const char *s = getenv("GLM_BENCH_HW_CONCURRENCY");
    int n = s ? atoi(s) : 0;
    return n > 0 ? (unsigned int)n : 2u;
}
"""


def _thread_shim() -> Path | None:
    """Compile (once) the hardware_concurrency() override; None if no C++ compiler."""
    so = CACHE_DIR / "hwconc_shim.so"
    if so.exists():
        return so
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        return None
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    src = CACHE_DIR / "hwconc_shim.cpp"
    src.write_text(_SHIM_C)
    tmp = so.with_suffix(".so.tmp")
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True)
    os.replace(tmp, so)
    return so


def _hw_concurrency_for(threads: int) -> int:
    # chatglm.cpp: get_num_physical_cores() = n if n <= 4 else n // 2
    return threads if threads <= 4 else 2 * threads


# --------------------------------------------------------------------------- measure


def measure(model_path, threads: int = 2, *, prompt_len: int = 16, new_tokens: int = 128,
            long_prompt_len: int = 512, long_new_tokens: int = 32, max_length: int = 2048,
            seed: int = 0, site: str | None = None, timeout: float = 1800, nice: int = 0,
            cold: bool = False) -> dict:
    """Benchmark chatglm.cpp on ``model_path`` in a fresh subprocess.

    Drives the model with random token ids through the lowest-level call the 0.4.2
    binding exposes, ``Pipeline.model.generate_next_token(ids, None, cfg, n_past, n_ctx)``
    (one graph evaluation per call, greedy, so exactly the requested number of tokens
    is generated; eos is never checked). Returns::

        load_s                 Pipeline(path) construction (mmap + graph setup; warm page cache)
        first_prefill_s        first forward (16-token prompt; faults the weights in)
        decode_tok_s           new_tokens / wall time of the decode steps after a 16-token prompt
        decode_ms_median       median per-token latency of those steps
        prefill_s, prefill_tok_s   one forward over a 512-token prompt
        decode_ctx512_tok_s    decode speed for 32 tokens right after the 512-token prompt
        peak_rss_bytes         VmHWM of the subprocess (includes the mmapped weights)
        cpu_util_decode        process CPU time / wall time during decode (~threads)
        max_threads_seen       max tasks of the subprocess seen by the parent's /proc poll
                               (ggml spawns threads-1 workers next to the main thread)
        other_load_cores       CPU cores used by other processes meanwhile (0 = quiet)

    ``cold=True`` evicts the model file from the page cache first (posix_fadvise
    DONTNEED on this file only), so load_s + first_prefill_s include reading it from disk.

    ``nice`` < 0 runs the worker at raised priority in its own session/autogroup (root
    only; see :func:`raise_priority`) so that a shared, busy machine disturbs the
    measurement less.
    """
    site = site or ensure_built()
    env = dict(os.environ)
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    thread_control = "default"
    shim = _thread_shim()
    if shim is not None:
        env["LD_PRELOAD"] = (str(shim) + " " + env.get("LD_PRELOAD", "")).strip()
        env["GLM_BENCH_HW_CONCURRENCY"] = str(_hw_concurrency_for(threads))
        thread_control = "LD_PRELOAD hardware_concurrency shim"
    elif threads != (os.cpu_count() or threads):
        thread_control = "UNCONTROLLED (no C++ compiler for the shim)"
    args = dict(model_path=str(model_path), threads=threads, prompt_len=prompt_len, new_tokens=new_tokens,
                long_prompt_len=long_prompt_len, long_new_tokens=long_new_tokens, max_length=max_length,
                seed=seed)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)]
    if cold:
        evict_from_page_cache(model_path)
    t0 = time.time()
    busy0 = _busy_cpu_s()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: raise_priority(nice)) if nice else None)
    max_tasks, child_cpu = 0, 0.0
    try:
        while proc.poll() is None:
            try:
                max_tasks = max(max_tasks, len(os.listdir(f"/proc/{proc.pid}/task")))
                child_cpu = _proc_cpu_s(proc.pid)
            except (OSError, IndexError, ValueError):
                pass
            if time.time() - t0 > timeout:
                proc.kill()
                raise TimeoutError(f"chatglm.cpp measurement exceeded {timeout} s")
            time.sleep(0.02)
    finally:
        out, err = proc.communicate()
    wall = time.time() - t0
    other_load = max(0.0, (_busy_cpu_s() - busy0 - child_cpu) / wall)
    if proc.returncode != 0:
        raise RuntimeError(f"chatglm.cpp worker failed (rc={proc.returncode}):\n{err[-4000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["max_threads_seen"] = max_tasks  # includes the Python main thread
    res["thread_control"] = thread_control
    res["nice"] = nice
    res["cold_cache"] = cold
    res["wall_s"] = round(wall, 2)
    # CPU cores used by OTHER processes during the run (0 = quiet machine). ggml's
    # threads spin at barriers, so any contention on a 2-core box distorts results.
    res["other_load_cores"] = round(other_load, 2)
    if other_load > 0.25:
        _log(f"WARNING: other processes used {other_load:.2f} cores during the measurement; "
             "figures are contaminated by contention")
    return res


def evict_from_page_cache(path) -> None:
    """Drop this one file's pages from the page cache (flushes dirty pages first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raise_priority(nice: int) -> None:
    """Give the calling process (and its children) a scheduling boost of ``nice`` (< 0).

    Linux autogroup (kernel.sched_autogroup_enabled=1 here) shares the CPU fairly
    between *sessions*, so plain nice(2) is useless against other sessions' builds:
    start a new session (a new autogroup) and set that autogroup's nice as well.
    Meant as a subprocess ``preexec_fn``. Needs root for negative values.
    """
    if not nice:
        return
    try:
        os.setsid()
    except OSError:
        pass  # already a session/group leader
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    try:
        os.nice(nice)
    except OSError:
        pass


def _busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds (all cores) from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    v = [int(x) for x in f]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    st = Path(f"/proc/{pid}/stat").read_text()
    f = st[st.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_load(window: float = 2.0) -> float:
    """Cores busy (machine-wide, all processes) averaged over ``window`` seconds."""
    b0, t0 = _busy_cpu_s(), time.time()
    time.sleep(window)
    return (_busy_cpu_s() - b0) / (time.time() - t0)


def wait_for_quiet(max_wait: float = 300.0, threshold: float = 0.3, window: float = 3.0) -> float:
    """Wait until other processes use < ``threshold`` cores (or ``max_wait`` s passed).

    The box is shared (colleagues' builds/tests); returns the last observed load.
    """
    t0 = time.time()
    load = machine_load(window)
    while load >= threshold and time.time() - t0 < max_wait:
        _log(f"machine busy ({load:.2f} cores used by others); waiting for quiet ...")
        load = machine_load(window)
    return load


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _file_dtype(path) -> str:
    with open(path, "rb") as f:
        magic, _mt, _ver, gtype = struct.unpack("<4siii", f.read(16))
    names = {v: k for k, v in _DTYPES.items()}
    return names.get(gtype, f"ggml_type {gtype}")


def _worker(args: dict) -> dict:
    """Runs inside the subprocess (stdlib + chatglm_cpp only, to keep RSS honest)."""
    import random
    import statistics

    t_imp = time.perf_counter()
    import chatglm_cpp
    import chatglm_cpp._C as C

    import_s = time.perf_counter() - t_imp
    rng = random.Random(args["seed"])
    rand_ids = lambda n: [rng.randrange(0, NORMAL_VOCAB) for _ in range(n)]  # noqa: E731
    cpu = lambda: sum(os.times()[:2])  # noqa: E731

    t = time.perf_counter()
    pipe = C.Pipeline(args["model_path"], args["max_length"])
    load_s = time.perf_counter() - t
    model = pipe.model
    cfg = model.config
    gen = C.GenerationConfig(max_length=args["max_length"], max_new_tokens=-1, do_sample=False,
                             repetition_penalty=1.0)

    def prefill(ids):
        return model.generate_next_token(ids, None, gen, 0, len(ids))

    def decode(ids, tok, n):
        """n decode steps; returns per-step wall times and CPU seconds used."""
        steps = []
        c0 = cpu()
        for _ in range(n):
            n_past = len(ids)
            ids.append(tok)
            t = time.perf_counter()
            tok = model.generate_next_token(ids, None, gen, n_past, len(ids))
            steps.append(time.perf_counter() - t)
        return steps, cpu() - c0, tok

    # 1) short prompt + 128 new tokens (the first forward also faults in the weights)
    ids = rand_ids(args["prompt_len"])
    t = time.perf_counter()
    tok = prefill(ids)
    first_prefill_s = time.perf_counter() - t
    steps, cpu_s, _ = decode(ids, tok, args["new_tokens"])
    dec_wall = sum(steps)

    # 2) 512-token prompt (prefill), then 32 new tokens at ~512 context
    ids = rand_ids(args["long_prompt_len"])
    c0 = cpu()
    t = time.perf_counter()
    tok = prefill(ids)
    prefill_s = time.perf_counter() - t
    prefill_cpu = cpu() - c0
    steps512, _, _ = decode(ids, tok, args["long_new_tokens"])

    return dict(
        impl=f"chatglm.cpp {chatglm_cpp.__version__}",
        model=cfg.model_type_name,
        dtype=_file_dtype(args["model_path"]),
        num_layers=cfg.num_hidden_layers,
        model_bytes=os.path.getsize(args["model_path"]),
        threads=args["threads"],
        max_length=cfg.max_length,
        import_s=round(import_s, 3),
        load_s=round(load_s, 3),
        first_prefill_s=round(first_prefill_s, 3),
        prompt_len=args["prompt_len"],
        new_tokens=args["new_tokens"],
        decode_tok_s=round(len(steps) / dec_wall, 3),
        decode_ms_median=round(1000 * statistics.median(steps), 2),
        # robust to a few slow steps (shared box): 1 / median step time
        decode_tok_s_from_median=round(1 / statistics.median(steps), 3),
        decode_ms_first=round(1000 * steps[0], 2),
        cpu_util_decode=round(cpu_s / dec_wall, 2),
        prefill_len=args["long_prompt_len"],
        prefill_s=round(prefill_s, 3),
        prefill_tok_s=round(args["long_prompt_len"] / prefill_s, 3),
        cpu_util_prefill=round(prefill_cpu / prefill_s, 2),
        decode_ctx512_tok_s=round(len(steps512) / sum(steps512), 3),
        decode_ctx512_ms_median=round(1000 * statistics.median(steps512), 2),
        # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and can report the parent's peak
        peak_rss_bytes=_vm_hwm_bytes(),
    )


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    # run as a script, sys.path[0] is bench/ and this file would shadow the real package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    print(json.dumps(_worker(json.loads(sys.argv[2]))), flush=True)
