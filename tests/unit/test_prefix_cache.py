"""glm.prefix_cache bookkeeping (index, LRU, coverage, extents) and KVPool's shrink / copy_prefix."""
from __future__ import annotations

import pytest
import torch

from glm.config import ChatGLMConfig
from glm.kvpool import ExtentAllocator, KVPool
from glm import prefix_cache
from glm.prefix_cache import BLOCK, SHARED_SCOPE, PrefixCache, block_hashes, common_prefix, key_scope


def toks(n: int, base: int = 100) -> list[int]:
    return list(range(base, base + n))


ALICE, BOB = key_scope("alice's key"), key_scope("bob's key")


def put(cache: PrefixCache, tokens: list[int], scope: int | None = ALICE):
    """Allocate an extent for tokens and hand it to the cache, as the engine does."""
    start = cache.allocator.allocate(len(tokens))
    assert start is not None
    return cache.insert(tokens, start, scope), start


@pytest.fixture
def cache():
    return PrefixCache(ExtentAllocator(1000), max_tokens=500)


def test_block_hashes_are_chained_over_full_blocks_only():
    a = toks(3 * BLOCK + 5)
    assert len(block_hashes(a)) == 3
    b = toks(BLOCK, base=7) + a[BLOCK:]
    # Same second block, different first block: the second prefix hash differs too.
    assert block_hashes(a)[1] != block_hashes(b)[1]
    assert block_hashes(a[:2 * BLOCK]) == block_hashes(a)[:2]


def test_common_prefix():
    assert common_prefix((1, 2, 3), (1, 2, 4), 10) == 2
    assert common_prefix((1, 2, 3), (1, 2, 3, 4), 10) == 3
    assert common_prefix((1, 2, 3), (1, 2, 3), 2) == 2
    assert common_prefix((5,), (1,), 10) == 0


def test_lookup_is_exact_to_the_token_inside_a_block(cache):
    stored = toks(3 * BLOCK + 7)
    entry, _ = put(cache, stored)
    # Diverges inside the third block: matches up to the divergence, not down to the block boundary.
    prompt = stored[:2 * BLOCK + 5] + [9999] + stored[2 * BLOCK + 6:]
    assert cache.lookup(prompt, ALICE) == (entry, 2 * BLOCK + 5)
    # Longer prompt that extends the entry: the whole entry.
    assert cache.lookup(stored + [1, 2, 3], ALICE) == (entry, len(stored))


@pytest.mark.parametrize("n", [BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 1])
def test_block_boundaries(cache, n):
    stored = toks(2 * BLOCK + 1)
    entry, _ = put(cache, stored)
    prompt = stored[:n] + [7777, 7778]
    assert cache.lookup(prompt, ALICE) == (entry, n)


def test_strict_prefix_keeps_the_last_prompt_token_to_compute(cache):
    stored = toks(4 * BLOCK)
    entry, _ = put(cache, stored)
    assert cache.lookup(stored[:2 * BLOCK], ALICE) == (entry, 2 * BLOCK - 1)
    assert cache.lookup(stored, ALICE) == (entry, 4 * BLOCK - 1)


def test_no_match_under_one_block(cache):
    stored = toks(3 * BLOCK)
    put(cache, stored)
    assert cache.lookup(stored[:BLOCK - 1] + [1, 2, 3], ALICE) == (None, 0)
    assert cache.lookup([1] + stored, ALICE) == (None, 0)
    assert cache.lookup(stored[:BLOCK], ALICE) == (None, 0)  # a 16-token prompt may reuse 15: below one block


def test_longest_of_several_entries_wins(cache):
    a, b = toks(2 * BLOCK), toks(2 * BLOCK)
    b[BLOCK + 3] = 1
    ea, _ = put(cache, a + [1, 2])
    eb, _ = put(cache, b + [3, 4])
    assert cache.lookup(a + [9] * 5, ALICE) == (ea, 2 * BLOCK)
    assert cache.lookup(b + [9] * 5, ALICE) == (eb, 2 * BLOCK)
    assert cache.lookup(a[:BLOCK + 2] + [9] * 40, ALICE)[1] == BLOCK + 2


def test_lru_eviction_under_the_cap_frees_extents():
    alloc = ExtentAllocator(1000)
    cache = PrefixCache(alloc, max_tokens=100)
    e1, s1 = put(cache, toks(40, base=0))
    e2, _ = put(cache, toks(40, base=1000))
    cache.lookup(toks(40, base=0) + [1], ALICE)          # e1 becomes the most recently used
    e3, _ = put(cache, toks(40, base=2000))        # 120 > 100: e2 (least recently used) goes
    assert cache.entries == [e1, e3]
    assert e2 not in cache and cache.tokens == 80
    assert alloc.free_tokens == 1000 - 80
    assert cache.lookup(toks(40, base=1000) + [1], ALICE) == (None, 0)


def test_evict_lru_and_clear_return_everything():
    alloc = ExtentAllocator(300)
    cache = PrefixCache(alloc, max_tokens=300)
    for base in (0, 1000, 2000):
        put(cache, toks(50, base=base))
    assert alloc.free_tokens == 150
    assert cache.evict_lru() and len(cache) == 2 and alloc.free_tokens == 200
    cache.clear()
    assert len(cache) == 0 and cache.tokens == 0 and alloc.free_tokens == 300 and alloc.largest_free == 300
    assert not cache.evict_lru()


