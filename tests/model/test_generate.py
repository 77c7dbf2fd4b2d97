"""Sampling semantics, stops, streaming, determinism and batching, on the tiny checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

import glm
from glm.engine import Engine
from glm.output import StopMatcher
from glm.sampling import SamplingParams, process_logits

PROMPTS = ["[Round 1]\n\n问：你好\n\n答：",
           "[Round 1]\n\n问：What is the capital of France?\n\n答：",
           "[Round 1]\n\n问：😀🎉 emoji 和中文 mixed text\n\n答：",
           "[Round 1]\n\n问：写一首诗\n\n答：春眠不觉晓，"]


def generated_ids(stream):
    return stream.seq.tokens[stream.prompt_tokens:]


def run(model, prompt, **kw):
    kw.setdefault("max_new_tokens", 24)
    s = model.generate(prompt, **kw)
    chunks = list(s)
    return s, chunks


# ---- logits processing (HF semantics) ----

def test_greedy_ignores_warpers_but_applies_repetition_penalty():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    p = SamplingParams(temperature=0, top_k=1, top_p=0.1, repetition_penalty=2.0)
    out = process_logits(logits, torch.tensor([1, 3]), p)
    assert out.tolist() == [1.0, 1.5, 2.0, -2.0]  # positive / penalty, negative * penalty


def test_top_k_keeps_k_best_and_ties():
    logits = torch.tensor([0.0, 5.0, 3.0, 3.0, 1.0])
    out = process_logits(logits, torch.empty(0, dtype=torch.long), SamplingParams(temperature=1.0, top_k=2, top_p=1.0))
    assert torch.isfinite(out).tolist() == [False, True, True, True, False]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    out = process_logits(logits, torch.empty(0, dtype=torch.long), SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = process_logits(logits, torch.empty(0, dtype=torch.long), SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_temperature_scales_logits():
    out = process_logits(torch.tensor([2.0, 4.0]), torch.empty(0, dtype=torch.long),
                         SamplingParams(temperature=0.5, top_p=1.0))
    assert out.tolist() == [4.0, 8.0]


def test_nan_guard_like_thudm():
    out = process_logits(torch.tensor([1.0, math.nan, 0, 0, 0, 0, 0]), torch.empty(0, dtype=torch.long),
                         SamplingParams(temperature=0))
    assert int(out.argmax()) == 5


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=-0.1), dict(top_p=1.5), dict(top_k=-1),
                                 dict(repetition_penalty=0.0), dict(max_new_tokens=0), dict(seed=-1),
                                 dict(seed=glm.MAX_SEED + 1),
                                 dict(temperature=math.nan), dict(top_k=2.5), dict(stop=[1])])
def test_invalid_parameters_are_input_errors(tiny_model, bad):
    with pytest.raises(glm.InputError):
        tiny_model.generate(PROMPTS[0], **{"max_new_tokens": 4, **bad})


def test_top_p_zero_is_greedy(tiny_model):
    assert SamplingParams(temperature=0.9, top_p=0.0).validate() == SamplingParams(temperature=0.0, top_p=1.0)
    _, sampled = run(tiny_model, PROMPTS[1], temperature=1.5, top_p=0.0, seed=1)
    _, greedy = run(tiny_model, PROMPTS[1], temperature=0.0, seed=2)
    assert sampled == greedy


def test_random_seed_is_reported_and_reproduces(tiny_model):
    first, chunks = run(tiny_model, PROMPTS[1], temperature=1.0, top_p=1.0)
    assert 0 <= first.seed <= glm.MAX_SEED
    _, again = run(tiny_model, PROMPTS[1], temperature=1.0, top_p=1.0, seed=first.seed)
    assert again == chunks


def test_empty_prompt_is_an_input_error(tiny_model):
    with pytest.raises(glm.InputError, match="prompt"):
        tiny_model.generate("", max_new_tokens=4)


def test_context_overflow_is_reported_before_any_work(tiny_model):
    n = len(tiny_model.tokenizer.encode(PROMPTS[0]))
    queued = len(tiny_model.engine.waiting)
    with pytest.raises(glm.InputError, match=r"exceeds the model's context of 8192"):
        tiny_model.generate(PROMPTS[0], max_new_tokens=8192 - n + 1)
    assert len(tiny_model.engine.waiting) == queued


def test_fit_context_lowers_max_new_tokens_or_refuses(tiny_model):
    n = len(tiny_model.tokenizer.encode(PROMPTS[0]))
    s = tiny_model.generate(PROMPTS[0], max_new_tokens=100_000, temperature=0, fit_context=True)
    assert (s.prompt_tokens, s.max_new_tokens) == (n, 8192 - n)
    s.cancel()
    s = tiny_model.generate(PROMPTS[0], max_new_tokens=5, temperature=0, fit_context=True)
    list(s)
    assert s.max_new_tokens == 5 and 1 <= s.new_tokens <= 5
    long_prompt = "好" * 9000
    n_long = len(tiny_model.tokenizer.encode(long_prompt))
    assert n_long > 8192
    queued = len(tiny_model.engine.waiting)
    with pytest.raises(glm.InputError, match=rf"prompt is too long: {n_long} tokens, but the model's context is 8192"):
        tiny_model.generate(long_prompt, max_new_tokens=1, fit_context=True)
    assert len(tiny_model.engine.waiting) == queued


# ---- stops ----

def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(("</end>", "STOP"))
    assert m.feed("hello <") == ("hello ", False)
    assert m.feed("/e") == ("", False)
    assert m.feed("x") == ("</ex", False)
    assert m.feed(" ST") == (" ", False)
    assert m.feed("OP and more") == ("", True)


# ---- generation on the tiny model ----

def test_greedy_follows_argmax_of_full_prefill_logits(tiny_model):
    s, _ = run(tiny_model, PROMPTS[0], temperature=0, max_new_tokens=12)
    ids = tiny_model.tokenizer.encode(PROMPTS[0])
    for t in generated_ids(s):
        assert int(tiny_model.logits(ids)[-1].argmax()) == t
        ids.append(t)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_concatenation_equals_decode_of_generated_ids(tiny_model, prompt):
    s, chunks = run(tiny_model, prompt, temperature=1.0, top_p=1.0, seed=11, max_new_tokens=40)
    assert s.finish_reason == "length" and s.new_tokens == 40
    assert "".join(chunks) == tiny_model.tokenizer.decode(generated_ids(s))
    assert all(chunks)


def test_seed_makes_sampling_reproducible(tiny_model):
    a = "".join(run(tiny_model, PROMPTS[1], temperature=0.9, top_k=50, seed=123)[1])
    b = "".join(run(tiny_model, PROMPTS[1], temperature=0.9, top_k=50, seed=123)[1])
    c = "".join(run(tiny_model, PROMPTS[1], temperature=0.9, top_k=50, seed=124)[1])
    assert a == b and a != c


def test_no_seed_draws_and_reports_one(tiny_model):
    s, chunks = run(tiny_model, PROMPTS[0], temperature=1.0, max_new_tokens=8)
    again = "".join(run(tiny_model, PROMPTS[0], temperature=1.0, max_new_tokens=8, seed=s.seed)[1])
    assert isinstance(s.seed, int) and "".join(chunks) == again


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stop_string_is_cut_and_never_streamed(tiny_model, prompt):
    full = "".join(run(tiny_model, prompt, temperature=1.0, top_p=1.0, seed=5, max_new_tokens=60)[1])
    assert len(full) > 12
    stop = full[len(full) // 2: len(full) // 2 + 3]
    s, chunks = run(tiny_model, prompt, temperature=1.0, top_p=1.0, seed=5, max_new_tokens=60, stop=["\x00never", stop])
    text = "".join(chunks)
    assert s.finish_reason == "stop"
    assert text == full[:full.find(stop)]
    assert stop not in text


def test_eos_ends_generation_without_text(tiny_model, monkeypatch):
    script = iter([100, 200, 2, 300])
    monkeypatch.setattr("glm.runner.sample_rows",
                        lambda logits, seen, rows, generators: torch.tensor([next(script) for _ in generators]))
    s, chunks = run(tiny_model, PROMPTS[0], max_new_tokens=10)
    assert s.finish_reason == "eos" and s.new_tokens == 2
    assert "".join(chunks) == tiny_model.tokenizer.decode([100, 200])


# ---- batching ----

def solo(model, prompt, **kw):
    s, chunks = run(model, prompt, **kw)
    return "".join(chunks), generated_ids(s)


REQUESTS = [dict(prompt=PROMPTS[0], temperature=0, max_new_tokens=30),
            dict(prompt=PROMPTS[1], temperature=0.8, top_p=0.9, seed=1, max_new_tokens=17),
            dict(prompt=PROMPTS[2], temperature=1.2, top_k=40, repetition_penalty=1.3, seed=2, max_new_tokens=25),
            dict(prompt=PROMPTS[3], temperature=0.7, seed=3, max_new_tokens=9, stop=["，"])]


def test_batched_sequences_equal_their_solo_runs(tiny_model):
    want = [solo(tiny_model, **r) for r in REQUESTS]
    engine = Engine(tiny_model.model, tiny_model.tokenizer, tiny_model.config, tiny_model.device,
                    max_batch=4, prefill_chunk=5)
    seqs = []
    for r in REQUESTS:
        r = dict(r)
        ids = tiny_model.tokenizer.encode(r.pop("prompt"))
        r["stop"] = tuple(r.get("stop", ()))
        seqs.append(engine.submit(ids, SamplingParams(**r)))
        engine.step()  # join while others are running
    while engine.step():
        pass
    for seq, (text, ids) in zip(seqs, want):
        got = list(iter(lambda: seq.read(timeout=0), None))
        assert seq.tokens[len(seq.prompt_ids):] == ids
        assert "".join(got) == text


def test_cancel_frees_the_sequence(tiny_model):
    engine = Engine(tiny_model.model, tiny_model.tokenizer, tiny_model.config, tiny_model.device)
    seq = engine.submit(tiny_model.tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=100, seed=0))
    for _ in range(3):
        engine.step()
    engine.cancel(seq)
    engine.step()
    assert seq.finish_reason == "canceled" and seq.cache is None and not engine.active


def test_kv_budget_queues_and_rejects(tiny_model):
    engine = Engine(tiny_model.model, tiny_model.tokenizer, tiny_model.config, tiny_model.device,
                    kv_budget_tokens=60)
    ids = tiny_model.tokenizer.encode(PROMPTS[0])
    with pytest.raises(glm.InputError, match="budget"):
        engine.submit(ids, SamplingParams(max_new_tokens=61 - len(ids)))
    a = engine.submit(ids, SamplingParams(max_new_tokens=30, seed=0))
    b = engine.submit(ids, SamplingParams(max_new_tokens=30, seed=1))
    engine.step()
    assert engine.active == [a] and list(engine.waiting) == [b]  # b waits for memory
    c = engine.submit(ids, SamplingParams(max_new_tokens=30, seed=2))
    engine.cancel(c)  # cancelled while queued behind b: leaves at once, not when it reaches the head
    assert c.finish_reason == "canceled" and list(engine.waiting) == [b]
    while engine.step():
        pass
    assert a.finish_reason == b.finish_reason == "length"


def test_concurrent_async_streams_on_the_engine_thread_equal_solo_runs(tiny_model):
    import asyncio

    want = [solo(tiny_model, **r)[0] for r in REQUESTS]
    engine = tiny_model.use_engine(max_batch=4)
    engine.start()
    try:
        async def one(r):
            r = dict(r)
            stream = tiny_model.generate(r.pop("prompt"), **r)
            return "".join([c async for c in stream])

        async def all_at_once():
            return await asyncio.gather(*[one(r) for r in REQUESTS])

        assert asyncio.run(all_at_once()) == want
    finally:
        tiny_model.use_engine()


def test_int8_activations_track_the_exact_model_and_batch_like_solo(tiny_dir, tiny_model):
    """The opt-in int8-activation mode: logits close to the exact fp32 ones (measured 5e-3 max abs
    on this checkpoint, logit std ~4), same greedy choices, and batched output equal to solo."""
    fast = glm.load(tiny_dir, int8_activations=True)
    ids = tiny_model.tokenizer.encode(PROMPTS[0] * 3)
    exact, approx = tiny_model.logits(ids), fast.logits(ids)
    assert not torch.equal(exact, approx)  # the mode is really on
    assert (exact - approx).abs().max() < 0.02
    assert torch.equal(exact.argmax(-1), approx.argmax(-1))
    prompts = PROMPTS[:3]
    alone = [solo(fast, p, max_new_tokens=12, temperature=0.9, seed=i)[1] for i, p in enumerate(prompts)]
    fast.use_engine(max_batch=4)
    streams = [fast.generate(p, max_new_tokens=12, temperature=0.9, seed=i) for i, p in enumerate(prompts)]
    for s in streams:
        list(s)
    assert [generated_ids(s) for s in streams] == alone


@pytest.mark.parametrize("ckpt, kw", [("tiny_dir", dict(dtype=torch.bfloat16)), ("tiny8_dir", {}),
                                      ("tiny_fp16_dir", {}), ("tiny_fp16_dir", dict(quantize=8))])
def test_int8_activations_need_an_int4_float32_cpu_model(request, ckpt, kw):
    with pytest.raises(glm.CheckpointError, match="int8_activations needs an int4 model"):
        glm.load(request.getfixturevalue(ckpt), int8_activations=True, **kw)
