"""Which device a model loads on: "auto" takes the GPU when torch can use it, else the CPU, and
refuses to fall back to the CPU on a machine that has an NVIDIA GPU torch cannot use (an old
driver, a torch build for another CUDA): serving a 6B model at CPU speed there is a fault, not a
choice. An explicit "cpu" or "cuda" is taken as asked."""
from __future__ import annotations

import os

import torch

from .errors import GLMError

# What the NVIDIA kernel driver exposes on a GPU host (also inside a container given the GPU).
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/proc/driver/nvidia")
NVIDIA_DRIVER_VERSION = "/proc/driver/nvidia/version"


class DeviceError(GLMError):
    """The requested or detected device cannot be used. The message says what to do."""


def nvidia_gpu_present(paths=NVIDIA_DEVICE_FILES) -> str | None:
    """The first NVIDIA device file that exists, or None."""
    return next((p for p in paths if os.path.exists(p)), None)


def _driver_version() -> str:
    try:
        with open(NVIDIA_DRIVER_VERSION, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().strip()
    except OSError:
        return "unknown"
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 ..."
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else first or "unknown"


def _cuda_unusable_reason() -> str:
    """Why torch cannot use CUDA, in torch's own words when it has some."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as e:  # torch raises RuntimeError/AssertionError with the driver's complaint
        text = str(e).strip().splitlines()
        if text:
            return text[0]
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"


def resolve(device: str | torch.device = "auto", nvidia_files=NVIDIA_DEVICE_FILES) -> torch.device:
    """torch.device for `device`: "auto", "cpu", "cuda" or "cuda:N"."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        found = nvidia_gpu_present(nvidia_files)
        if found:
            raise DeviceError(
                f"NVIDIA GPU present ({found}, driver {_driver_version()}) but torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}) cannot use it: {_cuda_unusable_reason()}; "
                "set GLM_DEVICE=cpu to serve on the CPU on purpose"
            )
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} asked for but torch cannot use CUDA: {_cuda_unusable_reason()}")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return dev
