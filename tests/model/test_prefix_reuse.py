"""Reusing cached KV is exact: row invariance of the forward pass, and the engine's prefix cache
producing the same tokens as a recomputation (greedy and seeded sampling, alone and in a batch)."""
from __future__ import annotations

import pytest
import torch

import glm
from glm.cpu import kernels
from glm.engine import Engine, EngineConfig
from glm.sampling import SamplingParams
from glm.kvpool import KVCache
from glm.prefix_cache import BLOCK

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="fused CPU kernels unavailable (GLM_NO_KERNELS or no compiler)")


def ids(n: int, seed: int) -> list[int]:
    """n ordinary token ids (the tiny tokenizer's pieces, no special ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (n,), generator=g).tolist()


# ---- the forward pass: a position's rows are the same in any chunk and in a decode step

def forward_in_pieces(model, cfg, tokens: list[int], cuts: list[int]):
    """Hidden states of tokens [N, hidden] and the KV cache, computed in pieces ending at cuts."""
    cache = KVCache(cfg, len(tokens), "cpu", model.dtype)
    out, start = [], 0
    for end in cuts + [len(tokens)]:
        out.append(model.hidden_states(torch.tensor([tokens[start:end]]), [start], [cache])[0])
        start = end
    return torch.cat(out), cache


@needs_kernels
@pytest.mark.parametrize("checkpoint,dtype,int8act", [
    ("tiny_dir", torch.float32, False), ("tiny_dir", torch.bfloat16, False), ("tiny_dir", torch.float32, True),
    ("tiny8_dir", torch.bfloat16, False), ("tiny_fp16_dir", torch.float32, False)])
def test_rows_are_the_same_in_any_chunk_and_in_decode(request, checkpoint, dtype, int8act):
    m = glm.load(request.getfixturevalue(checkpoint), dtype=dtype, int8_activations=int8act)
    assert m.model.exact_kv_reuse
    tokens = ids(70, seed=1)
    splits = {
        "one pass": [],
        "chunks 13/29/64": [13, 29, 64],
        "chunk of 1 then 69": [1],
        "prefill 5 then decode": list(range(5, 70)),
    }
    with torch.inference_mode():
        results = {name: forward_in_pieces(m.model, m.config, tokens, cuts) for name, cuts in splits.items()}
    ref_h, ref_cache = results.pop("one pass")
    for name, (h, cache) in results.items():
        assert torch.equal(h, ref_h), f"{name}: hidden states differ from one pass (max {(h - ref_h).abs().max()})"
        assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v), f"{name}: KV differs"


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "tiny8_dir", "tiny_fp16_dir"])
def test_triton_rows_are_the_same_in_any_chunk_and_in_decode(request, checkpoint):
    """The Triton backend (its kernels under the interpreter): the same bits in any chunk and in
    decode under ops.rows_exactly(), which sends prefill through the decode kernels; not without it
    (GEMM, SDPA). Fewer tokens than the CPU test: the interpreter runs a kernel program in milliseconds."""
    m = glm.load(request.getfixturevalue(checkpoint), backend="triton")
    assert m.model.exact_kv_reuse
    tokens = ids(24, seed=1)
    decode = list(range(4, 24))
    with torch.inference_mode():
        if checkpoint == "tiny_dir":
            ref_h, _ = forward_in_pieces(m.model, m.config, tokens, [])
            h, _ = forward_in_pieces(m.model, m.config, tokens, decode)
            assert not torch.equal(h, ref_h)
    with torch.inference_mode(), m.model.ops.rows_exactly():
        ref_h, ref_cache = forward_in_pieces(m.model, m.config, tokens, [])
        for name, cuts in {"chunks 7/16": [7, 16], "prefill 4 then decode": decode}.items():
            h, cache = forward_in_pieces(m.model, m.config, tokens, cuts)
            assert torch.equal(h, ref_h), f"{name}: hidden states differ from one pass (max {(h - ref_h).abs().max()})"
            assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v), f"{name}: KV differs"


@needs_kernels
def test_fp16_weights_under_bf16_activations_are_left_out(tiny_fp16_dir):
    m = glm.load(tiny_fp16_dir, dtype=torch.bfloat16)
    # Their dense GEMM past one chunk of rows rounds differently from the per-row kernel:
    with torch.inference_mode():
        (h, _), (ref, _) = (forward_in_pieces(m.model, m.config, ids(70, seed=1), cuts) for cuts in ([13], []))
    assert not torch.equal(h, ref)
    assert not m.model.exact_kv_reuse
    assert make_engine(m, 4096).prefix_cache.max_tokens == 0


@needs_kernels
def test_prefill_attention_kernel_matches_float64_causal_reference(mod):
    torch.manual_seed(0)
    layers, groups, heads, hd, C, first, T = 2, 2, 8, 32, 50, 7, 20
    k_cache = torch.randn(layers, groups, C, hd)
    v_cache = torch.randn(layers, groups, C, hd)
    q = torch.randn(T, heads, hd)
    out = kernels.prefill_attention(q, k_cache, v_cache, 1, first, hd ** -0.5)
    qd, kd, vd = q.double(), k_cache[1].double(), v_cache[1].double()
    for t in range(T):
        for h in range(heads):
            g = h // (heads // groups)
            s = (kd[g, :first + t + 1] @ qd[t, h]) * hd ** -0.5
            want = s.softmax(-1) @ vd[g, :first + t + 1]
            torch.testing.assert_close(out[t, h].double(), want, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_prefill_attention_rejects_rows_past_the_cache(mod):
    cache = torch.zeros(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="outside cache capacity"):
        kernels.prefill_attention(torch.zeros(4, 2, 16), cache, cache, 0, 6, 0.25)


# ---- the engine: the same tokens with and without the cache

def make_engine(model, prefix_cache_tokens: int, **kw) -> Engine:
    """An engine whose keyless requests share one cache scope (the reuse mechanics; scopes below)."""
    kw.setdefault("prefix_cache_scope", "shared")
    return Engine(model.model, model.tokenizer, model.config, model.device,
                  prefix_cache_tokens=prefix_cache_tokens, **kw)


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]):
    """Submit all requests at once, step until all finish; their sequences."""
    seqs = [engine.submit(p, params) for p, params in requests]
    while any(not s.done for s in seqs):
        engine.step()
    engine.step()  # the last finished ones are reaped (and cached)
    for s in seqs:
        assert s.finish_reason in ("length", "eos"), s.error
    return seqs


def outputs(seqs) -> list[list[int]]:
    return [s.tokens[len(s.prompt_ids):] for s in seqs]


GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
SEEDED = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = glm.load(tiny_dir)
    if not m.model.exact_kv_reuse:
        pytest.skip("this path cannot reuse KV exactly (no fused CPU kernels)")
    return m


def kv_of(engine: Engine, tokens: tuple[int, ...]):
    """The cached k, v rows of tokens (from an entry that starts with them)."""
    for e in engine.prefix_cache.entries:
        if e.tokens[:len(tokens)] == tokens:
            c = engine.pool.cache(e.start, e.size)
            return c.k[:, :, :len(tokens)], c.v[:, :, :len(tokens)]
    raise AssertionError(f"no cache entry holds these {len(tokens)} tokens")


def check_same(model, requests, cached_engine, expect_cached):
    """The requests on the cached engine give the tokens, and leave the KV bit for bit, that an
    engine without cached entries gives; returns their sequences."""
    got = run(cached_engine, requests)
    assert [s.cached_tokens for s in got] == expect_cached
    fresh = make_engine(model, 4096)
    want = run(fresh, requests)
    assert [s.cached_tokens for s in want] == [0] * len(requests)
    assert outputs(got) == outputs(want)
    for s in got:
        computed = tuple(s.tokens[:s.pos])
        (k, v), (k_ref, v_ref) = kv_of(cached_engine, computed), kv_of(fresh, computed)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    return got


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_next_chat_turn_starts_from_the_previous_turns_kv(model, params):
    engine = make_engine(model, 4096)
    (turn1,) = run(engine, [(ids(45, seed=2), params)])
    assert turn1.cached_tokens == 0
    history = turn1.tokens[:turn1.pos]  # prompt + reply, as far as it went through the model
    prompt2 = turn1.tokens + ids(30, seed=3)
    check_same(model, [(prompt2, params)], engine, [len(history)])
    # The turn-2 entry covers turn 1's, which was dropped as redundant.
    assert len(engine.prefix_cache) == 1


@pytest.mark.parametrize("shared", [BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 5, 3 * BLOCK - 1])
def test_block_boundaries_and_divergence_inside_a_block(model, shared):
    engine = make_engine(model, 4096)
    base = ids(3 * BLOCK + 10, seed=4)
    run(engine, [(base, GREEDY)])
    prompt = base[:shared] + ids(20, seed=5)
    assert prompt[shared] != base[shared]
    check_same(model, [(prompt, GREEDY)], engine, [shared if shared >= BLOCK else 0])


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prompt_that_is_a_strict_prefix_of_a_cached_one(model, params):
    engine = make_engine(model, 4096)
    base = ids(80, seed=6)
    run(engine, [(base, params)])
    check_same(model, [(base[:50], params)], engine, [49])
    check_same(model, [(base, params)], engine, [79])  # the same prompt again: all but its last token


def test_two_requests_sharing_a_cached_prefix_run_together(model):
    engine = make_engine(model, 4096)
    shared = ids(40, seed=7)
    run(engine, [(shared + ids(5, seed=8), GREEDY)])
    requests = [(shared + ids(12, seed=9), GREEDY), (shared + ids(7, seed=10), SEEDED)]
    got = check_same(model, requests, engine, [40, 40])
    assert [s.peak_batch for s in got] == [2, 2]
    # ... and the same as each alone without the cache.
    for (prompt, params), s in zip(requests, got):
        assert outputs(run(make_engine(model, 0), [(prompt, params)])) == outputs([s])


def test_after_eviction_by_the_cap(model):
    engine = make_engine(model, 100)
    a, b = ids(60, seed=11), ids(60, seed=12)
    run(engine, [(a, GREEDY)])
    run(engine, [(b, GREEDY)])  # two entries of over 60 tokens > 100: a's is evicted
    (entry,) = engine.prefix_cache.entries
    assert entry.tokens[:60] == tuple(b)
    check_same(model, [(list(entry.tokens) + [5, 6], GREEDY)], engine, [entry.size])
    check_same(model, [(a + [5, 6], GREEDY)], engine, [0])
    assert engine.extents.free_tokens + engine.prefix_cache.tokens == engine.kv_budget_tokens


def test_cached_kv_yields_to_a_request_that_needs_memory(model):
    engine = make_engine(model, 10_000, kv_budget_tokens=200)
    a, b = ids(80, seed=13), ids(80, seed=14)
    run(engine, [(a, GREEDY)])
    run(engine, [(b, GREEDY)])
    assert len(engine.prefix_cache) == 2
    assert engine.extents.free_tokens < 70 + GREEDY.max_new_tokens
    # The new request does not fit beside both entries: the least recently used (a) is evicted, no waiting.
    check_same(model, [(ids(70, seed=15), GREEDY)], engine, [0])
    assert [e.tokens[:80] for e in engine.prefix_cache.entries][:1] == [tuple(b)]
    assert all(e.tokens[:80] != tuple(a) for e in engine.prefix_cache.entries)
    assert engine.extents.free_tokens + engine.prefix_cache.tokens == 200


def test_a_cancelled_request_leaves_its_computed_kv(model):
    engine = make_engine(model, 4096)
    prompt = ids(40, seed=16)
    seq = engine.submit(prompt, SamplingParams(max_new_tokens=50, temperature=0))
    while seq.new_tokens < 5:
        engine.step()
    engine.cancel(seq)
    assert seq.finish_reason == "canceled"
    computed = seq.pos
    check_same(model, [(seq.tokens + ids(10, seed=17), GREEDY)], engine, [computed])


def test_stream_reports_cached_prompt_tokens(tiny_dir):
    m = glm.load(tiny_dir)
    if not m.model.exact_kv_reuse:
        pytest.skip("this path cannot reuse KV exactly")
    prompt = "[Round 1]\n\n问：" + "你好，请介绍一下你自己。" * 4 + "\n\n答："
    first = m.generate(prompt, max_new_tokens=8, temperature=0, cache_key="conversation 1")
    reply = "".join(first)
    assert first.cached_prompt_tokens == 0
    turn2 = prompt + reply + "\n\n[Round 2]\n\n问：谢谢\n\n答："
    second = m.generate(turn2, max_new_tokens=8, temperature=0, cache_key="conversation 1")
    assert "".join(second) and second.cached_prompt_tokens >= BLOCK
    # Another key, or none, gets nothing of that conversation's KV: the same prompt is prefilled in full.
    for key in ("conversation 2", None):
        other = m.generate(turn2, max_new_tokens=8, temperature=0, cache_key=key)
        assert "".join(other) == "".join(m.generate(turn2, max_new_tokens=8, temperature=0, cache_key=key))
        assert other.cached_prompt_tokens == 0


def test_first_generation_model_is_left_out(tmp_path):
    from devtools.tiny import write_checkpoint_v1

    m = glm.load(write_checkpoint_v1(tmp_path / "v1"))
    assert not m.model.exact_kv_reuse and m.model.prefill_whole
    engine = make_engine(m, 4096)
    assert engine.prefix_cache.max_tokens == 0


@pytest.mark.parametrize("cache_tokens", [4096, 0])
def test_exact_rows_hold_for_the_steps_of_an_engine_with_a_cache_only(model, monkeypatch, cache_tokens):
    engine = make_engine(model, cache_tokens)
    seen = []
    step = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda batch: seen.append(model.model.ops.exact_rows) or step(batch))
    run(engine, [(ids(20, seed=5), GREEDY)])
    assert len(seen) == 1 + GREEDY.max_new_tokens - 1 and set(seen) == {cache_tokens > 0}
    assert not model.model.ops.exact_rows


def test_cache_size_from_the_environment(model, monkeypatch):
    def from_env(**fields):
        return Engine(model.model, model.tokenizer, model.config, model.device, EngineConfig.from_env(**fields))

    monkeypatch.setenv("GLM_PREFIX_CACHE_TOKENS", "0")
    assert from_env().prefix_cache.max_tokens == 0
    monkeypatch.setenv("GLM_PREFIX_CACHE_TOKENS", "300")
    assert from_env().prefix_cache.max_tokens == 300
    monkeypatch.delenv("GLM_PREFIX_CACHE_TOKENS")
    assert from_env(kv_budget_tokens=500).prefix_cache.max_tokens == 500
    for bad in ("-1", "lots"):
        monkeypatch.setenv("GLM_PREFIX_CACHE_TOKENS", bad)
        with pytest.raises(ValueError, match=f"GLM_PREFIX_CACHE_TOKENS='{bad}' must be an integer >= 0"):
            EngineConfig.from_env()


def test_requests_reuse_only_their_own_scopes_kv(model):
    """Private by default: a key reuses what the same key left, never another key's or a keyless
    request's KV, and a keyless request neither reuses nor leaves anything."""
    engine = make_engine(model, 4096, prefix_cache_scope="private")
    assert not engine.shared_scope
    prompt = ids(50, seed=21)

    def once(key, tokens=prompt):
        seq = engine.submit(tokens, GREEDY, cache_key=key)
        while not seq.done:
            engine.step()
        engine.step()
        return seq

    first = once("alice")
    follow_up = first.tokens + ids(10, seed=22)
    assert once(None, follow_up).cached_tokens == 0
    assert once("bob", follow_up).cached_tokens == 0
    assert once("alice", follow_up).cached_tokens == first.pos
    assert all(e.scope != engine.cache_scope(None) for e in engine.prefix_cache.entries)
    assert engine.cache_scope(None) is None


