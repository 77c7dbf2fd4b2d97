"""Which sequences run in the next step: plain Python over integers, no tensors.

Each step releases the sequences that ended, admits waiting ones into the KV budget, and picks at
most one prompt chunk to prefill (so running streams keep flowing) plus one decode token for every
sequence past its prompt.

Admission looks a bounded way past the head of the queue: a request that does not fit yet lets up
to `lookahead` later ones that do fit go first, but only `max_overtakes` times in all; after that
nothing passes it, and the memory that running sequences free is kept for it. So a large request
cannot hold small ones back and is not starved by them either.

A request waits in the queue at most `max_wait_s` seconds: past that it fails with an error that
says what it waited for, instead of holding its client's slot with no deadline.

With a prefix cache (glm.prefix_cache), a sequence that ends keeps its computed KV as a cache entry
of its scope, and a sequence being placed starts from the longest cached prefix of its prompt
within its own scope; cached entries yield their memory (least recently used first) before any
sequence waits.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import QueueTimeout
from .kvpool import ExtentAllocator, KVPool
from .prefix_cache import PrefixCache
from .sequence import Sequence


@dataclass
class Batch:
    """One step's work: a prompt chunk [prefill.pos, prefill_end) and one token for each of decode."""
    prefill: Sequence | None = None
    prefill_end: int = 0
    decode: list[Sequence] = field(default_factory=list)

    @property
    def sequences(self) -> list[Sequence]:
        return ([self.prefill] if self.prefill is not None else []) + self.decode

    @property
    def prefill_tokens(self) -> int:
        return self.prefill_end - self.prefill.pos if self.prefill is not None else 0

    def shape(self) -> str:
        """What the step computes, for the logs."""
        return (f"{self.prefill_tokens + len(self.decode)} rows: {self.prefill_tokens} prefill tokens, "
                f"{len(self.decode)} decode, batch {len(self.sequences)}")

    def __bool__(self) -> bool:
        return self.prefill is not None or bool(self.decode)


