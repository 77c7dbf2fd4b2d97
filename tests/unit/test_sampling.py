"""The batched sampler (glm.sampling.sample_rows / filter_scores, what the runner runs on the model's
device) against a one-row reference written the way HF's processors and warpers are, on CPU tensors:
the same filtered scores bit for bit, the same draws as torch.multinomial from the same generator
state, rows independent of their batch-mates, seeded runs reproducible."""
from __future__ import annotations

import math

import pytest
import torch

from glm.sampling import RowParams, SamplingParams, filter_scores, sample_rows, seen_tokens

V = 4096


def reference_scores(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, HF's order: InvalidScoreLogitsProcessor, repetition penalty, temperature, top-k, top-p."""
    scores = logits.float().clone()
    if not torch.isfinite(scores).all():
        scores.zero_()
        scores[5] = 5e4
    if p.repetition_penalty != 1.0 and history.numel():
        prev = scores.gather(0, history)
        scores.scatter_(0, history, torch.where(prev < 0, prev * p.repetition_penalty, prev / p.repetition_penalty))
    if p.temperature == 0:
        return scores
    scores = scores / p.temperature
    if p.top_k > 0:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, stable=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return scores


def reference_sample(logits, history, p, generator) -> int:
    scores = reference_scores(logits, history, p)
    if p.temperature == 0:
        return int(scores.argmax())
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def fp16_logits(seed: int, rows: int = 1) -> torch.Tensor:
    """Logits as a GPU model gives them: fp16 values (many exact ties), spread like a real vocabulary's."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, V, generator=g) * 3).half().float()


PARAMS = [SamplingParams(temperature=0.8, top_p=0.8),
          SamplingParams(temperature=1.0, top_p=1.0),
          SamplingParams(temperature=0.7, top_p=0.95, top_k=40),
          SamplingParams(temperature=1.3, top_p=1.0, top_k=1),
          SamplingParams(temperature=0.5, top_p=0.3, top_k=5000),
          SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=1.3),
          SamplingParams(temperature=0.9, top_p=0.05, repetition_penalty=0.7),
          SamplingParams(temperature=0, top_p=0.8, top_k=3, repetition_penalty=1.5),
          SamplingParams(temperature=1e-5, top_p=0.5)]


def history_of(seed: int) -> torch.Tensor:
    return torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(seed + 99))


def seen_rows(histories, params):
    if all(p.repetition_penalty == 1.0 for p in params):
        return None
    return torch.stack([seen_tokens(h, V, "cpu") for h in histories])


@pytest.mark.parametrize("i", range(len(PARAMS)))
def test_filtered_scores_equal_the_reference_bit_for_bit(i):
    p = PARAMS[i].validate()
    for seed in range(4):
        logits, history = fp16_logits(seed)[0], history_of(seed)
        penalized, warped = filter_scores(logits[None], seen_rows([history], [p]), RowParams.of([p], "cpu"))
        got = (penalized if p.temperature == 0 else warped)[0]
        want = reference_scores(logits, history, p)
        assert torch.equal(got, want), (p, seed)


def test_top_p_boundary_and_top_k_ties_exactly():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for top_p, kept in ((0.8, [True, True, False, False]), (0.81, [True, True, True, False])):
        p = SamplingParams(temperature=1.0, top_p=top_p)
        _, warped = filter_scores(probs.log()[None], None, RowParams.of([p], "cpu"))
        assert torch.isfinite(warped[0]).tolist() == kept
    p = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    _, warped = filter_scores(torch.tensor([[0.0, 5.0, 3.0, 3.0, 1.0]]), None, RowParams.of([p], "cpu"))
    assert torch.isfinite(warped[0]).tolist() == [False, True, True, True, False]


def test_penalty_divides_positive_and_multiplies_negative_seen_logits():
    p = SamplingParams(temperature=0, repetition_penalty=2.0).validate()
    seen = seen_tokens([1, 3], 4, "cpu")[None]
    penalized, _ = filter_scores(torch.tensor([[1.0, 3.0, 2.0, -1.0]]), seen, RowParams.of([p], "cpu"))
    assert penalized[0].tolist() == [1.0, 1.5, 2.0, -2.0]


def test_a_row_with_a_non_finite_logit_samples_thudms_token_5():
    p = SamplingParams(temperature=0.9, top_p=0.9).validate()
    logits = fp16_logits(3, 2)
    logits[1, 17] = math.inf
    ids = sample_rows(logits, None, RowParams.of([p, p], "cpu"),
                      [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert int(ids[1]) == 5 and int(ids[0]) == reference_sample(logits[0], history_of(0), p, torch.Generator().manual_seed(1))


def test_draws_equal_torch_multinomial_from_the_same_generator_state():
    """The reference draws with torch.multinomial; sample_rows with q ~ Exp(1) from the same generator:
    equal ids for every parameter set, 20 consecutive draws each (generator states advance alike)."""
    for i, p in enumerate(PARAMS):
        p = p.validate()
        mine, theirs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        got, want = [], []
        for step in range(20):
            logits, history = fp16_logits(100 * i + step)[0], history_of(step)
            seen = seen_rows([history], [p])
            got.append(int(sample_rows(logits[None], seen, RowParams.of([p], "cpu"),
                                       [None if p.temperature == 0 else mine])[0]))
            want.append(reference_sample(logits, history, p, theirs))
        assert got == want, p
        assert len(set(got)) > 1 or p.temperature == 0 or p.top_k == 1


def test_a_rows_token_is_the_same_alone_and_in_a_batch():
    params = [p.validate() for p in PARAMS]
    logits = fp16_logits(7, len(params))
    histories = [history_of(b) for b in range(len(params))]
    rows = RowParams.of(params, "cpu")

    def generators():
        return [None if p.temperature == 0 else torch.Generator().manual_seed(10 + b) for b, p in enumerate(params)]

    batched = sample_rows(logits, seen_rows(histories, params), rows, generators()).tolist()
    alone = []
    for b, (p, g) in enumerate(zip(params, generators())):
        seen = seen_tokens(histories[b], V, "cpu")[None] if p.repetition_penalty != 1.0 else None
        alone.append(int(sample_rows(logits[b:b + 1], seen, RowParams.of([p], "cpu"), [g])[0]))
    assert batched == alone
    # and the batch's filtered scores are each row's own, bit for bit
    _, warped = filter_scores(logits, seen_rows(histories, params), rows)
    for b, p in enumerate(params):
        if p.temperature:
            assert torch.equal(warped[b], reference_scores(logits[b], histories[b], p))


def test_seeded_draws_are_reproducible_and_seeds_differ():
    p = SamplingParams(temperature=1.0, top_p=0.95).validate()
    logits = fp16_logits(11)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(sample_rows(logits, None, RowParams.of([p], "cpu"), [g])[0]) for _ in range(30)]

    assert run(5) == run(5)
    assert run(5) != run(6)
