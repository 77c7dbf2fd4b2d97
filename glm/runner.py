"""Runs one scheduled step on the model: stages the batch's inputs, runs the forward passes and samples
one token id per sequence that needs one.

A decode step's rows (tokens, the model's rotary positions, attention plan, sampling parameters) go
to the device in one copy of the staging buffer (glm/staging.py); on the Triton backend the layers
read them there, and a CUDA graph per batch bucket (glm/gpu/graphs.py, once `prepare` has captured
them) replays the forward. Sampling runs for all rows at once on the model's device
(glm.sampling.sample_rows), each row with its own generator; only the chosen ids come back, in one
small copy.

Every outcome is per sequence (a token id or the error that stopped it): when a batched decode pass
fails, each of its sequences is retried alone, so one sequence's failure never fails its batch-mates
(rows are computed independently, so the retry gives the same tokens; it rewrites the same cache
positions). A sticky device error (glm.errors.sticky_device_error) is not contained: the device can
run nothing more, so it ends the step and the engine.
"""
from __future__ import annotations

import logging

import torch

from .errors import sticky_device_error
from .kvpool import KVPool
from .sampling import RowParams, RowState, sample_rows
from .scheduler import Batch
from .sequence import Sequence
from .staging import StepStaging, bucket_for, padded, staged

log = logging.getLogger("glm")

Outcome = tuple[Sequence, "int | BaseException"]


