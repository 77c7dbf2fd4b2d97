"""Attention on the Triton backend: rows at their own cache slots (every decode step, and prefill when
rows must be exact), or a whole prefill chunk through SDPA.

Every cache is a contiguous [layers, groups, slots, head_dim] view of the engine's KV pool
(glm/kvpool.py): one flat k tensor and one flat v tensor, so a launch gets the two flat tensors plus,
per query row, the element offset of its cache, its number of slots and the row's own slot.

`row_attention` takes R query rows, each at its own slot: a decode step is one row per sequence, a
prefill chunk is consecutive slots of one cache. `_store_rows_kernel` applies the rotary embedding to
every row's q and k and writes k and v into the cache; then `_attend_rows_kernel`, one program per
(row, KV group, span of keys), runs an online softmax in fp32 over its span of slots 0..slot of the
row's cache for all the group's heads, and `_combine_splits_kernel` merges the spans of rows long
enough to be split (flash-decoding; how a row is split depends on its length only).
A position is computed by the same kernels whichever way it comes (alone, in a batch, in a prefill
chunk of any size or in a decode step), so its output and its cached k, v are the same bits, and
reused KV reproduces a recomputation exactly (glm/prefix_cache.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

KEY_BLOCK = 32  # cached keys per iteration of the online softmax
# Flash-decoding: a row attends over up to SPLIT_KEYS keys in one program per KV group; a longer one
# over up to MAX_SPLITS programs (equal spans), whose partials one more kernel combines.
SPLIT_KEYS = 2048
MAX_SPLITS = 8  # a power of two
ROWS_PER_LAUNCH = 64  # rows per attend launch: bounds the partials' scratch for long prefill chunks


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
def _cache_base(cache_offset_ptr, cache_slots_ptr, row, layer, group, GROUPS: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Element offset of (layer, group, slot 0) in the row's cache."""
    slots = tl.load(cache_slots_ptr + row).to(tl.int64)
    return tl.load(cache_offset_ptr + row).to(tl.int64) + ((layer * GROUPS + group) * slots) * HEAD_DIM


@triton.jit
def _store_rows_kernel(
        q_ptr, k_ptr, v_ptr, q_out_ptr, pool_k_ptr, pool_v_ptr, cache_offset_ptr, cache_slots_ptr, slot_ptr,
        cos_ptr, sin_ptr, layer,
        q_stride_r, q_stride_h, k_stride_r, k_stride_g, v_stride_r, v_stride_g, cos_stride_r,
        GROUPS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr):
    """Program (row, query head): the rotated q, rounded to the cache dtype as attention reads it; the
    group's first head also writes the rotated k and the v at the row's slot."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    d = tl.arange(0, HEAD_DIM)
    ROT: tl.constexpr = HEAD_DIM // 2
    dtype = pool_k_ptr.dtype.element_ty
    cos_r, sin_r = cos_ptr + row * cos_stride_r, sin_ptr + row * cos_stride_r
    q = _rotate(q_ptr + row * q_stride_r + head * q_stride_h, d, cos_r, sin_r, ROT, ROTARY)
    tl.store(q_out_ptr + (row * GROUPS * HEADS_PER_GROUP + head) * HEAD_DIM + d, q.to(dtype))
    if head % HEADS_PER_GROUP == 0:
        base = _cache_base(cache_offset_ptr, cache_slots_ptr, row, layer, group, GROUPS, HEAD_DIM)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        k = _rotate(k_ptr + row * k_stride_r + group * k_stride_g, d, cos_r, sin_r, ROT, ROTARY)
        tl.store(pool_k_ptr + base + slot * HEAD_DIM + d, k.to(dtype))
        tl.store(pool_v_ptr + base + slot * HEAD_DIM + d, tl.load(v_ptr + row * v_stride_r + group * v_stride_g + d))


@triton.jit
def _split_of(end, SPLIT_KEYS: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(programs, keys per program) over a row's `end` keys: one program up to SPLIT_KEYS keys, then
    up to MAX_SPLITS equal spans of whole key blocks. A function of the row's own length only, so a
    position is split the same way in a decode step, a prefill chunk or a batch of any size."""
    splits = tl.minimum(tl.cdiv(end, SPLIT_KEYS), MAX_SPLITS)
    return splits, tl.cdiv(tl.cdiv(end, splits), BLOCK_N) * BLOCK_N