def test_a_longer_entry_replaces_the_one_it_covers(cache):
    turn1 = toks(3 * BLOCK)
    e1, _ = put(cache, turn1)
    e2, _ = put(cache, turn1 + toks(20, base=5000))
    assert e1 not in cache and cache.entries == [e2]
    assert cache.tokens == e2.size and cache.allocator.free_tokens == 1000 - e2.size


def test_a_covered_insert_is_refused_and_its_extent_freed(cache):
    long = toks(5 * BLOCK)
    e1, _ = put(cache, long)
    e2, _ = put(cache, long[:3 * BLOCK])
    assert e2 is None and cache.entries == [e1]
    assert cache.allocator.free_tokens == 1000 - e1.size


def test_refused_inserts_free_their_extent():
    alloc = ExtentAllocator(1000)
    off = PrefixCache(alloc, max_tokens=0)
    assert put(off, toks(50))[0] is None and alloc.free_tokens == 1000
    small = PrefixCache(alloc, max_tokens=40)
    assert put(small, toks(41))[0] is None and alloc.free_tokens == 1000   # longer than the cache
    assert put(small, toks(BLOCK - 1))[0] is None and alloc.free_tokens == 1000  # never findable


def test_negative_size_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        PrefixCache(ExtentAllocator(10), max_tokens=-1)


# ---- scopes: a request reuses only what its own scope left
def test_another_scope_finds_nothing_and_its_entries_are_never_candidates(cache):
    stored = toks(4 * BLOCK)
    entry, _ = put(cache, stored, ALICE)
    assert cache.lookup(stored + [1], ALICE) == (entry, len(stored))
    assert cache.lookup(stored + [1], BOB) == (None, 0)
    assert cache.lookup(stored + [1], SHARED_SCOPE) == (None, 0)
    assert cache.lookup(stored + [1], None) == (None, 0)
    # The salt starts the chain: no block hash of one scope is one of another's.
    assert not set(block_hashes(stored, BLOCK, ALICE)) & set(block_hashes(stored, BLOCK, BOB))


def test_the_scope_is_checked_even_when_the_hashes_collide(cache, monkeypatch):
    # Every chain the same whatever its salt: Bob's probe then lands on Alice's index entries.
    monkeypatch.setattr(prefix_cache, "hash", lambda t: hash(t[1:]), raising=False)
    stored = toks(3 * BLOCK)
    put(cache, stored, ALICE)
    assert block_hashes(stored, BLOCK, ALICE) == block_hashes(stored, BLOCK, BOB)
    assert cache.lookup(stored + [1], BOB) == (None, 0)
    assert cache.lookup(stored + [1], ALICE)[1] == len(stored)


def test_each_scope_keeps_its_own_copy_of_the_same_tokens(cache):
    stored = toks(3 * BLOCK)
    ea, _ = put(cache, stored, ALICE)
    eb, _ = put(cache, stored, BOB)          # not "covered" by Alice's entry: Bob cannot use that one
    assert ea is not None and eb is not None and len(cache) == 2
    longer = put(cache, stored + toks(BLOCK, base=900), BOB)[0]
    assert cache.entries == [ea, longer]     # Bob's longer entry replaces Bob's, never Alice's
    assert cache.lookup(stored + [1], ALICE) == (ea, len(stored))


def test_a_request_without_a_scope_keeps_nothing(cache):
    entry, start = put(cache, toks(3 * BLOCK), None)
    assert entry is None and len(cache) == 0 and cache.allocator.free_tokens == 1000


def test_scopes_are_keyed_hashes_of_the_key():
    assert key_scope("k") == key_scope("k") != key_scope("k2")
    assert key_scope("shared") != SHARED_SCOPE  # a client's key cannot name the shared scope
    assert 0 <= key_scope("k") < 2**64
    with pytest.raises(ValueError):
        key_scope("")


# ---- KVPool: the tensor side of a cache entry
def small_cfg() -> ChatGLMConfig:
    return ChatGLMConfig(num_layers=3, hidden_size=64, num_heads=4, kv_heads=2, head_dim=16,
                         ffn_hidden_size=32, vocab_size=100, seq_length=64, max_context=64)


def test_shrink_keeps_each_layers_first_tokens_in_the_short_layout():
    cfg = small_cfg()
    pool = KVPool(cfg, 64, "cpu", torch.float32)
    pool.k.copy_(torch.arange(pool.k.numel(), dtype=torch.float32))
    pool.v.copy_(-torch.arange(pool.v.numel(), dtype=torch.float32))
    for capacity, n in ((20, 7), (20, 15), (9, 9), (10, 1)):
        start = 3
        before = pool.cache(start, capacity)
        want_k = before.k[:, :, :n].clone()
        want_v = before.v[:, :, :n].clone()
        pool.shrink(start, capacity, n)
        after = pool.cache(start, n)
        assert torch.equal(after.k, want_k) and torch.equal(after.v, want_v)


def test_copy_rows_copies_n_positions_of_every_layer():
    cfg = small_cfg()
    pool = KVPool(cfg, 64, "cpu", torch.float32)
    pool.k.normal_()
    pool.v.normal_()
    src, dst = pool.cache(0, 10), pool.cache(10, 30)
    untouched = dst.k[:, :, 6:].clone()
    pool.copy_rows(0, 10, 10, 30, 6)
    assert torch.equal(dst.k[:, :, :6], src.k[:, :, :6]) and torch.equal(dst.v[:, :, :6], src.v[:, :, :6])
    assert torch.equal(dst.k[:, :, 6:], untouched)
    with pytest.raises(ValueError):
        pool.copy_rows(0, 10, 10, 30, 11)
