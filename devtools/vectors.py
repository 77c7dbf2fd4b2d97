"""chatglm.cpp's reference vectors (shared/reference/chatglm_cpp, VECTORS.md): a reader of its
headerless .data files and the one-layer models they hold, by THUDM's parameter names. The
conformance tests (tests/model) and the device check (bench/gpu_check) build them here, so both
run THUDM's numbers through the same weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glm.config import ChatGLMConfig
from glm.loader import PREFIX
from glm.model import ChatGLM2
from glm.model_v1 import ChatGLM

# VECTORS.md 3.4: hidden 32, 8 heads, 2 kv groups, head dim 4, 1 layer, ffn 48, vocab 5, max_length 8
TINY_REF = dict(num_layers=1, hidden_size=32, num_heads=8, kv_heads=2, head_dim=4, ffn_hidden_size=48,
                vocab_size=5, seq_length=8, max_context=8)
# VECTORS.md 3.2: hidden 32, 8 heads of 4, ffn 128, vocab 5. The prompt [0, 1, 2] has its context
# end (<sop>) at index 2 and its mask at index 1: ids 2 and 1 play <sop> and [gMASK].
VEC_CFG = ChatGLMConfig(family="chatglm", num_layers=1, hidden_size=32, num_heads=8, kv_heads=8, head_dim=4,
                        ffn_hidden_size=128, vocab_size=5, seq_length=8, max_context=8, norm_eps=1e-5,
                        pad_token_id=3, bos_token_id=2, gmask_token_id=1, mask_token_id=0)
# The whole-model files: prefill 3 tokens, then 2 decode steps, checked against hidden states.
MODEL_FILES = ("glm2_model.data", "glm3_model.data", "glm_model.data")
GLM_BLOCK_NAMES = ("input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
                   "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
                   "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                   "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                   "mlp.dense_4h_to_h.bias")


class DataReader:
    """Sequential reader of chatglm.cpp's headerless .data files (VECTORS.md section 1)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.buf = self.path.read_bytes()
        self.offset = 0

    def read(self, *shape: int, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape))
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.offset).reshape(shape)
        self.offset += arr.nbytes
        return arr.copy()

    def assert_consumed(self) -> None:
        assert self.offset == len(self.buf), f"{self.path.name}: {len(self.buf) - self.offset} bytes left unread"


def read_glm2_weights(r: DataReader, cfg: ChatGLMConfig, layer_prefix: str) -> dict[str, torch.Tensor]:
    """One ChatGLM2 block's weights, by THUDM's names under `layer_prefix`."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    shapes = [("input_layernorm.weight", (h,)),
              ("self_attention.query_key_value.weight", (qkv, h)),
              ("self_attention.query_key_value.bias", (qkv,)),
              ("self_attention.dense.weight", (h, cfg.q_size)),
              ("post_attention_layernorm.weight", (h,)),
              ("mlp.dense_h_to_4h.weight", (2 * f, h)),
              ("mlp.dense_4h_to_h.weight", (h, f))]
    return {layer_prefix + name: torch.from_numpy(r.read(*shape)) for name, shape in shapes}


def glm2_model_checkpoint(r: DataReader, cfg: ChatGLMConfig) -> dict[str, torch.Tensor]:
    """A glm2/glm3 model file's one-layer model as a checkpoint (THUDM's names); the file has no
    output layer (its vectors are hidden states), so that one is zeros."""
    ckpt = {PREFIX + "embedding.word_embeddings.weight": torch.from_numpy(r.read(cfg.vocab_size, cfg.hidden_size))}
    ckpt |= {PREFIX + k: v for k, v in read_glm2_weights(r, cfg, "encoder.layers.0.").items()}
    ckpt[PREFIX + "encoder.final_layernorm.weight"] = torch.from_numpy(r.read(cfg.hidden_size))
    ckpt[PREFIX + "output_layer.weight"] = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    return ckpt


def load_by_checkpoint_names(module: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> None:
    """Assign tensors named as in THUDM's checkpoints (`transformer.` + module name), as the loader does."""
    state = {name: checkpoint[PREFIX + name] for name in module.state_dict()}
    module.load_state_dict(state, strict=True)


def read_glm_block(r: DataReader, cfg: ChatGLMConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """One ChatGLM-6B block's weights, by our module names under `prefix`."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    shapes = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (f, h), (f,), (h, f), (h,)]
    return {prefix + n: torch.from_numpy(r.read(*s)) for n, s in zip(GLM_BLOCK_NAMES, shapes)}


def read_glm_model_weights(r: DataReader, cfg: ChatGLMConfig) -> dict[str, torch.Tensor]:
    """The one-block ChatGLM-6B model of glm_model.data, by our module names."""
    sd = {"word_embeddings.weight": torch.from_numpy(r.read(cfg.vocab_size, cfg.hidden_size))}
    sd |= read_glm_block(r, cfg, "layers.0.")
    sd["final_layernorm.weight"] = torch.from_numpy(r.read(cfg.hidden_size))
    sd["final_layernorm.bias"] = torch.from_numpy(r.read(cfg.hidden_size))
    return sd


def vector_model(name: str, r: DataReader, ops) -> tuple[ChatGLMConfig, torch.nn.Module]:
    """The model of one of MODEL_FILES computing with `ops`, its weights read from `r`, which is left
    at the file's first inputs."""
    if name == "glm_model.data":
        model = ChatGLM(VEC_CFG, ops)
        model.load_state_dict(read_glm_model_weights(r, VEC_CFG), strict=True)
        return VEC_CFG, model
    cfg = ChatGLMConfig(**TINY_REF)
    model = ChatGLM2(cfg, ops)
    load_by_checkpoint_names(model, glm2_model_checkpoint(r, cfg))
    return cfg, model


def hidden_state_steps(model: torch.nn.Module, r: DataReader, cfg: ChatGLMConfig, cache, steps=(3, 1, 1)):
    """A model file's inputs through `model` on `cache`: a prefill of steps[0] tokens, then a step
    per further count. Yields (computed, THUDM's) hidden states per step, the computed ones on the
    model's device; after the last step the file must be read to its end."""
    device, start = next(model.parameters()).device, 0
    for n in steps:
        ids = torch.from_numpy(r.read(n, dtype=np.int32)).long().to(device)
        want = torch.from_numpy(r.read(n, cfg.hidden_size))
        with torch.inference_mode():
            got = model.hidden_states(ids[None], [start], [cache])[0]
        yield got, want
        start += n
    r.assert_consumed()
