"""The Triton backend's attention and row-wise kernels (glm/gpu/attention.py, pointwise.py) and its
setup self-test, under TRITON_INTERPRET=1 on CPU tensors, against float64 references."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from glm.config import ChatGLMConfig
from glm.gpu import attention, pointwise, selftest
from glm.gpu.ops import row_plan
from glm.kvpool import KVPool
from glm.kvpool import KVCache
from glm.model import rotary_angles
from glm.ops import apply_rotary


def make_cfg(heads=4, groups=2, head_dim=16, layers=2):
    return ChatGLMConfig(num_layers=layers, hidden_size=heads * head_dim, num_heads=heads, kv_heads=groups,
                         head_dim=head_dim, ffn_hidden_size=32, vocab_size=8, seq_length=128, max_context=128)


def random_pool(cfg, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = KVPool(cfg, tokens, "cpu", torch.float16)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g).half())
    pool.v.copy_(torch.randn(pool.v.shape, generator=g).half())
    return pool


def reference(cfg, cache, layer, slot, q, k, v, cos, sin, rotary=True):
    """float64 attention of one sequence's new token over cache slots 0..slot-1 plus itself."""
    if rotary:
        q = apply_rotary(q[None, None].float(), cos, sin)[0, 0].half()
        k = apply_rotary(k[None, None].float(), cos, sin)[0, 0].half()
    keys = torch.cat((cache.k[layer, :, :slot], k[:, None]), dim=1).double()
    values = torch.cat((cache.v[layer, :, :slot], v[:, None]), dim=1).double()
    rep = cfg.num_heads // cfg.kv_heads
    kh, vh = keys.repeat_interleave(rep, 0), values.repeat_interleave(rep, 0)
    p = (q.double()[:, None] @ kh.transpose(1, 2) * cfg.head_dim ** -0.5).softmax(-1)
    return (p @ vh)[:, 0], k


def run_decode(cfg, pool, caches, slots, layer, seed=1, rotary=True):
    g = torch.Generator().manual_seed(seed)
    B = len(caches)
    q = torch.randn(B, cfg.num_heads, cfg.head_dim, generator=g).half()
    k = torch.randn(B, cfg.kv_heads, cfg.head_dim, generator=g).half()
    v = torch.randn(B, cfg.kv_heads, cfg.head_dim, generator=g).half()
    cos, sin = rotary_angles(cfg, torch.tensor(slots)[:, None])
    wants = [reference(cfg, c, layer, s, q[b], k[b], v[b], cos[b:b + 1], sin[b:b + 1], rotary)
             for b, (c, s) in enumerate(zip(caches, slots))]
    rot = (cos[:, 0], sin[:, 0]) if rotary else ()
    got = attention.row_attention(q, k, v, *row_plan(caches, slots, 1, "cpu"), layer, cfg.head_dim ** -0.5, *rot)
    return got, wants, v


@pytest.mark.parametrize("heads,groups,head_dim", [(4, 2, 16), (8, 8, 4), (2, 1, 32), (32, 2, 16)])
@pytest.mark.parametrize("rotary", [True, False])
def test_decode_rows_match_float64_and_write_the_cache(heads, groups, head_dim, rotary):
    """(32, 2, 16): ChatGLM2's groups of 16 heads, whose scores are one tl.dot per key block."""
    cfg = make_cfg(heads, groups, head_dim)
    pool = random_pool(cfg, 90)
    # lengths 0 (only the new token), one block, and past two key blocks of the kernel
    caches = [pool.cache(0, 5), pool.cache(5, 40), pool.cache(45, 45)]
    slots = [0, 31, attention.KEY_BLOCK + 9]
    got, wants, v = run_decode(cfg, pool, caches, slots, layer=1, rotary=rotary)
    for b, (want, k_rot) in enumerate(wants):
        assert (got[b].double() - want).abs().max() < 2e-3, b
        assert torch.equal(caches[b].k[1, :, slots[b]], k_rot)
        assert torch.equal(caches[b].v[1, :, slots[b]], v[b])
        assert caches[b].k[0].abs().sum() > 0  # layer 0 untouched (random, not overwritten)


