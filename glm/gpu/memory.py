"""GPU memory planned at setup: weights, the KV pool and the workspace of one step against the device.

The engine allocates its KV pool for the whole budget once (glm/kvpool.py); this checks first that
the pool and the largest step's activations fit in what the weights left free, and logs the plan,
so an out-of-memory shows at setup with numbers, never in the middle of a request. The computation
(`plan`) is separate from the device query (`device_memory`) so that it is tested without a GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import GLMError

log = logging.getLogger("glm")

GiB = 1 << 30
# CUDA context, cuBLAS workspaces, Triton's and the caching allocator's slack: memory a process
# uses beyond its tensors.
RESERVE = GiB // 2


class MemoryPlanError(GLMError):
    """The model, its KV budget and its workspace do not fit in the device's memory."""


@dataclass(frozen=True)
class MemoryPlan:
    weights: int      # bytes already on the device (the model's parameters and buffers)
    kv_pool: int      # the engine's KV pool for its whole budget
    workspace: int    # activations of the largest step (a prefill chunk, or a decode batch)
    free: int         # device memory free now (after the weights)
    total: int
    scratch: int = 0  # the fp16 weights of the largest quantized layer, for prefill (glm.gpu.prefill)

    @property
    def needed(self) -> int:
        return self.kv_pool + self.workspace + self.scratch + RESERVE

    @property
    def room_for_kv(self) -> int:
        """Bytes left for the KV pool beside everything else."""
        return max(self.free - self.workspace - self.scratch - RESERVE, 0)

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    def describe(self) -> str:
        def gib(n):
            return f"{n / GiB:.2f} GiB"
        return (f"weights {gib(self.weights)}, KV pool {gib(self.kv_pool)}, workspace {gib(self.workspace)}, "
                f"prefill scratch {gib(self.scratch)}, reserve {gib(RESERVE)}; device {gib(self.total)} total, {gib(self.free)} free after the weights")


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def workspace_bytes(cfg, max_batch: int, prefill_chunk: int, dtype: torch.dtype, prefill_whole: bool = False) -> int:
    """Peak activations of one forward: the larger of a prefill chunk and a decode batch.

    A prefill of T tokens holds at once the residual stream, the qkv output, the MLP's [gate | up]
    and its product, SDPA's keys/values expanded to every head over the whole context and (for its
    math fallback) the fp32 scores; then the last position's logits. A model that prefills its whole
    prompt in one pass (prefill_whole: ChatGLM-6B) has the context as its T.
    """
    size = torch.empty((), dtype=dtype).element_size()
    T = cfg.max_context if prefill_whole else min(prefill_chunk, cfg.max_context)
    rows = max(T, max_batch)
    per_row = cfg.hidden_size * 3 + cfg.q_size + 2 * cfg.kv_size + 3 * cfg.ffn_hidden_size
    activations = rows * per_row * size
    context = cfg.max_context
    sdpa = 2 * cfg.num_heads * context * cfg.head_dim * size + cfg.num_heads * T * context * 4
    logits = max_batch * cfg.vocab_size * (size + 4)
    return activations + sdpa + logits


def scratch_bytes(model: torch.nn.Module) -> int:
    """The prefill scratch of a model on the Triton backend (glm.gpu.prefill), else 0."""
    from . import prefill
    from .ops import TritonOps
    if not isinstance(model.ops, TritonOps):
        return 0
    return 2 * prefill.scratch_elements(model)


def plan(model: torch.nn.Module, cfg, kv_tokens: int, max_batch: int, prefill_chunk: int,
         dtype: torch.dtype, free: int, total: int) -> MemoryPlan:
    from ..kvpool import KVPool
    return MemoryPlan(weights=model_bytes(model), kv_pool=kv_tokens * KVPool.bytes_per_token(cfg, dtype),
                      workspace=workspace_bytes(cfg, max_batch, prefill_chunk, dtype, model.prefill_whole),
                      free=free, total=total, scratch=scratch_bytes(model))


def kv_budget_that_fits(p: MemoryPlan, cfg, dtype: torch.dtype, max_batch: int) -> int:
    """The default KV budget: max_batch full contexts, or fewer tokens if only fewer fit beside the
    weights, the workspace and the scratch (a long-context model on a T4)."""
    from ..kvpool import KVPool
    room = p.room_for_kv // KVPool.bytes_per_token(cfg, dtype)
    if room <= 0:
        raise MemoryPlanError(f"GPU memory: no room for any KV cache ({p.describe()}); "
                              f"lower the batch size or use a smaller (int4) model")
    budget = min(max_batch * cfg.max_context, room)
    log.info("KV budget: %d tokens (%s; %d fit beside the weights, workspace and scratch)", budget,
             "max_batch x context" if budget == max_batch * cfg.max_context else "all that fits", room)
    return budget


def device_memory(device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device."""
    return torch.cuda.mem_get_info(torch.device(device))


def check(p: MemoryPlan, kv_tokens: int) -> None:
    """Log the plan; raise MemoryPlanError with the numbers when it does not fit."""
    if not p.fits:
        per_token = p.kv_pool // max(kv_tokens, 1)
        room = p.room_for_kv // max(per_token, 1)
        raise MemoryPlanError(f"GPU memory: the KV budget of {kv_tokens} tokens does not fit ({p.describe()}); "
                              f"at most {room} tokens fit: lower the KV budget (GLM_KV_BUDGET_TOKENS) "
                              f"or the batch size, or use a smaller (int4) model")
    log.info("GPU memory plan: %s", p.describe())


def default_kv_budget(model, cfg, max_batch: int, prefill_chunk: int, device) -> int:
    """The engine's KV budget when none is given, on a CUDA device (kv_budget_that_fits)."""
    free, total = device_memory(device)
    return kv_budget_that_fits(plan(model, cfg, 0, max_batch, prefill_chunk, model.dtype, free, total),
                               cfg, model.dtype, max_batch)


def check_device(model, cfg, kv_tokens: int, max_batch: int, prefill_chunk: int, device) -> MemoryPlan:
    """The engine's setup check on a CUDA device."""
    free, total = device_memory(device)
    p = plan(model, cfg, kv_tokens, max_batch, prefill_chunk, model.dtype, free, total)
    check(p, kv_tokens)
    return p


def reserve_scratch(p: MemoryPlan, device) -> None:
    """Allocate the planned prefill scratch now, before the KV pool takes the rest."""
    if p.scratch:
        from . import prefill
        prefill.SCRATCH.reserve(p.scratch // 2, device)
