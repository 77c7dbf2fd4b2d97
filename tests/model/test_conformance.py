"""The engine against hidden states computed by THUDM's own implementation (chatglm.cpp test data).

Weights from each .data file go into glm's own modules under THUDM's parameter names, through the
same assignment the loader does, and every prefill / KV-cache decode step must match within 5e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glm.config import ChatGLMConfig
from glm.loader import PREFIX
from glm.kvpool import KVCache
from glm.loader import choose_ops
from glm.model import ChatGLM2, GLMBlock, RMSNorm, rotary_angles
from devtools.vectors import (TINY_REF, glm2_model_checkpoint, hidden_state_steps, load_by_checkpoint_names,
                              read_glm2_weights)
from reference import DataReader

ATOL = 5e-4  # the bound (chatglm.cpp's own test tolerance)
FP32_ATOL = 1e-5  # fp32 files: same math up to summation order; more means precision was lost somewhere

def cpu_ops():
    """The ops glm.load computes a float32 CPU model with: the CPU kernels where they build, else torch."""
    return choose_ops("cpu", torch.float32)


def run_model_file(name: str, prefix_len: int = 0, **overrides) -> list[float]:
    cfg = ChatGLMConfig(**{**TINY_REF, **overrides})
    r = DataReader(name)
    prefix = None
    if prefix_len:  # past_key_values (2*layers, groups, pre_len, hd) in fp16: k, v per layer
        pkv = torch.from_numpy(r.read(2 * cfg.num_layers, cfg.kv_heads, prefix_len, cfg.head_dim, dtype=np.float16))
        prefix = pkv.float().view(cfg.num_layers, 2, cfg.kv_heads, prefix_len, cfg.head_dim)
    ckpt = glm2_model_checkpoint(r, cfg)
    model = ChatGLM2(cfg, cpu_ops())
    model.embedding.word_embeddings.float()  # the file's embeddings are fp32 (checkpoints': fp16)
    load_by_checkpoint_names(model, ckpt)
    cache = KVCache(cfg, 8, "cpu", torch.float32, prefix=prefix)
    return [(got - want).abs().max().item() for got, want in hidden_state_steps(model, r, cfg, cache)]


@pytest.mark.parametrize("name", ["glm2_model.data", "glm3_model.data"])
def test_chatglm2_and_3_model(name):
    errors = run_model_file(name)
    assert max(errors) < min(ATOL, FP32_ATOL), f"{name}: max abs error per step (prefill, decode, decode) = {errors}"


def test_chatglm3_ptuning_v2_prefix():
    errors = run_model_file("glm3_ptuning_v2_model.data", prefix_len=5)
    assert max(errors) < ATOL, errors


def test_glm4_model():
    # GLM-4's tiny config inherits glm-4-9b-chat's epsilon (VECTORS.md 3.4); same block math.
    errors = run_model_file("glm4_model.data", norm_eps=1.5625e-07)
    assert max(errors) < min(ATOL, FP32_ATOL), errors


@pytest.mark.parametrize("name,ffn", [("glm2_block.data", 6), ("glm2_block_pr138_ffn48.data", 48)])
def test_chatglm2_block(name, ffn):
    cfg = ChatGLMConfig(**{**TINY_REF, "ffn_hidden_size": ffn})
    r = DataReader(name)
    block = GLMBlock(cfg, layer=0, ops=cpu_ops())
    load_by_checkpoint_names(block, {PREFIX + k: v for k, v in read_glm2_weights(r, cfg, "").items()})
    cache = KVCache(cfg, 8, "cpu", torch.float32)
    errors = []
    with torch.inference_mode():
        for T, start in [(3, 0), (1, 3), (1, 4)]:
            x = torch.from_numpy(r.read(T, cfg.hidden_size))
            want = torch.from_numpy(r.read(T, cfg.hidden_size))
            cos, sin = rotary_angles(cfg, torch.arange(start, start + T)[None])
            errors.append((block(x[None], cos, sin, [start], [cache])[0] - want).abs().max().item())
    r.assert_consumed()
    assert max(errors) < min(ATOL, FP32_ATOL), f"{name}: {errors}"


def test_linear_vectors():
    r = DataReader("linear.data")
    w, b = torch.from_numpy(r.read(32, 64)), torch.from_numpy(r.read(32))
    x, y = torch.from_numpy(r.read(2, 64)), torch.from_numpy(r.read(2, 32))
    vx, vy = torch.from_numpy(r.read(64)), torch.from_numpy(r.read(32))
    r.assert_consumed()
    assert (F.linear(x, w, b) - y).abs().max() < ATOL
    assert (F.linear(vx, w, b) - vy).abs().max() < ATOL


def test_rms_norm_vectors():
    r = DataReader("rms_norm.data")
    w, x, y = torch.from_numpy(r.read(64)), torch.from_numpy(r.read(3, 64)), torch.from_numpy(r.read(3, 64))
    r.assert_consumed()
    norm = RMSNorm(64, eps=1e-5, ops=cpu_ops())
    norm.load_state_dict({"weight": w})
    assert (norm(x) - y).abs().max() < ATOL


def test_rope_ratio_interpolates_positions_not_base():
    cfg = ChatGLMConfig(head_dim=128, rope_ratio=16.0)
    cos, sin = rotary_angles(cfg, torch.tensor([[0, 16, 160, 32000]]))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    want = torch.tensor([0.0, 1.0, 10.0, 2000.0])[:, None] * inv_freq
    torch.testing.assert_close(cos[0], torch.cos(want))
    torch.testing.assert_close(sin[0], torch.sin(want))
