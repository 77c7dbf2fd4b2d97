"""The engine's KV pool: extent bookkeeping and cache views into one allocation."""
import random

import pytest
import torch

from glm.config import ChatGLMConfig
from glm.kvpool import ExtentAllocator, KVPool

CFG = ChatGLMConfig(num_layers=3, hidden_size=32, num_heads=4, kv_heads=2, head_dim=8, ffn_hidden_size=64,
                    vocab_size=100, max_context=64)


def test_first_fit_and_coalescing():
    a = ExtentAllocator(100)
    assert [a.allocate(30), a.allocate(30), a.allocate(30)] == [0, 30, 60]
    assert a.allocate(11) is None and a.free_tokens == 10
    a.free(30, 30)
    assert a.largest_free == 30 and a.allocate(31) is None
    a.free(0, 30)
    assert a.largest_free == 60          # [0, 60) merged
    a.free(60, 30)
    assert a._free == [(0, 100)]        # everything merged back into one range
    with pytest.raises(ValueError):
        a.free(10, 5)                    # never allocated


def test_random_alloc_free_keeps_ranges_disjoint():
    rng = random.Random(0)
    a, held = ExtentAllocator(1000), []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            a.free(*held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 120)
            start = a.allocate(n)
            if start is not None:
                held.append((start, n))
        cells = sorted(c for s, n in held for c in range(s, s + n))
        assert len(cells) == len(set(cells)) and all(0 <= c < 1000 for c in cells)
        assert a.free_tokens == 1000 - len(cells)
    for extent in held:
        a.free(*extent)
    assert a._free == [(0, 1000)]


def test_caches_are_disjoint_contiguous_views():
    pool = KVPool(CFG, 50, "cpu", torch.float32)
    c1, c2 = pool.cache(0, 20), pool.cache(20, 30)
    assert c1.k.shape == (3, 2, 20, 8) and c1.k.is_contiguous() and c2.v.is_contiguous()
    assert pool.element_offset(c2) == 20 * 3 * 2 * 8
    c1.k.fill_(1.0)
    c2.k.fill_(2.0)
    assert pool.k[: 20 * 48].eq(1).all() and pool.k[20 * 48:].eq(2).all()
    k, v = c2.update(1, 5, torch.ones(2, 3, 8) * 7, torch.ones(2, 3, 8) * 9)
    assert k.shape == (2, 8, 8) and c2.v[1, :, 5:8].eq(9).all() and c1.k.eq(1).all()
    with pytest.raises(ValueError):
        pool.cache(40, 11)
