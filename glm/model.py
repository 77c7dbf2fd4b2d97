"""ChatGLM2 (and ChatGLM3, same architecture): the transformer and its KV cache.

Module names follow THUDM's checkpoint names without the `transformer.` prefix, so loading is a
rename-free assignment. Semantics: ../shared/reference/FORMATS.md, section 2.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ChatGLMConfig


class KVCache:
    """One sequence's keys and values for every layer, preallocated for `capacity` tokens.

    Only the kv groups are stored (2 at full size, multi-query attention): [layers, groups, capacity, head_dim].
    A P-tuning v2 prefix ([layers, 2 (k, v), groups, prefix_len, head_dim]) occupies the first
    slots: it is visible to every token and takes no position.
    """

    def __init__(self, cfg: ChatGLMConfig, capacity: int, device, dtype: torch.dtype,
                 prefix: torch.Tensor | None = None, storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        """storage: flat (k, v) tensors to view instead of allocating (an extent of a glm.kvpool.KVPool)."""
        self.offset = 0 if prefix is None else prefix.shape[3]
        shape = (cfg.num_layers, cfg.kv_heads, self.offset + capacity, cfg.head_dim)
        if storage is None:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        else:
            self.k, self.v = (t.view(shape) for t in storage)
        if prefix is not None:
            self.k[:, :, :self.offset] = prefix[:, 0]
            self.v[:, :, :self.offset] = prefix[:, 1]
        self.capacity = capacity

    @staticmethod
    def bytes_per_token(cfg: ChatGLMConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def slot(self, start: int, n: int = 1) -> int:
        """The cache slot of position `start`, checking that n tokens from there fit."""
        if start + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {start + n} > capacity {self.capacity}")
        return self.offset + start

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([groups, T, head_dim]) at positions start.. and return all keys/values so far."""
        start = self.slot(start, k.shape[1])
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