@pytest.mark.parametrize("split_keys", [None, 8])
def test_decode_rows_are_batch_invariant(split_keys, monkeypatch):
    """A sequence's output is bitwise the same alone and beside others, in any order (split over
    programs or not)."""
    if split_keys:
        monkeypatch.setattr(attention, "SPLIT_KEYS", split_keys)
    cfg = make_cfg()
    outs = {}
    for order in ([0], [0, 1, 2], [2, 0, 1]):
        pool = random_pool(cfg, 100, seed=3)
        extents = {0: (0, 40), 1: (40, 20), 2: (60, 40)}
        slots_of = {0: 37, 1: 3, 2: 12}
        caches = [pool.cache(*extents[i]) for i in order]
        g = torch.Generator().manual_seed(9)
        qs = {i: torch.randn(cfg.num_heads, cfg.head_dim, generator=g).half() for i in range(3)}
        ks = {i: torch.randn(cfg.kv_heads, cfg.head_dim, generator=g).half() for i in range(3)}
        slots = [slots_of[i] for i in order]
        cos, sin = rotary_angles(cfg, torch.tensor(slots)[:, None])
        q = torch.stack([qs[i] for i in order])
        k = torch.stack([ks[i] for i in order])
        y = attention.row_attention(q, k, k, *row_plan(caches, slots, 1, "cpu"), 0, 0.25, cos[:, 0], sin[:, 0])
        for row, i in enumerate(order):
            outs.setdefault(i, []).append(y[row])
    for i, ys in outs.items():
        assert all(torch.equal(ys[0], y) for y in ys[1:]), i


@pytest.mark.parametrize("heads,split_keys,max_splits", [(4, None, None), (4, 16, 2), (32, 24, 8)])
def test_prefill_rows_are_causal_and_the_same_bits_as_decode_steps(heads, split_keys, max_splits, monkeypatch):
    """A chunk of rows in one call: each row sees the earlier rows of the chunk (float64 causal
    reference), and its output and cached k, v are the bits that one decode step per position gives.
    With split_keys, rows past it are split over programs (flash-decoding) up to max_splits: a
    position's split depends only on its length, so prefill and decode still agree bitwise."""
    if split_keys:
        monkeypatch.setattr(attention, "SPLIT_KEYS", split_keys)
        monkeypatch.setattr(attention, "MAX_SPLITS", max_splits)
    cfg = make_cfg(heads=heads)
    g = torch.Generator().manual_seed(5)
    T, first, layer = 45, 7, 1
    q = torch.randn(T, cfg.num_heads, cfg.head_dim, generator=g).half()
    k = torch.randn(T, cfg.kv_heads, cfg.head_dim, generator=g).half()
    v = torch.randn(T, cfg.kv_heads, cfg.head_dim, generator=g).half()
    cos, sin = rotary_angles(cfg, torch.arange(first, first + T)[None])
    results = []
    for chunks in ([T], [1] * T, [13, 1, 31]):
        pool = random_pool(cfg, 60, seed=4)
        cache = pool.cache(2, 58)
        out, t = [], 0
        for n in chunks:
            rows = slice(t, t + n)
            out.append(attention.row_attention(q[rows], k[rows], v[rows], *row_plan([cache], [first + t], n, "cpu"),
                                               layer, cfg.head_dim ** -0.5, cos[0, rows], sin[0, rows]))
            t += n
        results.append((torch.cat(out), cache.k.clone(), cache.v.clone()))
    (ref_out, ref_k, ref_v), *others = results
    for out, k_cache, v_cache in others:
        assert torch.equal(out, ref_out) and torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    k_rot = apply_rotary(k[None].float(), cos, sin)[0].half()
    q_rot = apply_rotary(q[None].float(), cos, sin)[0].half()
    assert torch.equal(ref_k[layer, :, first:first + T], k_rot.transpose(0, 1))
    keys, values = ref_k[layer, :, :first + T].double(), ref_v[layer, :, :first + T].double()
    rep = cfg.num_heads // cfg.kv_heads
    scores = q_rot.double().transpose(0, 1) @ keys.repeat_interleave(rep, 0).transpose(1, 2) * cfg.head_dim ** -0.5
    allowed = torch.ones(T, first + T, dtype=torch.bool).tril(diagonal=first)
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values.repeat_interleave(rep, 0)
    assert (ref_out.double() - want.transpose(0, 1)).abs().max() < 2e-3


