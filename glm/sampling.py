"""Per-request sampling: its parameters and seed policy, HF-order logits processing, the token draw,
and stop strings. No generation loop (that is glm.engine)."""
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


def process_logits(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row of fp32 logits [V] -> scores to sample from, in HF's order of processors and warpers."""
    scores = logits.float().clone()
    if not torch.isfinite(scores).all():
        # THUDM's InvalidScoreLogitsProcessor (fp16 overflow guard): fall back to token 5.
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
        sorted_scores, order = torch.sort(scores)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return scores


def sample(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    scores = process_logits(logits, history, p)
    if p.temperature == 0:
        return int(scores.argmax())
    probs = scores.softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        # Scores too large to normalise (validate() keeps temperatures where this cannot happen for
        # a real model's logits): the most likely token, as the limit of sampling, never an error.
        return int(process_logits(logits, history, replace(p, temperature=0)).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


class StopMatcher:
    """Holds back text that could still become one of the stop strings; cuts at the first one.

    Work per fed chunk is bounded by the stops' total length (capped by SamplingParams.validate):
    pending text never exceeds the longest stop plus the new chunk, and the held-back suffix is
    found by hashing its candidates against the set of the stops' proper prefixes.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max(map(len, self.stops), default=0)
        self.prefixes = {s[:n] for s in self.stops for n in range(1, len(s))}
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = self._held_suffix()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self) -> int:
        text = self.pending
        for n in range(min(len(text), self.longest - 1), 0, -1):
            if text[-n:] in self.prefixes:
                return n
        return 0