def test_only_replies_the_cache_will_keep_are_recomputed(model, monkeypatch):
    """Where decode rows differ from prefill rows (the Triton path), an ended reply is recomputed as
    prefill before caching, and only then: a keyless (private) request's reply is never kept, so
    it costs no recomputation."""
    engine = make_engine(model, 4096, prefix_cache_scope="private")
    monkeypatch.setattr(model.model.ops, "decode_writes_prefill_kv", False)
    recomputed = []
    real = engine.runner.recompute_reply
    monkeypatch.setattr(engine.runner, "recompute_reply",
                        lambda seq, chunk: (recomputed.append(seq.cache_scope), real(seq, chunk)))
    params = SamplingParams(max_new_tokens=6, temperature=0)
    for key in (None, "alice"):
        seq = engine.submit(ids(40, seed=23), params, cache_key=key)
        while not seq.done:
            engine.step()
        engine.step()
    assert recomputed == [engine.cache_scope("alice")]
    (entry,) = engine.prefix_cache.entries
    assert entry.tokens == tuple(seq.tokens[:seq.pos])  # the recomputed reply rows are kept


def test_shared_scope_from_the_environment(model, monkeypatch):
    monkeypatch.setenv("GLM_PREFIX_CACHE_SCOPE", "shared")
    assert Engine(model.model, model.tokenizer, model.config, model.device, EngineConfig.from_env()).shared_scope
    assert not Engine(model.model, model.tokenizer, model.config, model.device).shared_scope  # only from_env reads it
    monkeypatch.setenv("GLM_PREFIX_CACHE_SCOPE", "everyone")
    with pytest.raises(ValueError, match="GLM_PREFIX_CACHE_SCOPE='everyone' must be one of private, shared"):
        EngineConfig.from_env()


