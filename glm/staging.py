"""What a decode step reads from the host, in one buffer copied to the device at once.

The runner writes each row's token, rotary positions (the model's: ChatGLM2's position, ChatGLM-6B's
position and block position), attention plan (its cache's element offset in the KV pool, the cache's
slot count, the row's slot) and sampling parameters into one host buffer (pinned
on CUDA), then copies it to its device twin in one transfer: one host-to-device copy per step, with
no sync, since the copy is ordered before the step's kernels on the same stream. The device twin
never moves, so a CUDA graph captured over its views (glm/gpu/graphs.py) reads each step's values.

The layers find the step's device tensors through a forward context (`current()`, set by the runner
around the forward pass with `staged(...)`), as vLLM's layers find their attention metadata: the
model's signature stays what the CPU path and the prefill use.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

# (name, dtype) of each per-row field; each field's block starts at a multiple of 8 bytes a row, so
# every view is aligned.
FIELDS = (("tokens", torch.int64), ("positions", torch.int64), ("block_positions", torch.int64),
          ("cache_offsets", torch.int64),
          ("cache_slots", torch.int64), ("slots", torch.int64), ("temperature", torch.float32),
          ("top_p_cut", torch.float32), ("top_k", torch.int64), ("penalty", torch.float32))
ROW_BYTES = 8


# Decode row counts a step is padded to where CUDA graphs replay it (glm.gpu.graphs): one graph each.
BUCKETS = (1, 2, 4, 8)


def bucket_for(rows: int, buckets=BUCKETS) -> int | None:
    """The smallest bucket that holds `rows` rows, or None when none does (the step runs eagerly)."""
    return next((b for b in sorted(buckets) if b >= rows), None)


def padded(values: list, rows: int) -> list:
    """values extended to `rows` entries by repeating the first (the padding rows' inputs)."""
    if not values or len(values) > rows:
        raise ValueError(f"cannot pad {len(values)} rows to {rows}")
    return list(values) + [values[0]] * (rows - len(values))


@dataclass(frozen=True)
class StepInputs:
    """The device tensors of one decode step of `rows` rows (views of the staged buffer)."""
    tokens: torch.Tensor           # int64 [rows, 1]
    positions: torch.Tensor        # int64 [rows]
    block_positions: torch.Tensor  # int64 [rows] (ChatGLM-6B's second position; 0 for ChatGLM2)
    cache_offsets: torch.Tensor    # int64 [rows]
    cache_slots: torch.Tensor      # int64 [rows]
    slots: torch.Tensor            # int64 [rows]
    # The model's rotary tables, cos and sin by position (model.rotary_table); None where the layers
    # take no staged rows (the CPU paths).
    rotary: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    def rotary_angles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows, 1, width] of each row's position, gathered from the precomputed tables."""
        cos, sin = self.rotary
        return cos[self.positions][:, None], sin[self.positions][:, None]


class StepStaging:
    """One host buffer and its device twin laid out as FIELDS, `rows` rows each."""

    def __init__(self, rows: int, device, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.rows, self.rotary = rows, rotary
        device = torch.device(device)
        nbytes = len(FIELDS) * rows * ROW_BYTES
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device_buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host = {name: a.numpy() for name, a in self._views(self.host).items()}
        self.fields = self._views(self.device_buffer)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.rows * ROW_BYTES
        views = {}
        for i, (name, dtype) in enumerate(FIELDS):
            start = i * size
            views[name] = buffer[start:start + self.rows * dtype.itemsize].view(dtype)
        return views

    def begin(self) -> None:
        """Before writing a step's rows: the previous copy out of the host buffer has completed
        (it has whenever that step's ids came back, so this waits only after a failed step)."""
        if self._copied is not None:
            self._copied.synchronize()

    def write(self, name: str, values) -> None:
        """Host side only: row values of one field (rows past len(values) keep what they held)."""
        self._host[name][:len(values)] = values

    def copy(self) -> None:
        """The step's one host-to-device transfer."""
        self.device_buffer.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def inputs(self, rows: int) -> StepInputs:
        """The device views of the first `rows` rows."""
        f = self.fields
        return StepInputs(f["tokens"][:rows, None], f["positions"][:rows], f["block_positions"][:rows],
                          f["cache_offsets"][:rows], f["cache_slots"][:rows], f["slots"][:rows], self.rotary)

    def sampling(self, rows: int):
        """The first `rows` rows' sampling parameters as glm.sampling.RowParams (device views)."""
        from .sampling import RowParams
        f = self.fields
        return RowParams(f["temperature"][:rows], f["top_p_cut"][:rows], f["top_k"][:rows], f["penalty"][:rows])


_CURRENT: contextvars.ContextVar[StepInputs | None] = contextvars.ContextVar("glm_step_inputs", default=None)


@contextlib.contextmanager
def staged(inputs: StepInputs):
    """Within the block, the layers read the step's rows from `inputs` instead of the host."""
    token = _CURRENT.set(inputs)
    try:
        yield inputs
    finally:
        _CURRENT.reset(token)


def current() -> StepInputs | None:
    return _CURRENT.get()
