"""ChatGLM-6B (first generation): the transformer with 2-D positions and its tied output layer.

Module names follow THUDM's checkpoint names without the `transformer.` prefix. Semantics:
../shared/reference/FORMATS.md section 2 (v1) and chatglm_cpp/VECTORS.md 3.2.

A prompt is `text [gMASK] <sop>`: the tokens before <sop> (the context) attend to each other in both
directions, <sop> and everything generated after it attend causally. Each token has two positions:
its index in the context (generated tokens all stay at the [gMASK] index) and its index within the
generated block (0 in the context, 1 for <sop>, 2, 3, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import staging
from .config import ChatGLMConfig
from .kvpool import KVCache
from .ops import TorchOps
from .quant import half_weight_linear

# THUDM's ChatGLMModel builds GLMBlock without passing num_layers, whose default is 28: the residual
# scale is sqrt(2 * 28) whatever the depth of the model.
ALPHA = math.sqrt(2 * 28)


def record_layout(cfg: ChatGLMConfig, cache: KVCache, prompt: list[int]) -> None:
    """Remember where the context ends and where the mask is, from the prompt (prefill at start 0).

    As THUDM: context length = index of the first <sop>, mask position = index of [gMASK], else of
    [MASK]. Without <sop> the whole prompt is context (generation would begin right after it); without
    a mask token the last context token stands in for it (where [gMASK] is in a well-formed prompt).
    """
    ctx = prompt.index(cfg.bos_token_id) if cfg.bos_token_id in prompt else len(prompt)
    mask = next((prompt.index(m) for m in (cfg.gmask_token_id, cfg.mask_token_id) if m in prompt), max(ctx - 1, 0))
    cache.context_length, cache.mask_position = ctx, mask


def position_2d(cache: KVCache, index: int) -> tuple[int, int]:
    """(position, block position) of the token at `index`."""
    ctx = cache.context_length
    return (cache.mask_position, index - ctx + 1) if index >= ctx else (index, 0)


def positions_2d(cache: KVCache, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, block position) of the tokens at indices start..start+length-1."""
    rows = [position_2d(cache, i) for i in range(start, start + length)]
    return torch.tensor([p for p, _ in rows], dtype=torch.long), torch.tensor([b for _, b in rows], dtype=torch.long)


def attention_mask(cache: KVCache, start: int, length: int) -> torch.Tensor | None:
    """[length, start+length] bool, True = may attend: every context key, plus causal. None if all True."""
    if length == 1:  # one row sees every key up to itself
        return None
    rows = torch.arange(start, start + length)[:, None]
    cols = torch.arange(start + length)[None, :]
    mask = (cols < cache.context_length) | (cols <= rows)
    return None if bool(mask.all()) else mask


def rotary_2d(cfg: ChatGLMConfig, pos: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] for q/k laid out as [half rotated by pos | half rotated by block].

    Each half is rotated GPT-NeoX style (pairs j, j + quarter). THUDM rounds the inverse frequencies
    to fp16 (`inv_freq.half()`); the angles are computed in fp32, as THUDM's float (CPU) path and
    chatglm.cpp do (its fp16 GPU path also rounds the angles to fp16).
    """
    angles = torch.cat([half_angles(cfg, p) for p in (pos, block)], dim=-1)
    return torch.cos(angles), torch.sin(angles)


def half_angles(cfg: ChatGLMConfig, positions: torch.Tensor) -> torch.Tensor:
    """The rotary angles [..., head_dim/2] of one half of q/k at these positions."""
    half = cfg.head_dim // 2
    inv_freq = (1.0 / cfg.rope_base ** (torch.arange(0, half, 2, dtype=torch.float32) / half)).half().float()
    a = positions.float()[..., None] * inv_freq
    return torch.cat((a, a), dim=-1)


def rotary_table_2d(cfg: ChatGLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_context + 1, head_dim/2] of one half at every position and block position:
    rotary_2d(pos, block) is the rows pos and block side by side, the same bits."""
    angles = half_angles(cfg, torch.arange(cfg.max_context + 1))
    return torch.cos(angles), torch.sin(angles)


