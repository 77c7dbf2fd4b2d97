"""Per-request sampling: its parameters and seed policy, HF-order logits processing and the token draw
for all rows of a step at once on the logits' device. No generation loop (that is glm.engine), no
text (stop strings are matched in glm.output)."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace

import torch

from .errors import InputError

# Below this temperature sampling is greedy decoding in all but name: a token whose logit is d below
# the best keeps probability exp(-d / T), under 1e-30 unless d < 7e-4, finer than the model's own
# numerical noise (fp16 logits of magnitude 8..16 are spaced 0.008 apart). Dividing by a smaller
# temperature also overflows float32 (3.4e38) for ordinary logits, which would leave no distribution.
MIN_TEMPERATURE = 1e-5
# Each generated token is checked against every stop string; these caps keep that check (and the
# memory of one request's stops) small whatever a client sends.
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 128
# Seeds are 32-bit: a seed drawn at random is logged and reported, and must be one a client can pass
# back through a serving schema (Replicate's integer inputs, JSON numbers) unchanged.
MAX_SEED = 2 ** 32 - 1


def random_seed() -> int:
    """A seed for a request that gave none, from the OS's randomness (never from torch's global RNG)."""
    return secrets.randbelow(MAX_SEED + 1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8       # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 0.8             # 1 = off; 0 = keep only the most likely token (greedy)
    top_k: int = 0                 # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None        # None: drawn at random (see `with_seed`)
    stop: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> "SamplingParams":
        def bad(name, value, rule):
            raise InputError(f"{name} must be {rule}, got {value!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, v, "a finite number")
        if self.temperature < 0:
            bad("temperature", self.temperature, ">= 0")
        if not 0 <= self.top_p <= 1:
            bad("top_p", self.top_p, "in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            bad("seed", self.seed, f"an integer in [0, {MAX_SEED}]")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            bad("stop", self.stop, "a sequence of strings")
        stop = tuple(s for s in self.stop if s)
        if len(stop) > MAX_STOP_STRINGS:
            raise InputError(f"too many stop strings: {len(stop)}, at most {MAX_STOP_STRINGS}")
        longest = max(stop, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise InputError(f"stop string too long: {len(longest)} characters ({longest[:20]!r}...), "
                             f"at most {MAX_STOP_CHARS}")
        temperature, top_p = self.temperature, self.top_p
        if top_p == 0:  # the nucleus shrinks to the top token: greedy decoding, said as such
            temperature, top_p = 0.0, 1.0
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        return replace(self, stop=stop, temperature=temperature, top_p=top_p)

    def with_seed(self) -> "SamplingParams":
        return self if self.seed is not None else replace(self, seed=random_seed())


# THUDM's InvalidScoreLogitsProcessor: a row with a non-finite logit (fp16 overflow) samples this token.
INVALID_SCORES_TOKEN = 5


@dataclass(frozen=True)
class RowParams:
    """The sampling parameters of a step's rows as tensors [B] on the logits' device (one staged copy).

    top_p_cut is 1 - top_p rounded to fp32, the cumulative probability a sorted prefix may reach and
    still be cut (HF compares its fp32 cumsum with that number), -1 with top_p 1 (off); top_k 0 and
    penalty 1 are off."""
    temperature: torch.Tensor  # fp32; 0 = greedy
    top_p_cut: torch.Tensor    # fp32
    top_k: torch.Tensor        # int64
    penalty: torch.Tensor      # fp32

    @staticmethod
    def values(p: SamplingParams) -> tuple[float, float, int, float]:
        """One row's (temperature, top_p_cut, top_k, penalty), in the order RowParams holds them."""
        return p.temperature, (1 - p.top_p if p.top_p < 1 else -1.0), p.top_k, p.repetition_penalty

    @classmethod
    def of(cls, params: list[SamplingParams], device) -> "RowParams":
        cols = list(zip(*(cls.values(p) for p in params)))
        return cls(torch.tensor(cols[0], dtype=torch.float32, device=device),
                   torch.tensor(cols[1], dtype=torch.float32, device=device),
                   torch.tensor(cols[2], dtype=torch.int64, device=device),
                   torch.tensor(cols[3], dtype=torch.float32, device=device))


