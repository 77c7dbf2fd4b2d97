"""ChatGLM2 (and ChatGLM3, same architecture): the transformer.

Module names follow THUDM's checkpoint names without the `transformer.` prefix, so loading is a
rename-free assignment. Semantics: ../shared/reference/FORMATS.md, section 2. The layers compute
with the `ops` the loader chose (glm.ops).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import staging
from .config import ChatGLMConfig
from .kvpool import KVCache
from .ops import TorchOps, rotary_angles
from .quant import HalfLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: TorchOps):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    """Word embeddings, kept in the checkpoint's dtype; looked-up rows are cast to the compute dtype."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        # Given its (uninitialized) weight: a random init on the meta device imports torch._dynamo,
        # and with it triton, into a CPU deployment that never uses them.
        self.word_embeddings = nn.Embedding.from_pretrained(torch.empty(vocab_size, dim, dtype=torch.float16))

    def forward(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.word_embeddings(tokens).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, ops: TorchOps):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.query_key_value = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.dense = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer: int, starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.query_key_value(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        y = self.ops.attention(q.view(B, T, cfg.num_heads, cfg.head_dim), k.view(B, T, cfg.kv_heads, cfg.head_dim),
                               v.view(B, T, cfg.kv_heads, cfg.head_dim), cos, sin, layer, starts, caches)
        return self.dense(y.reshape(B, T, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, ops: TorchOps):
        super().__init__()
        self.ops = ops
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.ops.swiglu(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int, ops: TorchOps):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ops)
        self.self_attention = SelfAttention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, cos, sin, starts, caches):
        h = x + self.self_attention(self.input_layernorm(x), cos, sin, self.layer, starts, caches)
        return h + self.mlp(self.post_attention_layernorm(h))


class Encoder(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, ops: TorchOps):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg, i, ops) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ops)


class ChatGLM2(nn.Module):
    # Prompts are prefilled in chunks of any size (causal attention: a chunk needs only the KV before it).
    prefill_whole = False

    def __init__(self, cfg: ChatGLMConfig, ops: TorchOps):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = Encoder(cfg, ops)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.final_layernorm.weight.dtype

    @property
    def exact_kv_reuse(self) -> bool:
        """Whether cached KV can stand in for a recomputation bit for bit once the ops compute rows
        exactly (ops.rows_exactly, which the engine's steps run under when its prefix cache is on):
        every row of the forward pass is then computed the same way in any prefill chunk or decode
        step, so the prefix cache changes no output."""
        half_weights = any(isinstance(m, HalfLinear) for m in self.encoder.layers.modules())
        return self.ops.computes_rows_exactly(self.dtype, half_weights)

    @property
    def decode_writes_prefill_kv(self) -> bool:
        """Whether a decode step writes the same KV bits as an exact prefill of that token (the ops
        say: not on Triton, whose exact prefill multiplies in fixed-size tensor-core chunks), else
        the engine recomputes a reply's rows as prefill before the prefix cache keeps them."""
        return self.ops.decode_writes_prefill_kv

    def rotary_table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_context, rot/2] of every position: a staged decode step gathers its rows."""
        return rotary_angles(self.cfg, torch.arange(self.cfg.max_context, device=device))

    @staticmethod
    def decode_positions(cache: KVCache, start: int) -> tuple[int, int]:
        """The rows of rotary_table a decode token at `start` reads: its position (and no second one)."""
        return start, 0

    def hidden_states(self, tokens: torch.Tensor, starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for tokens [B, T] at positions starts[b]..; fills the caches."""
        T = tokens.shape[1]
        step = staging.current()
        if step is not None and step.rotary is not None:  # a staged decode step (glm/staging.py)
            cos, sin = step.rotary_angles()
        else:
            positions = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)
            cos, sin = rotary_angles(self.cfg, positions)
        x = self.embedding(tokens, self.dtype)
        for block in self.encoder.layers:
            x = block(x, cos, sin, starts, caches)
        return self.encoder.final_layernorm(x)

    def forward(self, tokens: torch.Tensor, starts: list[int], caches: list[KVCache],
                last_only: bool = False, prefill: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) in the compute dtype. `prefill`:
        the rows are prompt rows whose KV the prefix cache may keep (ops.prefill_rows)."""
        with self.ops.prefill_rows() if prefill else contextlib.nullcontext():
            x = self.hidden_states(tokens, starts, caches)
        if last_only:
            x = x[:, -1:]
        return self.output_layer(x)
