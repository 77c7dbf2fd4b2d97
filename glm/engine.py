"""The generation loop: every step runs one forward pass for all active sequences together.

New sequences join at the next step; their prompt is prefilled in chunks between decode steps so
running streams keep flowing; finished or cancelled ones leave and free their KV cache. Each
sequence has its own sampling parameters, seed, stops and cache, and every row of a batched step
is computed independently of the others (per-sequence attention, row-independent kernels), so a
sequence produces the same tokens whatever runs beside it.

The loop is driven either by the caller (`step()`, as GLM.generate does for one stream) or by a
background thread (`start()`, for a server with many concurrent requests).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import torch

from .errors import InputError
from .generate import SamplingParams, StopMatcher, sample
from .kvpool import ExtentAllocator, KVPool
from .tokenizer import StreamDecoder

log = logging.getLogger("glm")

_DONE = object()


class Sequence:
    """One request: its tokens, cache, sampling state and the queue of text it produces."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_ids: set[int]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokens = list(prompt_ids)
        self.eos_ids = eos_ids
        self.generator = torch.Generator().manual_seed(params.seed)
        self.decoder = StreamDecoder(tokenizer)
        self.stopper = StopMatcher(params.stop)
        self.cache = None               # its KVCache (a view of the engine's pool) while admitted
        self.extent: int | None = None  # start of its extent in the pool
        self.pos = 0                    # tokens already in the cache
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()
        self.on_chunk = None            # called (from the engine thread) after each put: wakes async readers
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.peak_batch = 0             # most sequences decoded in one step with this one

    @property
    def capacity(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int) -> None:
        """Sample-time bookkeeping for a new token; may finish the sequence."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.eos_ids:
            self._finish("eos")
            return
        self.tokens.append(token)
        text, stopped = self.stopper.feed(self.decoder.push(token))
        self._emit(text)
        if stopped:
            self._finish("stop")
        elif self.new_tokens >= self.params.max_new_tokens:
            self._finish("length")

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._finish("error", flush=False)

    def _finish(self, reason: str, flush: bool = True) -> None:
        if flush and reason != "stop":
            text, stopped = self.stopper.feed(self.decoder.flush())
            self._emit(text)
            if stopped:
                reason = "stop"
            else:
                self._emit(self.stopper.flush())
        self.finish_reason = reason
        self.t_done = time.perf_counter()
        self.cache = None
        self._put(_DONE)

    def _emit(self, text: str) -> None:
        if text:
            self._put(text)

    def _put(self, item) -> None:
        self.chunks.put(item)
        if self.on_chunk is not None:
            self.on_chunk()


class Engine:
    def __init__(self, model, tokenizer, cfg, device, *, max_batch: int = 8,
                 kv_budget_tokens: int | None = None, prefill_chunk: int = 256):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.max_batch = max_batch
        self.kv_budget_tokens = kv_budget_tokens or max_batch * cfg.max_context
        self.prefill_chunk = prefill_chunk
        self.eos_ids = {cfg.eos_token_id}
        if torch.device(device).type == "cuda":  # fail here, with numbers, if the budget cannot fit
            from .gpu import memory
            memory.check_device(model, cfg, self.kv_budget_tokens, max_batch, prefill_chunk, device)
        # The KV memory for the whole budget, allocated once; the allocator is its bookkeeping.
        self.pool = KVPool(cfg, self.kv_budget_tokens, device, model.dtype)
        self.extents = ExtentAllocator(self.kv_budget_tokens)
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- requests ----
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        params = params.validate().with_seed()
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.cfg.max_context:
            raise InputError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                             f"{need} exceeds the model's context of {self.cfg.max_context} tokens")
        if need > self.kv_budget_tokens:
            raise InputError(f"request needs {need} tokens of KV cache, more than this server's budget of "
                             f"{self.kv_budget_tokens}; lower max_new_tokens or shorten the prompt")
        seq = Sequence(prompt_ids, params, self.tokenizer, self.eos_ids)
        with self._wakeup:
            self.waiting.append(seq)
            self._wakeup.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves at the next step, or now when no thread runs the loop."""
        seq.cancelled = True
        with self._wakeup:
            if self._thread is None:
                self._reap()
            self._wakeup.notify()

    @property
    def reserved_tokens(self) -> int:
        return self.kv_budget_tokens - self.extents.free_tokens

    # ---- the loop ----
    def step(self) -> bool:
        """One iteration: admit, prefill one chunk, decode one token for every running sequence."""
        with self._lock, torch.inference_mode():
            self._reap()
            self._admit()
            if not self.active:
                return False
            prefill = next((s for s in self.active if s.prefilling), None)
            if prefill is not None:
                self._guarded([prefill], self._prefill_chunk)
            running = [s for s in self.active if not s.prefilling and not s.done and not s.cancelled]
            if running:
                self._guarded(running, self._decode)
            self._reap()
            return True

    def start(self) -> None:
        """Run the loop in a daemon thread until stop()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self.waiting and not self.active:
                    self._wakeup.wait()
                if self._stopping:
                    return
            self.step()

    def _reap(self) -> None:
        for s in self.active:
            if s.cancelled and not s.done:
                s._finish("canceled", flush=False)
            if s.done and s.extent is not None:
                self.extents.free(s.extent, s.capacity)
                s.extent = None
        self.active = [s for s in self.active if not s.done]
        if any(s.cancelled for s in self.waiting):  # anywhere in the queue, not only at its head
            for s in self.waiting:
                if s.cancelled:
                    s._finish("canceled", flush=False)
            self.waiting = deque(s for s in self.waiting if not s.done)

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting[0]
            start = self.extents.allocate(seq.capacity)
            if start is None:
                break  # waits for memory; first come, first served
            self.waiting.popleft()
            seq.extent, seq.cache = start, self.pool.cache(start, seq.capacity)
            self.active.append(seq)

    def _guarded(self, seqs: list[Sequence], fn) -> None:
        # A failure (out of memory, a bug) fails the requests involved, never the loop.
        try:
            fn(seqs)
        except Exception as e:  # noqa: BLE001
            log.exception("generation step failed for %d sequence(s)", len(seqs))
            for s in seqs:
                if not s.done:
                    s.fail(e)

    def _prefill_chunk(self, seqs: list[Sequence]) -> None:
        (seq,) = seqs
        # Chunk boundaries depend only on the sequence itself, so results do too. ChatGLM-6B's
        # context attends in both directions, so its prompt can only be prefilled whole.
        chunk = len(seq.prompt_ids) if getattr(self.model, "prefill_in_one_pass", False) else self.prefill_chunk
        end = min(seq.pos + chunk, len(seq.prompt_ids))
        tokens = torch.tensor([seq.prompt_ids[seq.pos:end]], device=self.device)
        logits = self.model(tokens, [seq.pos], [seq.cache], last_only=True)
        seq.pos = end
        if not seq.prefilling:
            self._sample([seq], logits[:, -1])

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        logits = self.model(tokens, [s.pos for s in seqs], [s.cache for s in seqs], last_only=True)
        for s in seqs:
            s.pos += 1
            s.peak_batch = max(s.peak_batch, len(seqs))
        self._sample(seqs, logits[:, -1])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        logits = logits.float().cpu()
        for s, row in zip(seqs, logits):
            history = torch.tensor(s.tokens) if s.params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
            s.accept(sample(row, history, s.params, s.generator))
