"""The generation loop: each step is schedule -> run -> postprocess for all active sequences together.

- schedule (glm.scheduler): which sequences prefill a prompt chunk or decode a token this step, and
  who gets KV memory; plain Python, under the engine's lock, which guards only the queues and flags.
- run (glm.runner): the forward passes and sampling, outside the lock, so `submit` and `cancel`
  never wait for a step.
- postprocess (glm.output): detokenize, stop, hand text to each sequence's reader.

Each sequence has its own sampling parameters, seed, stops and KV extent, and every row of a batched
step is computed independently, so a sequence produces the same tokens whatever runs beside it.
Failures are contained per sequence. An error that escapes a step is retried a few steps; if the
loop still cannot go on, every waiting and running request fails at once with the reason and the
engine reports itself unhealthy.

The loop is driven either by the caller (`step()`, as GLM.generate does for one stream) or by a
background thread (`start()`, for a server with many concurrent requests).
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from .errors import EngineError, InputError
from .sampling import SamplingParams
from .kvpool import KVPool
from .output import OutputStage
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("glm")

# Steps in a row that may fail outside the per-sequence containment before the loop gives up.
MAX_FAILED_STEPS = 3


def prefix_cache_tokens_from_env(default: int) -> int:
    """GLM_PREFIX_CACHE_TOKENS: most tokens of finished requests' KV kept for reuse (0 = off)."""
    raw = os.environ.get("GLM_PREFIX_CACHE_TOKENS", "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"GLM_PREFIX_CACHE_TOKENS must be an integer >= 0 (0 turns the prefix cache off), got {raw!r}")
    return value


class Engine:
    def __init__(self, model, tokenizer, cfg, device, *, max_batch: int = 8,
                 kv_budget_tokens: int | None = None, prefill_chunk: int = 256,
                 prefix_cache_tokens: int | None = None):
        """prefix_cache_tokens: cap of the prefix cache (None: GLM_PREFIX_CACHE_TOKENS, else the whole
        KV budget, since cached entries yield their memory whenever a request needs it; 0 = off).
        On, the model computes prefill rows as decode rows where it has the choice, and the cache stays
        off where cached KV would still not reproduce a recomputation bit for bit
        (model.compute_rows_exactly: ChatGLM-6B's bidirectional context, the CPU path without its kernels)."""
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        on_gpu = torch.device(device).type == "cuda"
        if on_gpu and not kv_budget_tokens:  # max_batch contexts, or what fits beside the weights
            from .gpu import memory
            kv_budget_tokens = memory.default_kv_budget(model, cfg, max_batch, prefill_chunk, device)
        self.kv_budget_tokens = kv_budget_tokens or max_batch * cfg.max_context
        if on_gpu:  # fail here, with numbers, if the budget cannot fit
            from .gpu import memory
            memory.reserve_scratch(memory.check_device(model, cfg, self.kv_budget_tokens, max_batch,
                                                       prefill_chunk, device), device)
        # The KV memory for the whole budget, allocated once; the scheduler's allocator is its bookkeeping.
        self.pool = KVPool(cfg, self.kv_budget_tokens, device, model.dtype)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = prefix_cache_tokens_from_env(self.kv_budget_tokens)
        prefix_cache_tokens = min(prefix_cache_tokens, self.kv_budget_tokens)
        if prefix_cache_tokens and not model.compute_rows_exactly():
            log.info("prefix cache off: this model's cached KV would not reproduce a recomputation exactly")
            prefix_cache_tokens = 0
        elif prefix_cache_tokens:
            log.info("prefix cache: up to %d tokens of finished requests' KV kept for reuse", prefix_cache_tokens)
        self.scheduler = Scheduler(max_batch=max_batch, kv_budget_tokens=self.kv_budget_tokens,
                                   prefill_chunk=prefill_chunk,
                                   prefill_whole=getattr(model, "prefill_in_one_pass", False),
                                   prefix_cache_tokens=prefix_cache_tokens, kv=self.pool)
        self.runner = ModelRunner(model, self.pool, device)
        self.output = OutputStage(tokenizer, cfg)
        self._lock = threading.Lock()           # the queues and flags; never held over a forward pass
        self._wakeup = threading.Condition(self._lock)
        self._step_lock = threading.Lock()      # one step at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed_steps = 0
        self.dead: BaseException | None = None  # why the loop stopped for good

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
        seq = Sequence(prompt_ids, params)
        self.output.open(seq)
        with self._wakeup:
            if self.dead is not None:
                raise EngineError(f"the engine has stopped: {self.dead!r}")
            self.scheduler.add(seq)
            self._wakeup.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End the sequence now; its memory is freed at the next step (or now, when none runs)."""
        seq.cancelled = True
        with self._wakeup:
            self.scheduler.remove_waiting(seq)
            self._wakeup.notify()
        seq.finish("canceled")
        if self._thread is None and self._step_lock.acquire(blocking=False):
            try:
                with self._lock:
                    self.scheduler.release_finished()
            finally:
                self._step_lock.release()

    def fail_if_stopped(self, seq: Sequence) -> None:
        """End `seq` with the reason if the loop has died: its reader would otherwise wait forever."""
        if self.dead is not None:
            seq.fail(EngineError(f"the engine stopped: {self.dead!r}"))

    # ---- state ----
    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def active(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def extents(self):
        return self.scheduler.allocator

    @property
    def prefix_cache(self):
        return self.scheduler.prefix_cache

    @property
    def reserved_tokens(self) -> int:
        """KV tokens held by running sequences (cached entries not counted: they yield to requests)."""
        return self.kv_budget_tokens - self.scheduler.allocator.free_tokens - self.scheduler.prefix_cache.tokens

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self.scheduler.waiting) + len(self.scheduler.running)

    @property
    def healthy(self) -> bool:
        """False once the loop has died (every request then fails at once)."""
        return self.dead is None and (self._thread is None or self._thread.is_alive() or self._stopping)

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    # ---- the loop ----
    def step(self) -> bool:
        """One iteration: schedule, run, postprocess. False when there was nothing to do."""
        with self._step_lock:
            with self._lock:
                batch = self.scheduler.schedule()
            if not batch:
                return False
            outcomes = self.runner.run(batch)
            self.output.postprocess(outcomes)
            self._recompute_replies(batch)
            return True

    def _recompute_replies(self, batch) -> None:
        """Sequences that ended in this step and will be cached with decoded rows that a prefill
        would compute differently (the Triton path): those rows recomputed as prefill now, so
        every cached row is what a fresh prefill writes (glm/prefix_cache.py)."""
        if not self.scheduler.prefix_cache.max_tokens:
            return
        for seq in batch.sequences:
            if seq.done and seq.error is None and seq.exact_pos < seq.pos:
                try:
                    self.runner.recompute_reply(seq, self.prefill_chunk)
                except Exception as e:  # noqa: BLE001 - the reply is out; only its caching is lost
                    seq.log(logging.WARNING, "recomputing the reply's KV for the prefix cache failed: %s: %s",
                            type(e).__name__, e)

    def start(self) -> None:
        """Run the loop in a daemon thread until stop()."""
        if self.dead is not None:
            raise EngineError(f"the engine has stopped: {self.dead!r}")
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="glm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step; queued and running requests stay for the next
        start() (or for callers that drive step())."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stopping = False

    def _run(self) -> None:
        try:
            while True:
                with self._wakeup:
                    while not self._stopping and not self.scheduler.has_work:
                        self._wakeup.wait()
                    if self._stopping:
                        return
                self._guarded_step()
        except BaseException as e:  # noqa: BLE001 - the loop cannot go on: say so to every request
            self._die(e)

    def _guarded_step(self) -> None:
        try:
            self.step()
            self._failed_steps = 0
        except Exception:  # noqa: BLE001
            self._failed_steps += 1
            log.exception("engine step failed (%d in a row)", self._failed_steps)
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise

    def _die(self, error: BaseException) -> None:
        log.critical("the engine loop stopped: %r; failing every queued and running request", error,
                     exc_info=(type(error), error, error.__traceback__))
        reason = EngineError(f"the engine stopped: {error!r}")
        with self._wakeup:
            self.dead = error
            seqs = self.scheduler.abort_all()
        for seq in seqs:
            seq.fail(reason)
