"""glm.gpu.memory's default KV budget: the smaller of max_batch contexts and what fits beside the
weights, the workspace and the prefill scratch (the computation; no GPU needed)."""
from __future__ import annotations

import logging

import pytest
import torch

from glm.config import ChatGLMConfig
from glm.gpu import memory
from glm.kvpool import KVPool
from devtools.tiny import FULL, config_json

INT4_WEIGHTS = 3_900_000_000  # what an int4 ChatGLM2-6B checkpoint puts on the device
T4 = 15 * memory.GiB          # a T4's memory as CUDA reports it, about
SCRATCH = 2 * 27392 * 4096    # dense_h_to_4h in fp16: the largest quantized layer


def plan_for(cfg, total: int) -> memory.MemoryPlan:
    return memory.MemoryPlan(weights=INT4_WEIGHTS, kv_pool=0,
                             workspace=memory.workspace_bytes(cfg, 8, 256, torch.float16),
                             free=total - INT4_WEIGHTS - memory.GiB // 4, total=total, scratch=SCRATCH)


def test_chatglm2_6b_32k_int4_serves_8_full_contexts_on_a_t4(caplog):
    cfg = ChatGLMConfig.from_dict(config_json(FULL, 65024, 4, rope_ratio=16))
    assert cfg.max_context == 32768
    p = plan_for(cfg, T4)
    with caplog.at_level(logging.INFO, logger="glm"):
        budget = memory.kv_budget_that_fits(p, cfg, torch.float16, 8)
    assert budget == 8 * 32768
    kv = budget * KVPool.bytes_per_token(cfg, torch.float16)
    full = memory.MemoryPlan(weights=p.weights, kv_pool=kv, workspace=p.workspace, free=p.free,
                             total=p.total, scratch=p.scratch)
    assert full.fits and full.weights + full.needed < 14 * memory.GiB
    assert any("KV budget: 262144 tokens (max_batch x context" in r.getMessage() for r in caplog.records)


def test_budget_shrinks_to_what_fits_instead_of_failing(caplog):
    cfg = ChatGLMConfig.from_dict(config_json(FULL, 65024, 4, rope_ratio=16))
    p = plan_for(cfg, 8 * memory.GiB)
    with caplog.at_level(logging.INFO, logger="glm"):
        budget = memory.kv_budget_that_fits(p, cfg, torch.float16, 8)
    per_token = KVPool.bytes_per_token(cfg, torch.float16)
    assert budget == p.room_for_kv // per_token
    assert 32768 < budget < 8 * 32768  # a whole 32k prompt still fits
    assert memory.MemoryPlan(weights=p.weights, kv_pool=budget * per_token, workspace=p.workspace,
                             free=p.free, total=p.total, scratch=p.scratch).fits
    assert any(f"KV budget: {budget} tokens (all that fits" in r.getMessage() for r in caplog.records)


def test_no_room_at_all_is_a_clear_error():
    cfg = ChatGLMConfig.from_dict(config_json(FULL, 65024, 4))
    p = plan_for(cfg, INT4_WEIGHTS + memory.GiB)
    with pytest.raises(memory.MemoryPlanError, match="no room for any KV cache"):
        memory.kv_budget_that_fits(p, cfg, torch.float16, 8)


def test_scratch_counts_in_the_plan():
    p = memory.MemoryPlan(weights=0, kv_pool=10, workspace=20, free=10**9, total=10**9, scratch=30)
    assert p.needed == 60 + memory.RESERVE
    assert p.room_for_kv == 10**9 - 50 - memory.RESERVE
    assert "prefill scratch" in p.describe()
