"""Item 1: what the check ran on -- the GPU, its driver, torch and triton, free memory."""
from __future__ import annotations

import os
import platform


def describe(device) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "triton": _version("triton"), "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        from glm.device import _driver_version
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        out |= {"gpu": props.name, "capability": f"sm_{props.major}{props.minor}",
                "multiprocessors": props.multi_processor_count, "driver": _driver_version(),
                "memory_total_gib": round(total / 2**30, 2), "memory_free_gib": round(free / 2**30, 2)}
    else:
        out |= {"gpu": "none: CPU tensors through the Triton interpreter (timings meaningless)",
                "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    return out


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001
        return None
