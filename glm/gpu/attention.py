"""Attention on the Triton backend: decode for the whole batch in one launch per layer, prefill via SDPA.

Decode reads every sequence's cache from the engine's KV pool (glm/kvpool.py): all caches are
contiguous [layers, groups, slots, head_dim] views of one flat k tensor and one flat v tensor, so a
launch gets the two flat tensors plus, per sequence, the element offset of its cache, its number of
slots and the slot of the new token. Each program is one (sequence, query head): it applies the
rotary embedding to its query (and, for the group's first head, writes the rotated key and the
value into the cache), then runs an online softmax over the cache in fp32. A sequence's result
depends only on its own cache and length, never on its batch-mates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

KEY_BLOCK = 32  # cached keys per iteration of the online softmax


@triton.jit
def _rotate(x_ptr, offs, cos_ptr, sin_ptr, ROT: tl.constexpr, ROTARY: tl.constexpr):
    """Element offs of a head after ChatGLM2's rotary (adjacent pairs of the first ROT dims), fp32."""
    x = tl.load(x_ptr + offs).to(tl.float32)
    if ROTARY:
        partner = tl.load(x_ptr + (offs ^ 1)).to(tl.float32)
        rotated = offs < ROT
        pair = tl.where(rotated, offs // 2, 0)
        c = tl.where(rotated, tl.load(cos_ptr + pair), 1.0)
        s = tl.where(rotated, tl.load(sin_ptr + pair), 0.0)
        sign = tl.where(offs % 2 == 0, -1.0, 1.0)
        x = x * c + sign * partner * s
    return x


@triton.jit
def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, pool_k_ptr, pool_v_ptr, cache_offset_ptr, cache_slots_ptr, slot_ptr,
        cos_ptr, sin_ptr, layer, scale,
        q_stride_b, q_stride_h, k_stride_b, k_stride_g, v_stride_b, v_stride_g, cos_stride_b,
        GROUPS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        ROTARY: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    d = tl.arange(0, HEAD_DIM)
    ROT: tl.constexpr = HEAD_DIM // 2
    cos_b, sin_b = cos_ptr + b * cos_stride_b, sin_ptr + b * cos_stride_b

    # The new token: rotated q and k rounded to the cache dtype, as every later step reads them.
    dtype = pool_k_ptr.dtype.element_ty
    q = _rotate(q_ptr + b * q_stride_b + head * q_stride_h, d, cos_b, sin_b, ROT, ROTARY)
    q = q.to(dtype).to(tl.float32)
    k_new = _rotate(k_ptr + b * k_stride_b + group * k_stride_g, d, cos_b, sin_b, ROT, ROTARY).to(dtype)
    v_new = tl.load(v_ptr + b * v_stride_b + group * v_stride_g + d)

    slots = tl.load(cache_slots_ptr + b).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    base = tl.load(cache_offset_ptr + b).to(tl.int64) + ((layer * GROUPS + group) * slots) * HEAD_DIM
    if head % HEADS_PER_GROUP == 0:  # one writer per group; no program reads this slot from memory
        tl.store(pool_k_ptr + base + slot * HEAD_DIM + d, k_new)
        tl.store(pool_v_ptr + base + slot * HEAD_DIM + d, v_new)

    # Online softmax over slots 0..slot-1 from the cache, then the new token from registers.
    m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale
    denom = tl.exp(m - m)
    acc = v_new.to(tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(0, slot, BLOCK_N):
        rows = start + n
        valid = rows < slot
        offs = base + rows[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(pool_k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new)
        v = tl.load(pool_v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        denom = denom * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + (b * GROUPS * HEADS_PER_GROUP + head) * HEAD_DIM + d, (acc / denom).to(dtype))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor,
                     pool_v: torch.Tensor, cache_offsets: torch.Tensor, cache_slots: torch.Tensor,
                     slots: torch.Tensor, layer: int, scale: float, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention for B sequences; returns [B, heads, head_dim] in the pool's dtype.

    q [B, heads, hd], k, v [B, groups, hd] (any views with unit stride in hd); pool_k, pool_v: the flat
    pool tensors; per sequence (int64 [B] on the device): cache_offsets, the element offset of its
    cache in the pool, cache_slots, the cache's slot dimension, slots, the slot of the new token
    (it attends over slots 0..slots[b]). cos, sin [B, hd/4] fp32 apply ChatGLM2's rotary to q and k;
    None when q and k are already rotated (ChatGLM-6B).
    """
    B, heads, hd = q.shape
    groups = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("decode_attention: q, k, v need unit stride in head_dim")
    rotary = cos is not None
    if not rotary:
        cos = sin = torch.empty(B, 1, device=q.device, dtype=torch.float32)
    out = torch.empty(B, heads, hd, device=q.device, dtype=pool_k.dtype)
    _decode_attention_kernel[(B, heads)](
        q, k, v, out, pool_k, pool_v, cache_offsets, cache_slots, slots, cos, sin, layer, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        GROUPS=groups, HEADS_PER_GROUP=heads // groups, HEAD_DIM=hd, ROTARY=rotary, BLOCK_N=KEY_BLOCK)
    return out


def pool_views(caches) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """(flat k, flat v, each cache's element offset) addressing every cache from one base, or None.

    The engine's caches are views of its KVPool; a cache made on its own (GLM.logits) is its own
    pool. None when the caches do not share one k storage and one v storage.
    """
    k0, v0 = caches[0].k, caches[0].v
    k_store, v_store = k0.untyped_storage(), v0.untyped_storage()
    offsets = []
    for c in caches:
        if c.k.untyped_storage().data_ptr() != k_store.data_ptr() or \
                c.v.untyped_storage().data_ptr() != v_store.data_ptr():
            return None
        off_k = (c.k.data_ptr() - k_store.data_ptr()) // c.k.element_size()
        off_v = (c.v.data_ptr() - v_store.data_ptr()) // c.v.element_size()
        if off_k != off_v or not c.k.is_contiguous() or not c.v.is_contiguous():
            return None
        offsets.append(off_k)
    flat_k = torch.empty(0, dtype=k0.dtype, device=k0.device).set_(k_store)
    flat_v = torch.empty(0, dtype=v0.dtype, device=v0.device).set_(v_store)
    return flat_k, flat_v, offsets


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence's prefill attention through SDPA (fp16 works on CUDA and on the CPU).

    q [heads, T, hd]; k, v [groups, S, hd]. Causal from cache slot `start` unless a bool mask
    [T, S] (True = may attend) is given. Groups are expanded to heads so that SDPA can choose a
    fused kernel on a T4 (its GQA mode is math-only there).
    """
    heads, T, _ = q.shape
    groups, S, _ = k.shape
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=0)
        v = v.repeat_interleave(heads // groups, dim=0)
    if mask is None and start > 0:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if mask is None:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]


def _decode_spec(shape_class: str, heads: int, groups: int, head_dim: int, rotary: bool):
    from .compile import KernelSpec
    ptrs = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "pool_k_ptr", "pool_v_ptr")
    signature = {**{p: "*fp16" for p in ptrs}, "cache_offset_ptr": "*i64", "cache_slots_ptr": "*i64",
                 "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "layer": "i32", "scale": "fp32",
                 **{s: "i32" for s in ("q_stride_b", "q_stride_h", "k_stride_b", "k_stride_g", "v_stride_b",
                                       "v_stride_g", "cos_stride_b")},
                 **{c: "constexpr" for c in ("GROUPS", "HEADS_PER_GROUP", "HEAD_DIM", "ROTARY", "BLOCK_N")}}
    return KernelSpec(
        kernel=_decode_attention_kernel, shape_class=shape_class, signature=signature,
        constexprs={"GROUPS": groups, "HEADS_PER_GROUP": heads // groups, "HEAD_DIM": head_dim,
                    "ROTARY": rotary, "BLOCK_N": KEY_BLOCK},
        # every pointer comes from a torch allocation; strides are multiples of head_dim = 128
        aligned=(*ptrs, "cache_offset_ptr", "cache_slots_ptr", "slot_ptr", "cos_ptr", "sin_ptr",
                 "q_stride_b", "q_stride_h", "k_stride_b", "k_stride_g", "v_stride_b", "v_stride_g", "cos_stride_b"),
        no_spills=True)


COMPILE_SPECS = [
    _decode_spec("decode ChatGLM2-6B (32 heads, 2 groups, hd 128, rotary)", 32, 2, 128, True),
    _decode_spec("decode ChatGLM-6B (32 heads, hd 128, rotated outside)", 32, 32, 128, False),
]
