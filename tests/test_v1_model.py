"""ChatGLM-6B (v1): conformance with THUDM's numbers (chatglm.cpp vectors) and the engine around it."""
from __future__ import annotations

import torch

from glm.config import ChatGLMConfig
from glm.model import KVCache
from glm.model_v1 import ChatGLM, GLMBlock, attention_mask, positions_2d, rotary_2d

from reference import DataReader

TOL = 5e-4
# VECTORS.md 3.2: hidden 32, 8 heads of 4, ffn 128, vocab 5. The prompt [0, 1, 2] has its context
# end (<sop>) at index 2 and its mask at index 1: ids 2 and 1 play <sop> and [gMASK].
VEC_CFG = ChatGLMConfig(family="chatglm", num_layers=1, hidden_size=32, num_heads=8, kv_heads=8, head_dim=4,
                        ffn_hidden_size=128, vocab_size=5, seq_length=8, max_context=8, norm_eps=1e-5,
                        eos_token_id=4, pad_token_id=3, bos_token_id=2, gmask_token_id=1, mask_token_id=0)
BLOCK_NAMES = ("input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
               "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
               "post_attention_layernorm.weight", "post_attention_layernorm.bias",
               "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
               "mlp.dense_4h_to_h.bias")


def _block_shapes(cfg):
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    return [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (f, h), (f,), (h, f), (h,)]


def _read_block(r: DataReader, cfg, prefix: str = "") -> dict:
    return {prefix + n: torch.from_numpy(r.read(*s)) for n, s in zip(BLOCK_NAMES, _block_shapes(cfg))}


def _report(name, errors):
    print(f"{name}: max abs error per step {', '.join(f'{e:.2e}' for e in errors)}")
    assert max(errors) < TOL, f"{name}: {errors}"


def test_glm_model_vectors():
    cfg = VEC_CFG
    r = DataReader("glm_model.data")
    sd = {"word_embeddings.weight": torch.from_numpy(r.read(cfg.vocab_size, cfg.hidden_size))}
    sd |= _read_block(r, cfg, "layers.0.")
    sd["final_layernorm.weight"] = torch.from_numpy(r.read(cfg.hidden_size))
    sd["final_layernorm.bias"] = torch.from_numpy(r.read(cfg.hidden_size))
    with torch.device("meta"):
        model = ChatGLM(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    cache = KVCache(cfg, 8, "cpu", torch.float32)
    errors, start = [], 0
    for n in (3, 1, 1):
        x = torch.from_numpy(r.read(n, dtype="int32")).long()
        y = torch.from_numpy(r.read(n, cfg.hidden_size))
        with torch.inference_mode():
            out = model.hidden_states(x[None], [start], [cache])[0]
        errors.append((out - y).abs().max().item())
        start += n
    r.assert_consumed()
    assert (cache.context_length, cache.mask_position) == (2, 1)
    _report("glm_model.data", errors)


def test_glm_block_vectors():
    cfg = VEC_CFG
    r = DataReader("glm_block.data")
    block = GLMBlock(cfg, 0)  # THUDM layer_id 3 only scales and unscales the scores
    block.load_state_dict(_read_block(r, cfg), strict=True)
    # VECTORS.md 3.6: positions [[0,1,2,2],[0,0,0,1]] = context of 3 with the mask at index 2.
    cache = KVCache(cfg, 8, "cpu", torch.float32)
    cache.context_length, cache.mask_position = 3, 2
    errors, start = [], 0
    for n in (4, 1, 1):
        x = torch.from_numpy(r.read(n, cfg.hidden_size))
        y = torch.from_numpy(r.read(n, cfg.hidden_size))
        pos, blk = positions_2d(cache, start, n)
        cos, sin = rotary_2d(cfg, pos[None], blk[None])
        with torch.inference_mode():
            out = block(x[None], cos, sin, [attention_mask(cache, start, n)], [start], [cache])[0]
        errors.append((out - y).abs().max().item())
        start += n
    r.assert_consumed()
    _report("glm_block.data", errors)


def test_positions_follow_thudm_layout():
    cache = KVCache(VEC_CFG, 8, "cpu", torch.float32)
    cache.context_length, cache.mask_position = 3, 2
    pos, blk = positions_2d(cache, 0, 6)
    assert pos.tolist() == [0, 1, 2, 2, 2, 2] and blk.tolist() == [0, 0, 0, 1, 2, 3]
    assert attention_mask(cache, 0, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert attention_mask(cache, 4, 1) is None
