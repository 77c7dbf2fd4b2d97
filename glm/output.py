"""The engine's output stage: sampled token ids -> text in each sequence's queue.

Per token: stop ids end the sequence; otherwise the id is detokenized, the tokenizer's response
filter (if it has one) rewrites the text, stop strings cut it, and the rest goes to the reader.
A failure here ends only the sequence it happened in.
"""
from __future__ import annotations

import logging
import time

from .sampling import StopMatcher
from .sequence import Sequence
from .tokenizer import StreamDecoder


class TextOutput:
    """One sequence's text pipeline: detokenizer -> response filter -> stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer)
        self.filter = getattr(tokenizer, "response_filter", lambda: None)()
        self.stopper = StopMatcher(stop)

    def push(self, token: int) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was hit)."""
        return self.stopper.feed(self._filtered(self.decoder.push(token)))

    def flush(self) -> tuple[str, bool]:
        """The held-back rest at the end of the sequence."""
        text = self._filtered(self.decoder.flush())
        if self.filter is not None:
            text += self.filter.flush()
        text, stopped = self.stopper.feed(text)
        return (text, True) if stopped else (text + self.stopper.flush(), False)

    def _filtered(self, text: str) -> str:
        return text if self.filter is None or not text else self.filter.push(text)


class OutputStage:
    def __init__(self, tokenizer, cfg):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", {cfg.eos_token_id}))

    def open(self, seq: Sequence) -> None:
        seq.text = TextOutput(self.tokenizer, seq.params.stop)

    def postprocess(self, outcomes: list[tuple[Sequence, int | BaseException]]) -> None:
        """Each sequence's sampled token (or the error that stopped it), one at a time."""
        for seq, outcome in outcomes:
            try:
                if isinstance(outcome, BaseException):
                    self.fail(seq, outcome)
                else:
                    self.accept(seq, outcome)
            except Exception as e:  # noqa: BLE001
                self.fail(seq, e)

    def accept(self, seq: Sequence, token: int) -> None:
        if seq.done:  # cancelled while its step ran
            return
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        if token in self.stop_ids:
            self._finish(seq, "eos")
            return
        seq.tokens.append(token)
        text, stopped = seq.text.push(token)
        seq.emit(text)
        if stopped:
            seq.finish("stop")
        elif seq.new_tokens >= seq.params.max_new_tokens:
            self._finish(seq, "length")

    @staticmethod
    def fail(seq: Sequence, error: BaseException) -> None:
        if seq.fail(error):
            seq.log(logging.ERROR, "request failed: %s: %s", type(error).__name__, error,
                    exc_info=(type(error), error, error.__traceback__))

    @staticmethod
    def _finish(seq: Sequence, reason: str) -> None:
        text, stopped = seq.text.flush()
        seq.emit(text)
        seq.finish("stop" if stopped else reason)