def uses_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether x goes through the fused CPU kernels (RMSNorm, SwiGLU, decode attention): one call
    instead of several small torch ops."""
    return kernels.used_for(x.device, x.dtype)


class RMSNorm(nn.Module):
    backend = "torch"  # "triton": glm.gpu.blocks computes the layer (set by the loader)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from .gpu import blocks
            return blocks.rms_norm(self, x)
        if uses_cpu_kernels(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class Embedding(nn.Module):
    """Word embeddings, kept in the checkpoint's dtype; looked-up rows are cast to the compute dtype."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim, dtype=torch.float16)

    def forward(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.word_embeddings(tokens).to(dtype)


def rotary_angles(cfg: ChatGLMConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, rot/2] for the rotated half of each head (fp32).

    rope_ratio (ChatGLM2-32K) interpolates positions; it does not change the base. Computed in fp32
    for every position (THUDM's HF code rounds positions > 2048 to fp16 under torch_dtype=float16;
    chatglm.cpp and we do not).
    """
    rot = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, rot, 2, device=positions.device, dtype=torch.float32) / rot))
    angles = (positions.float() / cfg.rope_ratio)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first half of the head dim. x: [B, T, heads, hd]."""
    rot = x.shape[-1] // 2
    xr = x[..., :rot].float().unflatten(-1, (rot // 2, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at cache slots start.. over keys 0..start+T-1.

    q: [heads, T, hd]; k, v: [groups, S, hd]; query head h uses group h // (heads / groups).
    """
    heads, T, hd = q.shape
    groups, S, _ = k.shape
    if T == 1:
        # Decode: one grouped matmul per step. (CPU SDPA costs far more than the math here.)
        qg = q.view(groups, heads // groups, hd)
        scores = (qg @ k.transpose(1, 2)).float() * hd ** -0.5
        return (scores.softmax(-1).to(v.dtype) @ v).view(heads, 1, hd)
    if q.is_cuda and groups != heads:
        # Expanded so that SDPA can pick a fused kernel (its GQA mode is math-only on a T4).
        k = k.repeat_interleave(heads // groups, dim=0)
        v = v.repeat_interleave(heads // groups, dim=0)
    q, k, v = q[None], k[None], v[None]
    gqa = k.shape[1] != heads
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out[0]


def uses_fused_decode_attention(x: torch.Tensor, caches: list[KVCache]) -> bool:
    """Whether a decode step's attention runs in the CPU kernel (one call for the whole batch)."""
    return uses_cpu_kernels(x) and all(c.k.dtype == x.dtype for c in caches)


class SelfAttention(nn.Module):
    backend = "torch"
    exact_rows = False  # triton: prefill rows through the decode kernels (ChatGLM2.compute_rows_exactly)

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.cfg = cfg
        self.query_key_value = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.dense = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer: int, starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        if self.backend == "triton":
            from .gpu import blocks
            return blocks.chatglm2_attention(self, x, cos, sin, layer, starts, caches)
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.query_key_value(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        if T == 1 and uses_fused_decode_attention(x, caches):
            # One kernel call: rotary, cache writes and attention for the whole batch.
            slots = [c.slot(s) for c, s in zip(caches, starts)]
            y = kernels.decode_attention(q.view(B, cfg.num_heads, cfg.head_dim), k.view(B, cfg.kv_heads, cfg.head_dim),
                                         v.view(B, cfg.kv_heads, cfg.head_dim), [c.k for c in caches],
                                         [c.v for c in caches], layer, slots, cfg.head_dim ** -0.5,
                                         cos[:, 0], sin[:, 0])
            return self.dense(y.view(B, 1, cfg.q_size))
        q = apply_rotary(q.view(B, T, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(k.view(B, T, cfg.kv_heads, cfg.head_dim), cos, sin)
        v = v.view(B, T, cfg.kv_heads, cfg.head_dim)
        # Each sequence attends over its own cache: rows never see each other, and a row's result
        # does not depend on what else is in the batch.
        row_kernel = uses_fused_decode_attention(x, caches)
        out = []
        for b in range(B):
            keys, values = caches[b].update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
            if row_kernel:
                # Every query row through the decode kernel's math: a position's output is the same
                # whichever chunk (or decode step) computes it, so cached KV can be reused exactly.
                y = kernels.prefill_attention(q[b], caches[b].k, caches[b].v, layer,
                                              caches[b].offset + starts[b], cfg.head_dim ** -0.5)
                out.append(y.transpose(0, 1))
            else:
                out.append(attend(q[b].transpose(0, 1), keys, values, caches[b].offset + starts[b]))
        y = torch.stack(out).transpose(1, 2).reshape(B, T, cfg.q_size)
        return self.dense(y)


class MLP(nn.Module):
    backend = "torch"

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from .gpu import blocks
            return blocks.mlp(self, x)
        h = self.dense_h_to_4h(x)
        if uses_cpu_kernels(h):
            return self.dense_4h_to_h(kernels.swiglu(h))
        gate, up = h.chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, starts, caches):
        h = x + self.self_attention(self.input_layernorm(x), cos, sin, self.layer, starts, caches)
        return h + self.mlp(self.post_attention_layernorm(h))


class Encoder(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class ChatGLM2(nn.Module):
    backend = "torch"  # "triton": glm.gpu's kernels (set by the loader)

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.final_layernorm.weight.dtype

    @property
    def reuses_kv_exactly(self) -> bool:
        """Whether cached KV can stand in for a recomputation bit for bit: every row of the forward
        pass is computed the same way in any prefill chunk or decode step, so the engine's prefix
        cache changes no output. Fused CPU kernels: always (row-wise linears and norms, per-row
        attention). Triton: once compute_rows_exactly() has switched prefill to the decode kernels."""
        if self.backend == "triton":
            return self.encoder.layers[0].self_attention.exact_rows
        w = self.encoder.final_layernorm.weight
        if not uses_cpu_kernels(w):
            return False
        # bf16 activations on fp16 dense weights take a bf16 GEMM past one chunk of rows
        # (quant.half_weight_linear), whose rows depend on how many there are.
        fp16_dense = any(getattr(m, "weight", None) is not None and m.weight.dtype == torch.float16
                         for m in self.encoder.layers.modules())
        return w.dtype == torch.float32 or not fp16_dense

    def compute_rows_exactly(self) -> bool:
        """Compute every prefill row as a decode step computes it, where that is a choice (Triton:
        the GEMV and per-row attention instead of the GEMM and SDPA, slower prefill), and return
        reuses_kv_exactly. The engine calls this when its prefix cache is on."""
        if self.backend == "triton":
            for m in self.modules():
                if hasattr(m, "exact_rows"):
                    m.exact_rows = True
        return self.reuses_kv_exactly

    @property
    def decode_writes_prefill_kv(self) -> bool:
        """Whether a decode step writes the same KV bits as a prefill of that token. The CPU kernels
        compute every row alike; on Triton, prefill multiplies on the tensor cores in fixed-size
        chunks and decode in the GEMV, so the engine recomputes a reply's rows as prefill before the
        prefix cache keeps them."""
        return self.backend != "triton"

    def prefill_rows(self, prefill: bool):
        """The context a forward pass runs in: with exact rows on Triton, a prefill computes its
        rows in fixed-size GEMMs (glm.gpu.prefill.exact_chunks), so a position's KV is the same bits
        whichever chunk holds it."""
        if prefill and self.backend == "triton" and self.reuses_kv_exactly:
            from .gpu import prefill as gpu_prefill
            return gpu_prefill.exact_chunks()
        return contextlib.nullcontext()

    def hidden_states(self, tokens: torch.Tensor, starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for tokens [B, T] at positions starts[b]..; fills the caches."""
        T = tokens.shape[1]
        positions = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)
        cos, sin = rotary_angles(self.cfg, positions)
        x = self.embedding(tokens, self.dtype)
        for block in self.encoder.layers:
            x = block(x, cos, sin, starts, caches)
        return self.encoder.final_layernorm(x)

    def forward(self, tokens: torch.Tensor, starts: list[int], caches: list[KVCache],
                last_only: bool = False, prefill: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) in the compute dtype. `prefill`:
        the rows are prompt rows whose KV the prefix cache may keep (prefill_rows)."""
        with self.prefill_rows(prefill):
            x = self.hidden_states(tokens, starts, caches)
        if last_only:
            x = x[:, -1:]
        return self.output_layer(x)