def filter_scores(logits: torch.Tensor, seen: torch.Tensor | None,
                  rows: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, V] -> (penalized scores, scores to sample from), each [B, V] fp32, in HF's order of
    processors (invalid-score guard, repetition penalty) and warpers (temperature, top-k, top-p).

    seen [B, V] bool marks each row's tokens so far (None: no row has a penalty). Greedy rows
    (temperature 0) take the argmax of the penalized scores; their warped scores mean nothing. Every
    op works row by row, so a row's scores do not depend on the other rows.
    """
    scores = logits.float()
    B, V = scores.shape
    invalid = torch.where(torch.arange(V, device=scores.device) == INVALID_SCORES_TOKEN, 5e4, 0.0)
    scores = torch.where(torch.isfinite(scores).all(-1, keepdim=True), scores, invalid)
    if seen is not None:
        penalty = rows.penalty[:, None]
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    temperature = torch.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    warped = scores / temperature
    # One stable sort serves both warpers (ascending, as HF's top-p): top-k cuts below the k-th
    # largest value (ties kept), top-p the prefix whose probability mass stays <= 1 - top_p.
    ordered, order = torch.sort(warped, dim=-1, stable=True)
    k = torch.where(rows.top_k > 0, rows.top_k.clamp(max=V), V)
    kth = ordered.gather(-1, (V - k)[:, None])
    ordered = ordered.masked_fill(ordered < kth, -math.inf)
    cut = ordered.softmax(-1).cumsum(-1) <= rows.top_p_cut[:, None]
    cut[:, -1] = False
    ordered = ordered.masked_fill(cut, -math.inf)
    return scores, torch.empty_like(warped).scatter_(-1, order, ordered)


def sample_rows(logits: torch.Tensor, seen: torch.Tensor | None, rows: RowParams,
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token id per row of logits [B, V], as int64 [B] on the logits' device; no host sync.

    generators[b] is row b's own generator (None for a greedy row, which draws nothing). The draw is
    torch.multinomial's own for one sample, argmax(probs / q) with q ~ Exp(1) drawn from the row's
    generator, so a row's token depends only on its logits, parameters and generator. Rows whose
    probabilities cannot be normalised (scores too large; validate() keeps real temperatures clear of
    that) get the most likely token, the limit of sampling, never an error.
    """
    penalized, warped = filter_scores(logits, seen, rows)
    greedy_ids = penalized.argmax(-1)
    probs = warped.softmax(-1)
    noise = torch.ones_like(probs)
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    drawn = (probs / noise).argmax(-1)
    take_greedy = (rows.temperature == 0) | ~torch.isfinite(probs).all(-1)
    return torch.where(take_greedy, greedy_ids, drawn)


@dataclass
class RowState:
    """One sequence's sampling state on the model's device: its own generator, seeded from the
    request's seed (None when greedy: it never draws), and with a repetition penalty the set of
    tokens it has seen, updated on the device with each sampled id."""
    draws: torch.Generator | None
    seen: torch.Tensor | None

    @classmethod
    def start(cls, p: SamplingParams, tokens: list[int], vocab_size: int, device) -> "RowState":
        draws = None if p.temperature == 0 else torch.Generator(device=device).manual_seed(p.seed)
        seen = seen_tokens(tokens, vocab_size, device) if p.repetition_penalty != 1.0 else None
        return cls(draws, seen)


def seen_tokens(tokens: torch.Tensor | list[int], vocab_size: int, device) -> torch.Tensor:
    """bool [vocab] marking the given token ids (the repetition penalty's history)."""
    seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    seen[torch.as_tensor(tokens, dtype=torch.long, device=device)] = True
    return seen


def process_logits(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row of logits [V] -> the scores it samples from (the penalized scores when greedy)."""
    seen = seen_tokens(history, logits.numel(), logits.device)[None] if p.repetition_penalty != 1.0 else None
    penalized, warped = filter_scores(logits[None], seen, RowParams.of([p], logits.device))
    return (penalized if p.temperature == 0 else warped)[0]


def sample(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One row's token: sample_rows on a batch of one."""
    seen = seen_tokens(history, logits.numel(), logits.device)[None] if p.repetition_penalty != 1.0 else None
    ids = sample_rows(logits[None], seen, RowParams.of([p], logits.device), [None if p.temperature == 0 else generator])
    return int(ids[0])