@triton.jit
def _scores(q, k, HEADS_PER_GROUP: tl.constexpr):
    """q [H, D] . k [N, D] -> [H, N] in fp32 (tl.dot needs 16 rows: GQA groups of 16 heads)."""
    if HEADS_PER_GROUP >= 16:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
    return s


@triton.jit
def _weighted_values(p, v, HEADS_PER_GROUP: tl.constexpr):
    """p [H, N] @ v [N, D] -> [H, D] in fp32."""
    if HEADS_PER_GROUP >= 16:
        out = tl.dot(p, v, input_precision="ieee")
    else:
        out = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return out


@triton.jit
def _attend_rows_kernel(
        q_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, pool_k_ptr, pool_v_ptr, cache_offset_ptr,
        cache_slots_ptr, slot_ptr, layer, scale,
        GROUPS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT_KEYS: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """Program (row, KV group, split): online softmax(q k^T * scale) v of the group's heads over its
    span of slots 0..slot of the row's cache, so each key and value is read once for all the heads
    that share it. A row of one span writes its output; a split row writes per-span partials
    (unnormalized sum, max, denominator) for _combine_splits_kernel."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    end = tl.load(slot_ptr + row).to(tl.int64) + 1
    splits, span = _split_of(end, SPLIT_KEYS, MAX_SPLITS, BLOCK_N)
    if split < splits:
        start = split * span
        stop = tl.minimum(start + span, end)
        h = tl.arange(0, HEADS_PER_GROUP)
        d = tl.arange(0, HEAD_DIM)
        heads = (row * GROUPS + group) * HEADS_PER_GROUP + h  # [H] rows of q / out
        q = tl.load(q_ptr + heads[:, None] * HEAD_DIM + d[None, :]).to(tl.float32)
        # A cache starts at a multiple of HEAD_DIM elements: with the hint, k and v rows are
        # fetched with vector loads (unknown alignment gives one 2-byte load per element).
        base = tl.multiple_of(_cache_base(cache_offset_ptr, cache_slots_ptr, row, layer, group, GROUPS, HEAD_DIM),
                              HEAD_DIM)
        m = tl.full((HEADS_PER_GROUP,), float("-inf"), tl.float32)
        denom = tl.zeros((HEADS_PER_GROUP,), tl.float32)
        acc = tl.zeros((HEADS_PER_GROUP, HEAD_DIM), tl.float32)
        n = tl.arange(0, BLOCK_N)
        for s0 in range(start, stop, BLOCK_N):
            keys = s0 + n
            valid = keys < stop
            offs = tl.max_contiguous(tl.multiple_of(base + keys[:, None] * HEAD_DIM + d[None, :], [HEAD_DIM, HEAD_DIM]),
                                     [1, HEAD_DIM])
            k = tl.load(pool_k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            scores = tl.where(valid[None, :], _scores(q, k, HEADS_PER_GROUP) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            v = tl.load(pool_v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + _weighted_values(p, v, HEADS_PER_GROUP)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        if splits == 1:
            tl.store(out_ptr + heads[:, None] * HEAD_DIM + d[None, :],
                     (acc / denom[:, None]).to(out_ptr.dtype.element_ty))
        else:
            part = heads * MAX_SPLITS + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)
            tl.store(part_max_ptr + part, m)
            tl.store(part_sum_ptr + part, denom)


@triton.jit
def _combine_splits_kernel(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, slot_ptr, HEADS: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_KEYS: tl.constexpr,
                           MAX_SPLITS: tl.constexpr):
    """Program (row, head) of a split row: its spans' partials rescaled to the common max and
    summed in span order (a fixed order: the row's bits do not depend on its batch)."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    end = tl.load(slot_ptr + row).to(tl.int64) + 1
    splits, _ = _split_of(end, SPLIT_KEYS, MAX_SPLITS, BLOCK_N)
    if splits > 1:
        s = tl.arange(0, MAX_SPLITS)
        ok = s < splits
        part = (row * HEADS + head) * MAX_SPLITS + s
        m = tl.load(part_max_ptr + part, mask=ok, other=float("-inf"))
        weight = tl.where(ok, tl.exp(m - tl.max(m, axis=0)), 0.0)
        denom = tl.sum(tl.load(part_sum_ptr + part, mask=ok, other=0.0) * weight, axis=0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / denom
        tl.store(out_ptr + (row * HEADS + head) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor,
                  pool_v: torch.Tensor, cache_offsets: torch.Tensor, cache_slots: torch.Tensor,
                  slots: torch.Tensor, layer: int, scale: float, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of R query rows, each at its own cache slot; returns [R, heads, head_dim] in the pool's dtype.

    q [R, heads, hd], k, v [R, groups, hd] (any views with unit stride in hd); pool_k, pool_v: the flat
    pool tensors; per row (int64 [R] on the device): cache_offsets, the element offset of its cache in
    the pool, cache_slots, the cache's slot dimension, slots, the row's slot. Every row's k, v are
    written first, so a row sees the rows at earlier slots of its cache in the same call.
    cos, sin [R, hd/4] fp32 apply ChatGLM2's rotary to q and k; None when they are already rotated
    (ChatGLM-6B).
    """
    R, heads, hd = q.shape
    groups = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("row_attention: q, k, v need unit stride in head_dim")
    rotary = cos is not None
    if not rotary:
        cos = sin = torch.empty(R, 1, device=q.device, dtype=torch.float32)
    q_rot = torch.empty(R, heads, hd, device=q.device, dtype=pool_k.dtype)
    _store_rows_kernel[(R, heads)](
        q, k, v, q_rot, pool_k, pool_v, cache_offsets, cache_slots, slots, cos, sin, layer,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        GROUPS=groups, HEADS_PER_GROUP=heads // groups, HEAD_DIM=hd, ROTARY=rotary)
    out = torch.empty_like(q_rot)
    rows = min(R, ROWS_PER_LAUNCH)
    part_acc = torch.empty(rows, heads, MAX_SPLITS, hd, device=q.device, dtype=torch.float32)
    part_max = torch.empty(rows, heads, MAX_SPLITS, device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    shape = dict(HEAD_DIM=hd, BLOCK_N=KEY_BLOCK, SPLIT_KEYS=SPLIT_KEYS, MAX_SPLITS=MAX_SPLITS)
    for r0 in range(0, R, rows):
        n = min(rows, R - r0)
        _attend_rows_kernel[(n, groups, MAX_SPLITS)](
            q_rot[r0:], out[r0:], part_acc, part_max, part_sum, pool_k, pool_v, cache_offsets[r0:],
            cache_slots[r0:], slots[r0:], layer, scale, GROUPS=groups, HEADS_PER_GROUP=heads // groups, **shape)
        _combine_splits_kernel[(n, heads)](out[r0:], part_acc, part_max, part_sum, slots[r0:], HEADS=heads, **shape)
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


def _spec(kernel, shape_class: str, types: dict[str, str], constexprs: dict):
    from .compile import KernelSpec
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    return KernelSpec(
        kernel=kernel, shape_class=shape_class, signature=signature, constexprs=constexprs,
        # every pointer comes from a torch allocation; strides are multiples of head_dim = 128
        aligned=tuple(name for name, t in types.items() if t.startswith("*") or "stride" in name),
        no_spills=True)


def _specs(model: str, heads: int, groups: int, head_dim: int, rotary: bool):
    rows = {"cache_offset_ptr": "*i64", "cache_slots_ptr": "*i64", "slot_ptr": "*i64", "layer": "i32"}
    shape = {"GROUPS": groups, "HEADS_PER_GROUP": heads // groups, "HEAD_DIM": head_dim}
    store = {**{p: "*fp16" for p in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "pool_k_ptr", "pool_v_ptr")},
             **rows, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
             **{s: "i32" for s in ("q_stride_r", "q_stride_h", "k_stride_r", "k_stride_g", "v_stride_r",
                                   "v_stride_g", "cos_stride_r")}}
    parts = {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}
    attend = {**{p: "*fp16" for p in ("q_ptr", "out_ptr", "pool_k_ptr", "pool_v_ptr")}, **parts, **rows,
              "scale": "fp32"}
    combine = {"out_ptr": "*fp16", **parts, "slot_ptr": "*i64"}
    split = {"HEAD_DIM": head_dim, "BLOCK_N": KEY_BLOCK, "SPLIT_KEYS": SPLIT_KEYS, "MAX_SPLITS": MAX_SPLITS}
    return [_spec(_store_rows_kernel, f"store rows {model}", store, {**shape, "ROTARY": rotary}),
            _spec(_attend_rows_kernel, f"attend rows {model}", attend, {**shape, **split}),
            _spec(_combine_splits_kernel, f"combine splits {model}", combine, {"HEADS": heads, **split})]


COMPILE_SPECS = [
    *_specs("ChatGLM2-6B (32 heads, 2 groups, hd 128, rotary)", 32, 2, 128, True),
    *_specs("ChatGLM-6B (32 heads, hd 128, rotated outside)", 32, 32, 128, False),
]
