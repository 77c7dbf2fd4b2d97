"""What setup does on a deployment host: which device it takes (glm.device), which CPU kernel path
serves and why (glm.cpu.kernels), and that a GPU torch cannot use or kernels required but unusable fail
setup with one clear line (health SETUP_FAILED through the real Cog server)."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

import pytest
import torch

from devtools.cogserver import PYTHON, REPO, CogServer  # noqa: E402

from glm import device  # noqa: E402
from glm.cpu import kernels  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine where torch has no CUDA")


# ---------------------------------------------------------------------------- device
@no_cuda
def test_auto_takes_the_cpu_without_an_nvidia_gpu(tmp_path):
    assert device.resolve("auto", nvidia_files=(str(tmp_path / "nvidia0"),)) == torch.device("cpu")


@no_cuda
def test_auto_refuses_an_nvidia_gpu_torch_cannot_use(tmp_path):
    dev = tmp_path / "nvidia0"
    dev.write_text("")
    with pytest.raises(device.DeviceError) as e:
        device.resolve("auto", nvidia_files=(str(tmp_path / "absent"), str(dev)))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"NVIDIA GPU present ({dev}, driver ")
    assert f"torch {torch.__version__}" in msg and "set GLM_DEVICE=cpu" in msg
    # an explicit CPU is a choice, not a fault
    assert device.resolve("cpu", nvidia_files=(str(dev),)) == torch.device("cpu")


@no_cuda
def test_explicit_cuda_without_cuda_fails():
    with pytest.raises(device.DeviceError, match="device cuda asked for but torch cannot use CUDA: "):
        device.resolve("cuda")


def test_unknown_device_fails():
    with pytest.raises(device.DeviceError, match="unknown device 'tpu': use auto, cpu or cuda"):
        device.resolve("tpu")
    with pytest.raises(device.DeviceError, match="unsupported device 'meta'"):
        device.resolve("meta")


def test_load_auto(tiny_dir):
    import glm

    model = glm.load(tiny_dir, device="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == want
    assert model.dtype == (torch.float16 if want == "cuda" else torch.float32)


# ---------------------------------------------------------------------------- kernel build
@pytest.fixture
def kernel_cache_copy(tmp_path):
    """A copy of this machine's built kernels under a private GLM_KERNEL_CACHE (no rebuild)."""
    if kernels.get() is None:
        pytest.fail(f"the CPU kernels do not build here: {kernels.error()}")
    built = kernels.build_dir()
    base = tmp_path / "cache"
    shutil.copytree(built, base / built.name, symlinks=True)
    for leftover in ("lock", "glm.lock"):
        (base / built.name / leftover).unlink(missing_ok=True)
    return base, base / built.name


def _kernels_in_subprocess(env: dict, code: str, timeout: float = 240):
    return subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **env},
    )


def test_stale_torch_lock_of_a_killed_build_is_removed(kernel_cache_copy):
    base, d = kernel_cache_copy
    (d / "lock").write_text("")  # what a build killed mid-way leaves; torch waits on it forever
    proc = _kernels_in_subprocess({"GLM_KERNEL_CACHE": str(base)},
                                  "import glm.cpu.kernels as k; print(k.status())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CPU kernels "), proc.stdout
    assert "loaded from cache" in proc.stdout and str(d) in proc.stdout
    assert "left by a killed build" in proc.stderr
    assert not (d / "lock").exists()


def test_a_live_build_elsewhere_is_waited_for_with_a_deadline(kernel_cache_copy, monkeypatch):
    base, d = kernel_cache_copy
    monkeypatch.setenv("GLM_KERNEL_CACHE", str(base))
    fd = os.open(d / "glm.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is building
        with pytest.raises(kernels.LockTimeout, match=f"building the kernels in {d} for over 1s"):
            kernels.load(lock_timeout=1.0)
    finally:
        os.close(fd)
    # released: the next process loads at once (in a subprocess: this one already holds the module
    # from another build dir, and torch would rebuild it under a new name)
    proc = _kernels_in_subprocess({"GLM_KERNEL_CACHE": str(base)}, "import glm.cpu.kernels as k; print(k.status())")
    assert "loaded from cache" in proc.stdout, proc.stdout + proc.stderr


FAILING_BUILD = {"CXX": "/bin/false"}  # a compiler that fails every compile


def test_failed_build_falls_back_and_says_why(tmp_path):
    env = {"GLM_KERNEL_CACHE": str(tmp_path / "empty"), **FAILING_BUILD}
    proc = _kernels_in_subprocess(env, "import glm.cpu.kernels as k; print(k.status())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("torch fallback (kernels unavailable: "), proc.stdout
    proc = _kernels_in_subprocess(env, "import glm.cpu.kernels as k; k.require()")
    assert proc.returncode == 1
    assert "KernelError: the CPU kernels failed to build or load: " in proc.stderr
    proc = _kernels_in_subprocess({"GLM_NO_KERNELS": "1"}, "import glm.cpu.kernels as k; print(k.status())")
    assert proc.stdout.strip() == "torch fallback (GLM_NO_KERNELS=1)"


# ---------------------------------------------------------------------------- through the server
def _setup_fails(tmp_path, app_dir, env, expect):
    with CogServer(app_dir, env=env, log_path=str(tmp_path / "server.log")) as srv:
        h = srv.wait_for({"SETUP_FAILED", "READY"}, timeout=300)
        if h["status"] != "SETUP_FAILED":
            srv.fail(f"expected SETUP_FAILED, got {h['status']}")
        logs = h["setup"]["logs"]
        assert expect in logs, logs
        r = srv.predict({"input": {}}, wait_ready=False)
        assert r.status_code >= 400
    return logs


@no_cuda
def test_cuda_asked_for_but_unusable_fails_setup(tmp_path, app_dir):
    _setup_fails(tmp_path, app_dir, {"GLM_DEVICE": "cuda"},
                 "DeviceError: device cuda asked for but torch cannot use CUDA: ")


def test_required_kernels_that_do_not_build_fail_setup(tmp_path, app_dir):
    env = {"GLM_REQUIRE_KERNELS": "1", "GLM_DEVICE": "cpu", "GLM_KERNEL_CACHE": str(tmp_path / "empty"),
           **FAILING_BUILD}
    _setup_fails(tmp_path, app_dir, env,
                 "KernelError: the CPU kernels failed to build or load: ")


def test_the_build_finds_the_interpreters_ninja_off_path(kernel_cache_copy):
    """torch runs `ninja` from PATH; pip installs it beside the interpreter, whose bin/ need not be on
    PATH in an image. The build puts that dir first, so the same ninja builds (here: the cached build
    is found) whatever PATH the server was started with."""
    base, d = kernel_cache_copy
    proc = _kernels_in_subprocess({"GLM_KERNEL_CACHE": str(base), "PATH": "/usr/bin:/bin"},
                                  "import glm.cpu.kernels as k; print(k.build_dir()); print(k.status())")
    assert proc.returncode == 0, proc.stderr
    built_in, status = proc.stdout.splitlines()[:2]
    assert built_in == str(d)
    assert status.startswith("CPU kernels ") and "loaded from cache" in status, status