# ---- the same on the Triton backend (the CUDA path's kernels under TRITON_INTERPRET=1), with
# shorter prompts than above: the interpreter runs a kernel program in milliseconds.

@pytest.fixture(scope="module")
def triton_model(tiny_dir):
    m = glm.load(tiny_dir, backend="triton")
    engine = make_engine(m, 4096)
    assert m.model.exact_kv_reuse and engine.prefix_cache.max_tokens == 4096 and engine.exact_rows
    assert not m.model.ops.exact_rows  # the GEMM and SDPA prefill, except in the steps of an engine with a cache
    return m


SHORT_GREEDY = SamplingParams(max_new_tokens=4, temperature=0)
SHORT_SEEDED = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=7)


@pytest.mark.parametrize("params", [SHORT_GREEDY, SHORT_SEEDED], ids=["greedy", "seeded"])
def test_triton_next_chat_turn_and_a_strict_prefix(triton_model, params):
    engine = make_engine(triton_model, 4096)
    (turn1,) = run(engine, [(ids(20, seed=2), params)])
    prompt2 = turn1.tokens + ids(5, seed=3)
    check_same(triton_model, [(prompt2, params)], engine, [turn1.pos])
    check_same(triton_model, [(prompt2[:18], params)], engine, [17])


def test_triton_divergence_inside_a_block_and_two_requests_together(triton_model):
    engine = make_engine(triton_model, 4096)
    base = ids(2 * BLOCK + 2, seed=4)
    run(engine, [(base, SHORT_GREEDY)])
    shared = BLOCK + 5
    requests = [(base[:shared] + ids(4, seed=5), SHORT_GREEDY), (base[:shared] + ids(6, seed=6), SHORT_SEEDED)]
    got = check_same(triton_model, requests, engine, [shared, shared])
    assert [s.peak_batch for s in got] == [2, 2]