def staged_rotary_2d(step: staging.StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [rows, 1, head_dim] of a staged decode step's rows, gathered on the device."""
    cos, sin = step.rotary
    return tuple(torch.cat((t[step.positions], t[step.block_positions]), dim=-1)[:, None] for t in (cos, sin))


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, hd]; cos, sin [B, T, hd]."""
    q = x.shape[-1] // 4
    xf = x.float()
    # rotate_half within each half: (a, b) -> (-b, a) for quarters (0, 1) and (2, 3)
    x0, x1, x2, x3 = xf.split(q, dim=-1)
    rotated = torch.cat((-x1, x0, -x3, x2), dim=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Normalizes in fp32 whatever the compute dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, ops: TorchOps):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.q_size)
        self.dense = nn.Linear(cfg.q_size, cfg.hidden_size)

    def forward(self, x, cos, sin, masks, layer: int, starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        # Interleaved per head: each head's block of the output is [q | k | v].
        q, k, v = self.query_key_value(x).view(B, T, cfg.num_heads, 3 * cfg.head_dim).chunk(3, dim=-1)
        q, k = apply_rotary_2d(q, cos, sin), apply_rotary_2d(k, cos, sin)
        y = self.ops.masked_attention(q, k, v, masks, layer, starts, caches)
        return self.dense(y.reshape(B, T, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int, ops: TorchOps):
        super().__init__()
        self.layer = layer
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attention = SelfAttention(cfg, ops)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, masks, starts, caches):
        # The residual stream is the normalized input scaled by ALPHA, not the raw input.
        x = self.input_layernorm(x)
        h = x * ALPHA + self.attention(x, cos, sin, masks, self.layer, starts, caches)
        h = self.post_attention_layernorm(h)
        return h * ALPHA + self.mlp(h)


class TiedHead(nn.Module):
    """The output layer, computed from the word embeddings (THUDM ties lm_head to them).

    It owns no weight: the checkpoint's `lm_head.weight` (a copy of the embeddings) is never read,
    so the 1 GB matrix exists once, in the checkpoint's fp16.
    """

    def __init__(self, ops: TorchOps):
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return half_weight_linear(self.ops, x, weight)


class ChatGLM(nn.Module):
    # The bidirectional context needs the whole prompt in one forward pass (the engine reads this).
    prefill_whole = True
    # A prompt token's KV depends on the tokens after it (bidirectional context), so a cached
    # conversation's KV is not the KV of a longer prompt that starts with it: no prefix cache.
    exact_kv_reuse = False
    decode_writes_prefill_kv = True  # moot: without exact KV reuse nothing is cached

    def __init__(self, cfg: ChatGLMConfig, ops: TorchOps):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        # Given its weight: no random init on the meta device (see model.Embedding)
        self.word_embeddings = nn.Embedding.from_pretrained(
            torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=torch.float16))
        self.layers = nn.ModuleList(GLMBlock(cfg, i, ops) for i in range(cfg.num_layers))
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = TiedHead(ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layernorm.weight.dtype

    def rotary_table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of one half at every position (rotary_table_2d): a staged decode step gathers its
        two rows. Computed on the CPU, as the unstaged path computes its angles, then moved once."""
        return tuple(t.to(device) for t in rotary_table_2d(self.cfg))

    @staticmethod
    def decode_positions(cache: KVCache, start: int) -> tuple[int, int]:
        """The rows of rotary_table a decode token at `start` reads: its position and block position."""
        return position_2d(cache, start)

    def hidden_states(self, tokens: torch.Tensor, starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for tokens [B, T] at indices starts[b]..; fills the caches.

        A row starting at 0 is a prompt: it records the sequence's context length and mask position.
        A staged decode step (glm/staging.py) has its positions on the device already, and a decode
        row attends to every key before it: no host work, so a CUDA graph can replay it.
        """
        B, T = tokens.shape
        step = staging.current()
        if step is not None and step.rotary is not None:
            cos, sin = staged_rotary_2d(step)
            masks = [None] * B
        else:
            cos, sin, masks = self._positions(tokens, starts, caches)
        x = self.word_embeddings(tokens).to(self.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, masks, starts, caches)
        return self.final_layernorm(x)

    def _positions(self, tokens, starts, caches):
        """cos, sin [B, T, head_dim] and each row's attention mask, from the caches' layouts on the host."""
        B, T = tokens.shape
        pos, block, masks = [], [], []
        for b in range(B):
            if starts[b] == 0:
                record_layout(self.cfg, caches[b], tokens[b].tolist())
            p, k = positions_2d(caches[b], starts[b], T)
            pos.append(p)
            block.append(k)
            m = attention_mask(caches[b], starts[b], T)
            masks.append(None if m is None else m.to(tokens.device))
        cos, sin = rotary_2d(self.cfg, torch.stack(pos), torch.stack(block))
        return cos.to(tokens.device), sin.to(tokens.device), masks

    def forward(self, tokens: torch.Tensor, starts: list[int], caches: list[KVCache],
                last_only: bool = False, prefill: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) in the compute dtype. `prefill`
        changes nothing here (no prefix cache: a prompt's rows are never reused)."""
        x = self.hidden_states(tokens, starts, caches)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x, self.word_embeddings.weight)