class Scheduler:
    def __init__(self, *, max_batch: int, kv_budget_tokens: int, prefill_chunk: int,
                 prefill_whole: bool = False, lookahead: int = 4, max_overtakes: int = 8,
                 prefix_cache_tokens: int = 0, kv: KVPool | None = None, max_wait_s: float | None = None):
        """prefix_cache_tokens > 0 needs `kv`, the pool whose rows cache hits copy (by extent start).
        max_wait_s: longest wait in the queue (None: no bound)."""
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.prefill_chunk = prefill_chunk
        self.prefill_whole = prefill_whole  # a bidirectional context (ChatGLM-6B) needs its prompt in one pass
        self.lookahead = lookahead
        self.max_overtakes = max_overtakes
        self.allocator = ExtentAllocator(kv_budget_tokens)
        self.kv = kv
        self.prefix_cache = PrefixCache(self.allocator, prefix_cache_tokens if kv is not None else 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        self.release_finished()
        self.expire_waiting()
        self.admit()
        batch = Batch()
        for seq in self.running:
            if seq.done:
                continue
            if seq.prefilling:
                if batch.prefill is None:
                    chunk = len(seq.prompt_ids) if self.prefill_whole else self.prefill_chunk
                    batch.prefill, batch.prefill_end = seq, min(seq.pos + chunk, len(seq.prompt_ids))
            else:
                batch.decode.append(seq)
        return batch

    # ---- admission ----
    def expire_waiting(self, now: float | None = None) -> None:
        """Fail the waiting sequences that have waited longer than max_wait_s."""
        if self.max_wait_s is None or not self.waiting:
            return
        now = time.perf_counter() if now is None else now
        for seq in [s for s in self.waiting if now - s.t_submit > self.max_wait_s]:
            self.waiting.remove(seq)
            free = self.allocator.free_tokens + self.prefix_cache.tokens
            seq.fail(QueueTimeout(
                f"waited {now - seq.t_submit:.1f}s for KV cache memory, longer than the {self.max_wait_s:g}s bound "
                f"(GLM_KV_WAIT_SECONDS): it needs {seq.capacity} tokens, {free} are free while "
                f"{len(self.running)} requests run; retry later, or lower max_tokens"))

    def admit(self) -> None:
        """Move waiting sequences that fit into the running set (see the module docstring)."""
        blocked = 0  # waiting sequences passed over in this round
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_batch and blocked <= self.lookahead:
            seq = self.waiting[i]
            try:
                placed = seq.done or self.place(seq)
            except Exception as e:  # noqa: BLE001 - fails this request only
                seq.fail(e)
                seq.log(logging.ERROR, "admission failed: %s: %s", type(e).__name__, e, exc_info=True)
                placed = True
            if placed:
                del self.waiting[i]
                if not seq.done:
                    self.running.append(seq)
                    if i > 0:
                        self.waiting[0].overtaken += 1
                continue
            if i == 0 and seq.overtaken >= self.max_overtakes:
                return  # the head has waited long enough: what frees up is kept for it
            blocked += 1
            i += 1

    def place(self, seq: Sequence) -> bool:
        """Give the sequence its KV extent, or False when it does not fit yet.

        The one place where a sequence gets memory: it starts from the longest cached prefix of its
        prompt (its rows copied into the new extent, seq.pos set where its prefill then starts), and
        cached entries are evicted before the sequence has to wait.
        """
        entry, cached = self.prefix_cache.lookup(seq.prompt_ids, seq.cache_scope)  # now evicted last
        start = self.allocator.allocate(seq.capacity)
        while start is None and self.prefix_cache.evict_lru():
            start = self.allocator.allocate(seq.capacity)
        if start is None:
            return False
        seq.extent = start
        if entry is not None and entry in self.prefix_cache:
            self.kv.copy_rows(entry.start, entry.size, start, seq.capacity, cached)
            seq.pos = seq.cached_tokens = seq.exact_pos = cached
        return True

    # ---- leaving ----
    def release_finished(self) -> None:
        """Free the memory of sequences that ended (finished, failed or cancelled)."""
        keep = []
        for seq in self.running:
            if seq.cancelled:
                seq.finish("canceled")
            if not seq.done:
                keep.append(seq)
                continue
            try:
                self.release(seq)
            except Exception as e:  # noqa: BLE001 - the sequence has ended anyway; the loop goes on
                seq.log(logging.ERROR, "releasing a sequence's KV extent failed: %s: %s", type(e).__name__, e,
                        exc_info=True)
        self.running = keep

    def release(self, seq: Sequence) -> None:
        """Free the sequence's extent, or keep its exact KV (seq.exact_pos tokens) in the prefix cache."""
        seq.cache = None
        if seq.extent is None:
            return
        start, seq.extent = seq.extent, None
        # The last sampled token never went through the model: its KV is not there. Rows a decode
        # step wrote in a way a prefill would not (seq.exact_pos < seq.pos) are not kept either.
        keep = min(seq.pos, seq.exact_pos)
        if not self.may_cache(seq) or keep < self.prefix_cache.block:
            self.allocator.free(start, seq.capacity)
            return
        self.kv.shrink(start, seq.capacity, keep)
        self.allocator.free(start + keep, seq.capacity - keep)
        self.prefix_cache.insert(seq.tokens[:keep], start, seq.cache_scope)

    def may_cache(self, seq: Sequence) -> bool:
        """Whether the prefix cache may keep this ended sequence's KV: the cache is on, the request
        has a scope (a private request has none) and ended without an error."""
        return self.prefix_cache.max_tokens > 0 and seq.cache_scope is not None and seq.error is None

    def remove_waiting(self, seq: Sequence) -> bool:
        """Take a not-yet-admitted sequence out of the queue; False if it is not there."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True

    def abort_all(self) -> list[Sequence]:
        """Every waiting and running sequence, now out of the scheduler (the loop cannot go on)."""
        seqs = list(self.waiting) + self.running
        self.waiting.clear()
        self.running = []
        return seqs