class ModelRunner:
    def __init__(self, model, pool: KVPool, device, max_batch: int = 8):
        self.model, self.pool, self.device = model, pool, torch.device(device)
        # The layers read the staged rows only on the Triton backend; the CPU paths take them as
        # arguments (on the CPU a "copy" moves nothing).
        self.stage_layers = model.ops.name == "triton"
        rotary = model.rotary_table(self.device) if self.stage_layers else None
        self.staging = StepStaging(max(max_batch, 8), self.device, rotary)
        self.graphs = None  # glm.gpu.graphs.DecodeGraphs once prepare() has captured them

    # ---- setup ----
    @torch.inference_mode()
    def prepare(self, prefill_chunk: int, buckets=None) -> str:
        """Warm up every kernel variant the engine launches, then capture the decode graphs; run at
        setup while the KV pool is unused (it writes scratch KV at the pool's first slots). Prefill
        at row counts covering each decode-GEMV width, the GEMM's and a whole chunk, decode and
        sampling at each bucket, so that nothing compiles after setup. Returns what it did."""
        from .gpu.graphs import BUCKETS, DecodeGraphs
        buckets = tuple(b for b in (buckets or BUCKETS) if b <= self.staging.rows)
        lengths = sorted({n for n in (1, 2, 3, 5, 16, 17, prefill_chunk) if n <= min(prefill_chunk, self.pool.tokens)})
        for n in lengths:
            cache = self.pool.cache(0, n)
            self.model(torch.zeros(1, n, dtype=torch.long, device=self.device), [0], [cache], last_only=True)
        scratch = self.pool.cache(0, 1)
        for rows in buckets:
            self._stage_rows([0] * rows, [0] * rows, [scratch] * rows, rows)
            self.staging.write("temperature", [1.0] * rows)
            self.staging.write("top_p_cut", [0.2] * rows)
            self.staging.write("top_k", [0] * rows)
            self.staging.write("penalty", [1.0] * rows)
            self.staging.copy()
            logits = self._eager(self.staging.inputs(rows), [0] * rows, [scratch] * rows)
            warm = [RowState(torch.Generator(device=self.device).manual_seed(0), None) for _ in range(rows)]
            sample_rows(logits[:, -1], None, self.staging.sampling(rows), [w.draws for w in warm]).tolist()
        done = f"warm-up: prefill of {', '.join(map(str, lengths))} rows, decode and sampling at {', '.join(map(str, buckets))} rows"
        if not (self.stage_layers and self.device.type == "cuda"):
            return done
        graphs = DecodeGraphs()
        failure = graphs.capture(lambda inputs: self._eager(inputs, [0] * inputs.rows, [scratch] * inputs.rows),
                                 self.staging, buckets)
        if failure is not None:
            log.error("CUDA graphs off, decode runs eagerly: %s", failure)
            return done
        self.graphs = graphs
        return f"{done}; CUDA graphs captured and checked bitwise against eager decode at {', '.join(map(str, buckets))} rows"

    def _eager(self, inputs, starts, caches) -> torch.Tensor:
        if not self.stage_layers:
            return self.model(inputs.tokens, starts, caches, last_only=True)
        with staged(inputs):
            return self.model(inputs.tokens, starts, caches, last_only=True)

    # ---- steps ----
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
            if sticky_device_error(e):
                raise
            return [(seq, e)]
        if seq.prefilling:
            return []
        self.staging.begin()
        self._stage_sampling([seq])
        self.staging.copy()
        return self._sample([seq], logits[:, -1])

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
            logits = self._forward_decode(seqs)
        except Exception as e:  # noqa: BLE001
            if sticky_device_error(e):
                raise
            if len(seqs) == 1:
                return [(seqs[0], e)]
            return [outcome for s in seqs for outcome in self._decode([s])]
        exact = self.model.decode_writes_prefill_kv
        for s in seqs:
            s.pos += 1
            if exact and s.exact_pos == s.pos - 1:
                s.exact_pos = s.pos
            s.peak_batch = max(s.peak_batch, len(seqs))
        return self._sample(seqs, logits[:len(seqs), -1])

    def _forward_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [rows, 1, vocab] of one decode step (rows >= len(seqs) when a graph pads them)."""
        caches = [self._cache(s) for s in seqs]
        starts = [s.pos for s in seqs]
        rows = len(seqs)
        bucket = bucket_for(rows)
        graph = self.graphs is not None and self.graphs.get(bucket) is not None
        if graph:
            rows = bucket
        self.staging.begin()
        self._stage_rows([s.tokens[-1] for s in seqs], starts, caches, rows)
        self._stage_sampling(seqs)
        self.staging.copy()
        if graph:
            return self.graphs.replay(rows)
        return self._eager(self.staging.inputs(rows), starts, caches)

    def _stage_rows(self, tokens: list[int], starts: list[int], caches, rows: int) -> None:
        """Each row's token, rotary positions and attention plan, padded to `rows` rows by repeating row 0."""
        plan = [(self.pool.element_offset(c), c.k.shape[2], c.slot(s)) for c, s in zip(caches, starts)]
        offsets, slot_counts, slots = zip(*padded(plan, rows))
        rotary = [self.model.decode_positions(c, s) for c, s in zip(caches, starts)]
        positions, block_positions = zip(*padded(rotary, rows))
        st = self.staging
        st.write("tokens", padded(tokens, rows))
        st.write("positions", positions)
        st.write("block_positions", block_positions)
        st.write("cache_offsets", offsets)
        st.write("cache_slots", slot_counts)
        st.write("slots", slots)

    def _stage_sampling(self, seqs: list[Sequence]) -> None:
        for name, values in zip(("temperature", "top_p_cut", "top_k", "penalty"),
                                zip(*(RowParams.values(s.params) for s in seqs))):
            self.staging.write(name, values)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Outcome]:
        """Staged sampling parameters of seqs (rows 0..n-1) -> one outcome per sequence."""
        try:
            states = [self._sampling_state(s, logits.shape[-1]) for s in seqs]
            ids = self._sample_rows(seqs, states, logits)
        except Exception as e:  # noqa: BLE001
            if sticky_device_error(e):
                raise
            if len(seqs) == 1:
                return [(seqs[0], e)]
            # Find the row that failed: each alone (its generator has not drawn yet when the batch
            # failed before the draw, the only place a row's own input can fail).
            return [o for i, s in enumerate(seqs) for o in self._sample_alone(s, logits[i:i + 1])]
        return list(zip(seqs, ids))

    def _sample_alone(self, seq: Sequence, logits: torch.Tensor) -> list[Outcome]:
        self.staging.begin()
        self._stage_sampling([seq])
        self.staging.copy()
        return self._sample([seq], logits)

    def _sample_rows(self, seqs, states: list[RowState], logits: torch.Tensor) -> list[int]:
        rows = len(seqs)
        with_penalty = [st.seen is not None for st in states]
        seen = None
        if any(with_penalty):
            blank = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen = torch.stack([blank if st.seen is None else st.seen for st in states])
        ids = sample_rows(logits, seen, self.staging.sampling(rows), [st.draws for st in states])
        for i, st in enumerate(states):
            if st.seen is not None:
                st.seen.index_fill_(0, ids[i:i + 1], True)
        return ids.tolist()  # the step's one device-to-host copy

    def _sampling_state(self, seq: Sequence, vocab_size: int) -> RowState:
        if seq.sampling is None:
            seq.sampling = RowState.start(seq.params, seq.tokens, vocab_size, self.device)
        return seq.sampling

    def _cache(self, seq: Sequence):
        if seq.cache is None:
            seq.cache = self.pool.cache(seq.extent, seq.capacity)
        return seq.cache