def test_pool_views_and_row_plan():
    cfg = make_cfg()
    pool = random_pool(cfg, 50)
    caches = [pool.cache(10, 20), pool.cache(0, 10)]
    k, v, offsets = attention.pool_views(caches)
    assert k.data_ptr() == pool.k.data_ptr() and v.data_ptr() == pool.v.data_ptr()
    assert k.numel() == pool.k.numel() and offsets == [pool.element_offset(c) for c in caches]
    plan = row_plan(caches, [4, 7], 1, "cpu")
    assert [t.tolist() for t in plan[2:]] == [offsets, [20, 10], [4, 7]]
    assert [t.tolist() for t in row_plan(caches, [5, 8], 1, "cpu")[2:]] == [offsets, [20, 10], [5, 8]]
    # a prefill chunk: a row per position, each with its sequence's cache
    rows = row_plan(caches, [4, 1], 3, "cpu")[2:]
    assert [t.tolist() for t in rows] == [[offsets[0]] * 3 + [offsets[1]] * 3, [20] * 3 + [10] * 3, [4, 5, 6, 1, 2, 3]]
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        row_plan(caches, [18, 0], 3, "cpu")
    alone = KVCache(cfg, 8, "cpu", torch.float16)  # its own pool
    assert attention.pool_views([alone])[2] == [0]
    assert attention.pool_views([caches[0], alone]) is None
    assert row_plan([caches[0], alone], [1, 1], 1, "cpu") is None


@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 96), (2, 4096)])
def test_rms_norm(rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, dim, generator=g) * 3).half()
    w = torch.rand(dim, generator=g).half()
    want = w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    got = pointwise.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.float16 and (got.double() - want).abs().max() <= 1e-3 * want.abs().max()
    # a row does not depend on the others
    assert torch.equal(pointwise.rms_norm(x[-1:], w, 1e-5)[0], got[-1])


@pytest.mark.parametrize("rows,ffn", [(1, 48), (3, 160), (2, 1500)])
def test_swiglu(rows, ffn):
    h = torch.randn(rows, 1, 2 * ffn, generator=torch.Generator().manual_seed(ffn)).half()
    gate, up = h.double().chunk(2, dim=-1)
    got = pointwise.swiglu(h)
    assert got.shape == (rows, 1, ffn) and got.dtype == torch.float16
    assert (got.double() - F.silu(gate) * up).abs().max() <= 2e-3 * (F.silu(gate) * up).abs().max()


@pytest.mark.parametrize("start", [0, 3])
def test_prefill_attention_sdpa_in_fp16_on_cpu(start):
    g = torch.Generator().manual_seed(start)
    T, S = 5, 5 + start
    q = torch.randn(4, T, 16, generator=g).half()
    k, v = torch.randn(2, S, 16, generator=g).half(), torch.randn(2, S, 16, generator=g).half()
    got = attention.prefill_attention(q, k, v, start)
    kh, vh = k.double().repeat_interleave(2, 0), v.double().repeat_interleave(2, 0)
    scores = q.double() @ kh.transpose(1, 2) / 4
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=start)
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh
    assert got.dtype == torch.float16 and (got.double() - want).abs().max() < 2e-3


def test_selftest_passes_here():
    assert selftest.run("cpu") is None


def test_selftest_failure_is_one_log_line(monkeypatch, caplog):
    def broken(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")
    monkeypatch.setitem(selftest.CHECKS, "swiglu", broken)
    assert selftest.run("cpu") == "swiglu: RuntimeError: CUDA error: no kernel image is available for execution on the device"
    monkeypatch.setitem(selftest.CHECKS, "swiglu", lambda device: float("nan"))  # wrong numbers
    assert selftest.run("cpu") == "swiglu: relative error nan > 0.02"
    selftest.passes.cache_clear()
    with caplog.at_level(logging.WARNING, logger="glm"):
        assert selftest.passes(torch.device("cpu")) is False
    selftest.passes.cache_clear()
    lines = [r for r in caplog.records if r.name == "glm"]
    assert len(lines) == 1 and "torch backend" in lines[0].getMessage()
