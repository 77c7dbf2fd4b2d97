"""One request as the engine sees it: its tokens, its place in the KV pool, its sampling state, and
the queue of text it hands to its reader.

Written by the engine's thread, read by one reader (a Stream) in any thread: the reader's surface is
`read`, `on_output`, `done` and the finish details (prompt_ids, tokens, new_tokens, cached_tokens,
params, finish_reason, peak_batch, t_submit / t_first / t_done); everything else is the engine's.
"""
from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time

from .sampling import SamplingParams

log = logging.getLogger("glm")

_END = object()  # queued last: no more text follows


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, cache_scope: int | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cache_scope = cache_scope  # its prefix-cache scope (glm.prefix_cache); None: shares nothing
        self.tokens = list(prompt_ids)
        self.sampling = None            # its generator and seen tokens on the model's device (glm.sampling.RowState), the runner's
        self.pos = 0                    # tokens already in the KV cache: the next prefill starts here
        self.cached_tokens = 0          # prompt tokens whose KV came from the prefix cache
        self.exact_pos = 0              # leading tokens whose KV is what a prefill computes (cacheable)
        self.extent: int | None = None  # start of its tokens in the engine's KV pool while admitted
        self.cache = None               # its KVCache (a view of the pool), made by the runner
        self.text = None                # its detokenizer / stop state, the output stage's
        self.cancelled = False
        self.overtaken = 0              # later requests admitted while it waited at the head of the queue
        self.peak_batch = 0             # most sequences decoded in one step with this one
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        # The submitter's context: log lines about this request reach the submitter's logs
        # (a server routes a prediction's output by a context variable).
        self.context = contextvars.copy_context()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._listener = None
        self._finish_lock = threading.Lock()

    # ---- sizes and state ----
    @property
    def capacity(self) -> int:
        """KV tokens it can ever need: the size of its extent."""
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

    # ---- the reader's side ----
    def read(self, timeout: float | None = None) -> str | None:
        """The next text chunk, or None once the sequence has ended; raises the sequence's error if
        it failed, and queue.Empty when nothing came within `timeout` seconds (0: do not wait)."""
        item = self._chunks.get_nowait() if timeout == 0 else self._chunks.get(timeout=timeout)
        if item is _END:
            self._chunks.put(_END)  # a reader that asks again gets the end again
            if self.error is not None:
                raise self.error
            return None
        return item

    def on_output(self, callback) -> None:
        """Call `callback()` (from the engine's thread) after each chunk and at the end."""
        self._listener = callback
        if not self._chunks.empty():
            self._notify()

    # ---- the engine's side ----
    def emit(self, text: str) -> None:
        if text and not self.done:
            self._chunks.put(text)
            self._notify()

    def finish(self, reason: str, error: BaseException | None = None) -> bool:
        """End the sequence once: the first reason wins; False if it had ended already."""
        with self._finish_lock:
            if self.done:
                return False
            self.error = error
            self.finish_reason = reason
            self.t_done = time.perf_counter()
        self._chunks.put(_END)
        self._notify()
        return True

    def fail(self, error: BaseException) -> bool:
        return self.finish("error", error)

    def log(self, level: int, msg: str, *args, exc_info=None) -> None:
        """A log line about this request, routed to its submitter's logs."""
        self.context.run(log.log, level, msg, *args, exc_info=exc_info)

    def _notify(self) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            listener()
        except Exception:  # noqa: BLE001 - a reader's wake-up must never hurt the engine or others
            log.warning("a stream's wake-up callback failed", exc_info=True)
