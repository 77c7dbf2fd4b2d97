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
engine reports itself unhealthy. So does a step that runs longer than `step_timeout_s` (a stuck
kernel, a deadlock): a watchdog thread sees it, logs the step's shape, fails every request and
marks the engine unhealthy, so the platform's health check restarts the process.

Prefix-cache scopes (glm.prefix_cache): a request with a cache key reuses only what requests with
the same key left; one without a key reuses and leaves nothing, unless the deployment shares one
scope among all keyless requests (prefix_cache_scope="shared", GLM_PREFIX_CACHE_SCOPE=shared: for
a single tenant, where every client may see what the others' prompts cost).

The loop runs in one thread, started by `start()` (GLM.generate starts it with the first request);
readers only wait for what it produces. `step()` is what that thread calls: a test may call it on an
engine it never starts, to take the loop one step at a time.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import prefix_cache, settings
from .errors import EngineError, InputError, sticky_device_error
from .sampling import SamplingParams
from .kvpool import KVPool
from .output import OutputStage
from .runner import ModelRunner
from .scheduler import Batch, Scheduler
from .sequence import Sequence

log = logging.getLogger("glm")

# Steps in a row that may fail outside the per-sequence containment before the loop gives up.
MAX_FAILED_STEPS = 3


SCOPES = ("private", "shared")
# A step computes one prompt chunk and one token per sequence: seconds even for a 6B model on a
# CPU, well under one on a GPU (where the first steps also compile kernels). Longer means stuck.
STEP_TIMEOUT_S = {"cpu": 600.0, "cuda": 180.0}
# With the default KV budget every admitted request fits at once; a smaller budget makes requests
# queue for memory, and this long is as long as a client is made to wait without a token.
KV_WAIT_S = 300.0


class StepTimeout(EngineError):
    """A step ran longer than the watchdog's bound; the engine is unhealthy."""


@dataclass(frozen=True)
class EngineConfig:
    """A deployment's engine settings; a None field takes the engine's default for its model and device.

    kv_budget_tokens: KV memory for every running sequence together (None: max_batch contexts, on a
    GPU at most what fits beside the weights). prefix_cache_tokens: cap of the prefix cache (None:
    the whole budget, since cached entries yield their memory whenever a request needs it; 0: off).
    prefix_cache_scope: what keyless requests share, "private" (nothing) or "shared" (one scope).
    step_timeout_s, kv_wait_s: the watchdog's bound on one step (None: per device) and the longest
    a request waits for KV memory.
    """
    max_batch: int = 8
    kv_budget_tokens: int | None = None
    prefill_chunk: int = 256
    prefix_cache_tokens: int | None = None
    prefix_cache_scope: str = "private"
    step_timeout_s: float | None = None
    kv_wait_s: float = KV_WAIT_S

    def __post_init__(self):
        if self.prefix_cache_scope not in SCOPES:
            raise ValueError(f"prefix_cache_scope must be one of {', '.join(SCOPES)}, got {self.prefix_cache_scope!r}")

    @classmethod
    def from_env(cls, **given) -> "EngineConfig":
        """The settings a deployment makes in its environment, `given` fields over them:
        GLM_KV_BUDGET_TOKENS, GLM_PREFIX_CACHE_TOKENS, GLM_PREFIX_CACHE_SCOPE, GLM_STEP_TIMEOUT_SECONDS,
        GLM_KV_WAIT_SECONDS (glm.settings: a value it cannot use raises, naming the variable)."""
        env = dict(kv_budget_tokens=settings.integer("GLM_KV_BUDGET_TOKENS", None, at_least=1),
                   prefix_cache_tokens=settings.integer("GLM_PREFIX_CACHE_TOKENS", None, at_least=0),
                   prefix_cache_scope=settings.choice("GLM_PREFIX_CACHE_SCOPE", "private", SCOPES),
                   step_timeout_s=settings.number("GLM_STEP_TIMEOUT_SECONDS", None, above=True),
                   kv_wait_s=settings.number("GLM_KV_WAIT_SECONDS", KV_WAIT_S, above=True))
        return cls(**(env | given))


class Engine:
    def __init__(self, model, tokenizer, cfg, device, config: EngineConfig | None = None, **fields):
        """config (default: EngineConfig()) with `fields` replacing some of its values. With the prefix
        cache on, every step computes prefill rows as decode rows (model.ops.rows_exactly); the cache
        stays off where cached KV would still not reproduce a recomputation bit for bit
        (model.exact_kv_reuse: ChatGLM-6B's bidirectional context, the CPU path without its kernels)."""
        config = replace(config or EngineConfig(), **fields)
        self.config = config
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        device_type = torch.device(device).type
        max_batch, prefill_chunk = config.max_batch, config.prefill_chunk
        kv_budget_tokens, prefix_cache_tokens = config.kv_budget_tokens, config.prefix_cache_tokens
        self.shared_scope = config.prefix_cache_scope == "shared"
        self.step_timeout_s = config.step_timeout_s or STEP_TIMEOUT_S.get(device_type, STEP_TIMEOUT_S["cpu"])
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        on_gpu = device_type == "cuda"
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
            prefix_cache_tokens = self.kv_budget_tokens
        prefix_cache_tokens = min(prefix_cache_tokens, self.kv_budget_tokens)
        if prefix_cache_tokens and not model.exact_kv_reuse:
            log.info("prefix cache off: this model's cached KV would not reproduce a recomputation exactly")
            prefix_cache_tokens = 0
        elif prefix_cache_tokens:
            log.info("prefix cache: up to %d tokens of finished requests' KV kept for reuse by requests of the "
                     "same scope (%s)", prefix_cache_tokens,
                     "keyless requests share one" if self.shared_scope else "a cache key; keyless requests share nothing")
        # This engine's steps compute rows exactly (and only its steps: the setting is the ops').
        self.exact_rows = bool(prefix_cache_tokens)
        self.scheduler = Scheduler(max_batch=max_batch, kv_budget_tokens=self.kv_budget_tokens,
                                   prefill_chunk=prefill_chunk, prefill_whole=model.prefill_whole,
                                   prefix_cache_tokens=prefix_cache_tokens, kv=self.pool, max_wait_s=config.kv_wait_s)
        self.runner = ModelRunner(model, self.pool, device, max_batch)
        self.output = OutputStage(tokenizer)
        self._lock = threading.Lock()           # the queues and flags; never held over a forward pass
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._thread_stop = threading.Event()   # the running thread's own: set by stop()
        self._failed_steps = 0
        self.dead: BaseException | None = None  # why the loop stopped for good
        self._running_step: tuple[float, Batch] | None = None  # (start, batch) while a step computes
        self._watchdog: threading.Thread | None = None
        # Called with each step's batch before its forward pass: tests inject a fault here (a hang);
        # only code in this process can set it.
        self.before_run: Callable[[Batch], None] | None = None

    def warm_up(self) -> None:
        """Compile every kernel variant the engine will launch and capture the decode graphs (GPU),
        before the first request: setup calls this once, before start()."""
        if self.threaded:
            raise EngineError("warm_up() runs before the engine loop starts (start())")
        with self.model.ops.rows_exactly(self.exact_rows):
            log.info("%s", self.runner.prepare(self.prefill_chunk))

    # ---- requests ----
    def cache_scope(self, cache_key: str | None) -> int | None:
        """The prefix-cache scope of a request with this key (None: it shares nothing)."""
        if cache_key:
            return prefix_cache.key_scope(cache_key)
        return prefix_cache.SHARED_SCOPE if self.shared_scope else None

    def submit(self, prompt_ids: list[int], params: SamplingParams, cache_key: str | None = None) -> Sequence:
        """Queue a request. cache_key: the client's secret for its conversation; the request reuses only
        prefix-cache entries that requests with the same key left (see the module docstring)."""
        params = params.validate().with_seed()
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.cfg.max_context:
            raise InputError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                             f"{need} exceeds the model's context of {self.cfg.max_context} tokens")
        if need > self.kv_budget_tokens:
            raise InputError(f"request needs {need} tokens of KV cache, more than this server's budget of "
                             f"{self.kv_budget_tokens}; lower max_new_tokens or shorten the prompt")
        seq = Sequence(prompt_ids, params, self.cache_scope(cache_key))
        self.output.open(seq)
        with self._wakeup:
            if self.dead is not None:
                raise EngineError(f"the engine has stopped: {self.dead!r}")
            self.scheduler.add(seq)
            self._wakeup.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End the sequence now; its memory is freed at the next step."""
        seq.cancelled = True
        with self._wakeup:
            self.scheduler.remove_waiting(seq)
            self._wakeup.notify()
        seq.finish("canceled")

    def drain(self, seconds: float) -> int:
        """A server's shutdown: let queued and running requests end within `seconds`, then cancel the
        rest; returns how many were cancelled."""
        deadline = time.monotonic() + seconds
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = [seq for seq in (*self.scheduler.waiting, *self.scheduler.running) if not seq.done]
        for seq in left:
            self.cancel(seq)
        return len(left)

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
        """False once the loop has died or a step has hung (every request then fails at once)."""
        thread = self._thread
        return self.dead is None and (thread is None or thread.is_alive())

    @property
    def threaded(self) -> bool:
        """Whether the loop runs (start() until stop())."""
        return self._thread is not None

    # ---- the loop ----
    def step(self) -> bool:
        """One iteration: schedule, run, postprocess. False when there was nothing to do. Once the
        loop runs, only its thread steps (two steps at once would share the runner's buffers)."""
        thread = self._thread
        if thread is not None and threading.current_thread() is not thread:
            raise EngineError("step() is the engine thread's while the loop runs (stop() it first)")
        with self._lock:
            batch = self.scheduler.schedule()
        if not batch:
            return False
        self._running_step = (time.monotonic(), batch)
        try:
            if self.before_run is not None:
                self.before_run(batch)
            with self.model.ops.rows_exactly(self.exact_rows):
                outcomes = self.runner.run(batch)
                self.output.postprocess(outcomes)  # which sequences ended: their replies' rows next
                self._recompute_replies(batch)
        except Exception as e:
            if sticky_device_error(e):  # the device can run nothing more: health says so at once
                self._die(e)
            raise
        finally:
            self._running_step = None
        return True

    def _recompute_replies(self, batch) -> None:
        """Sequences that ended in this step and will be cached with decoded rows that a prefill
        would compute differently (the Triton path): those rows recomputed as prefill now, so
        every cached row is what a fresh prefill writes (glm/prefix_cache.py)."""
        for seq in batch.sequences:
            if seq.done and seq.exact_pos < seq.pos and self.scheduler.may_cache(seq):
                try:
                    self.runner.recompute_reply(seq, self.prefill_chunk)
                except Exception as e:  # noqa: BLE001 - the reply is out; only its caching is lost
                    seq.log(logging.WARNING, "recomputing the reply's KV for the prefix cache failed: %s: %s",
                            type(e).__name__, e)

    def start(self) -> None:
        """Run the loop in a daemon thread (and its watchdog) until stop(); a no-op while it runs.
        Safe to call from any thread: concurrent first requests start one loop."""
        with self._wakeup:
            if self.dead is not None:
                raise EngineError(f"the engine has stopped: {self.dead!r}")
            if self._thread is not None:
                return
            self._thread_stop = stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(stop,), name="glm-engine", daemon=True)
            self._watchdog = threading.Thread(target=self._watch, args=(stop,), name="glm-watchdog", daemon=True)
            self._thread.start()
            self._watchdog.start()

    def stop(self) -> None:
        """Stop the thread after its current step; queued and running requests stay for the next start()."""
        with self._wakeup:
            thread, watchdog, self._thread, self._watchdog = self._thread, self._watchdog, None, None
            self._thread_stop.set()
            self._wakeup.notify_all()
        for t in (thread, watchdog):
            if t is not None and t is not threading.current_thread():
                t.join()

    def _run(self, stop: threading.Event) -> None:
        try:
            while True:
                with self._wakeup:
                    while not stop.is_set() and not self.scheduler.has_work:
                        self._wakeup.wait()
                    if stop.is_set():
                        return
                self._guarded_step()
                if self.dead is not None:  # the watchdog gave up on the step that just returned
                    return
        except BaseException as e:  # noqa: BLE001 - the loop cannot go on: say so to every request
            if self.dead is None:
                self._die(e)

    def _guarded_step(self) -> None:
        try:
            self.step()
            self._failed_steps = 0
        except Exception:  # noqa: BLE001
            if self.dead is not None:
                raise
            self._failed_steps += 1
            log.exception("engine step failed (%d in a row)", self._failed_steps)
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise

    def _watch(self, stop: threading.Event) -> None:
        """The watchdog: a step that runs past step_timeout_s stops the engine (see the module docstring)."""
        interval = min(0.25, self.step_timeout_s / 4)
        while self.dead is None and not stop.wait(interval):
            running = self._running_step
            if running is None:
                continue
            started, batch = running
            elapsed = time.monotonic() - started
            if elapsed > self.step_timeout_s and self._running_step is running:
                self._die(StepTimeout(
                    f"a step has run {elapsed:.1f}s, longer than the {self.step_timeout_s:g}s bound "
                    f"(GLM_STEP_TIMEOUT_SECONDS) ({batch.shape()}); the engine is stuck and reports itself "
                    f"unhealthy"))

    def _die(self, error: BaseException) -> None:
        with self._wakeup:
            if self.dead is not None:
                return
            self.dead = error
            seqs = self.scheduler.abort_all()
        log.critical("the engine loop stopped: %r; failing every queued and running request", error,
                     exc_info=(type(error), error, error.__traceback__))
        reason = EngineError(f"the engine stopped: {error!r}")
        for seq in seqs:
            seq.fail(reason)
