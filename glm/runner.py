"""Runs one scheduled step on the model: builds the batch tensors, runs the forward passes and samples
one token id per sequence that needs one.

Every outcome is per sequence (a token id or the error that stopped it): when a batched decode pass
fails, each of its sequences is retried alone, so one sequence's failure never fails its batch-mates
(rows are computed independently, so the retry gives the same tokens; it rewrites the same cache
positions).
"""
from __future__ import annotations

import torch

from .sampling import sample
from .kvpool import KVPool
from .scheduler import Batch
from .sequence import Sequence

Outcome = tuple[Sequence, "int | BaseException"]


class ModelRunner:
    def __init__(self, model, pool: KVPool, device):
        self.model, self.pool, self.device = model, pool, device

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[Outcome]:
        outcomes: list[Outcome] = []
        if batch.prefill is not None:
            outcomes += self._prefill(batch.prefill, batch.prefill_end)
        if batch.decode:
            outcomes += self._decode(batch.decode)
        return outcomes

    def _prefill(self, seq: Sequence, end: int) -> list[Outcome]:
        try:
            logits = self._prefill_rows(seq, seq.prompt_ids, end)
        except Exception as e:  # noqa: BLE001
            return [(seq, e)]
        return [] if seq.prefilling else self._sample([seq], logits[:, -1])

    def _prefill_rows(self, seq: Sequence, ids: list[int], end: int) -> torch.Tensor:
        """ids[seq.pos:end] through the model as prefill rows; their KV counts as exact."""
        tokens = torch.tensor([ids[seq.pos:end]], device=self.device)
        logits = self.model(tokens, [seq.pos], [self._cache(seq)], last_only=True, prefill=True)
        seq.pos = seq.exact_pos = end
        return logits

    @torch.inference_mode()
    def recompute_reply(self, seq: Sequence, chunk: int) -> None:
        """Rewrite the KV of an ended sequence's decoded tokens as prefill computes them (`chunk`
        rows per pass), so that the prefix cache keeps only rows a fresh prefill would write. On
        failure the rows stay inexact and the cache keeps the exact prefix only (seq.exact_pos)."""
        end, seq.pos = seq.pos, seq.exact_pos
        try:
            while seq.pos < end:
                self._prefill_rows(seq, seq.tokens, min(seq.pos + chunk, end))
        finally:
            seq.pos = end

    def _decode(self, seqs: list[Sequence]) -> list[Outcome]:
        try:
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
            logits = self.model(tokens, [s.pos for s in seqs], [self._cache(s) for s in seqs], last_only=True)
        except Exception as e:  # noqa: BLE001
            if len(seqs) == 1:
                return [(seqs[0], e)]
            return [outcome for s in seqs for outcome in self._decode([s])]
        exact = self.model.decode_writes_prefill_kv
        for s in seqs:
            s.pos += 1
            if exact and s.exact_pos == s.pos - 1:
                s.exact_pos = s.pos
            s.peak_batch = max(s.peak_batch, len(seqs))
        return self._sample(seqs, logits[:, -1])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Outcome]:
        logits = logits.float().cpu()
        outcomes: list[Outcome] = []
        for s, row in zip(seqs, logits):
            try:
                history = torch.tensor(s.tokens) if s.params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
                outcomes.append((s, sample(row, history, s.params, s.generator)))
            except Exception as e:  # noqa: BLE001
                outcomes.append((s, e))
        return outcomes

    def _cache(self, seq: Sequence):
        if seq.cache is None:
            seq.cache = self.pool.cache(seq.extent, seq.capacity)
        return seq.cache
