"""What the model's layers compute on the Triton backend (module.backend == "triton").

glm/model.py and glm/model_v1.py dispatch here at the top of their forwards; the linears
(QuantLinear, HalfLinear) dispatch to glm.gpu.linear on their own. Activations are fp16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import attention, pointwise, prefill


# The per-row tensors of the last call, keyed by the values they hold: every layer of a step asks
# for the same ones, so they are copied to the device once per step. No reference to the pool is
# kept (a replaced engine's pool is freed). Read and replaced as one tuple: concurrent callers
# (another model's self-test) at worst rebuild it.
_last_plan: tuple | None = None


def row_plan(caches, starts: list[int], T: int, device):
    """For rows t = 0..T-1 of each sequence b at position starts[b] + t: (pool k, pool v, each row's
    cache offset, cache slot count and slot) for attention.row_attention, or None (no shared pool)."""
    global _last_plan
    views = attention.pool_views(caches)
    if views is None:
        return None
    flat_k, flat_v, offsets = views
    first = [c.slot(s, T) for c, s in zip(caches, starts)]
    key = (tuple(o for o in offsets for _ in range(T)),
           tuple(c.k.shape[2] for c in caches for _ in range(T)),
           tuple(f + t for f in first for t in range(T)), str(device))
    last = _last_plan
    if last is None or last[0] != key:
        last = (key, tuple(torch.tensor(v, device=device) for v in key[:3]))
        _last_plan = last
    return (flat_k, flat_v, *last[1])


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    return pointwise.rms_norm(x, norm.weight, norm.eps)


def mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.dense_4h_to_h(pointwise.swiglu(mlp.dense_h_to_4h(x)))


def chatglm2_attention(attn, x, cos, sin, layer: int, starts: list[int], caches) -> torch.Tensor:
    """ChatGLM2's SelfAttention.forward: decode steps, and prefill when attn.exact_rows, as rows at
    their own slots (attention.row_attention); a prefill the prefix cache keeps (inside
    prefill.exact_chunks) through prefill.causal_attention; other prefill through SDPA."""
    from ..model import apply_rotary  # the SDPA path rotates with the same torch ops as the CPU

    cfg = attn.cfg
    B, T, _ = x.shape
    q, k, v = attn.query_key_value(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    exact_prefill = prefill.chunk_rows() is not None  # rows the prefix cache keeps: prefill.causal_attention
    if (T == 1 or attn.exact_rows) and not exact_prefill:
        plan = row_plan(caches, starts, T, x.device)
        if plan is not None:
            y = attention.row_attention(
                q.reshape(B * T, cfg.num_heads, cfg.head_dim), k.reshape(B * T, cfg.kv_heads, cfg.head_dim),
                v.reshape(B * T, cfg.kv_heads, cfg.head_dim), *plan, layer, cfg.head_dim ** -0.5,
                cos.reshape(B * T, -1), sin.reshape(B * T, -1))
            return attn.dense(y.view(B, T, cfg.q_size))
    q = apply_rotary(q.view(B, T, cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rotary(k.view(B, T, cfg.kv_heads, cfg.head_dim), cos, sin)
    v = v.view(B, T, cfg.kv_heads, cfg.head_dim)
    out = []
    for b in range(B):
        keys, values = caches[b].update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
        if exact_prefill:
            out.append(prefill.causal_attention(q[b].transpose(0, 1), keys, values))
        else:
            out.append(attention.prefill_attention(q[b].transpose(0, 1), keys, values, caches[b].offset + starts[b]))
    return attn.dense(torch.stack(out).transpose(1, 2).reshape(B, T, cfg.q_size))


def chatglm_attention(attn, x, cos, sin, masks, layer: int, starts: list[int], caches) -> torch.Tensor:
    """ChatGLM-6B's SelfAttention.forward: its 2-D rotary with torch ops (one small elementwise pass),
    then decode as rows at their own slots (a generated token sees every key), prefill through SDPA."""
    from ..model_v1 import apply_rotary_2d

    cfg = attn.cfg
    B, T, _ = x.shape
    q, k, v = attn.query_key_value(x).view(B, T, cfg.num_heads, 3 * cfg.head_dim).chunk(3, dim=-1)
    q, k = apply_rotary_2d(q, cos, sin), apply_rotary_2d(k, cos, sin)
    if T == 1:
        plan = row_plan(caches, starts, 1, x.device)
        if plan is not None:
            y = attention.row_attention(q[:, 0], k[:, 0], v[:, 0], *plan, layer, cfg.head_dim ** -0.5)
            return attn.dense(y.view(B, 1, cfg.q_size))
    out = []
    for b in range(B):
        keys, values = caches[b].update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
        # masks[b] None: every key visible (the whole prompt is context)
        out.append(F.scaled_dot_product_attention(q[b].transpose(0, 1), keys, values, attn_mask=masks[b]))
    return attn.dense(torch.stack(out).transpose(1, 2).reshape(B, T, cfg.q_size))
