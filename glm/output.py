"""The text output path: a generated token's way to the reader's text, and the engine's postprocess.

Per token, in one direction: a stop id ends the sequence (tokenizer.stop_ids); otherwise the id goes
through the sequence's stages -- the detokenizer (StreamDecoder), the family's response filter
(THUDM's process_response on a stream) and the stop strings (StopMatcher) -- and what comes out goes
to the reader. Every stage releases only text that no later input can change (push) and the rest at
the end (flush), so the chunks add up exactly to the whole text's result.

A tokenizer declares what is its own: `sp_text(ids)` and `postprocessor()` (its decode of ids, as
SentencePiece text and the streaming post-processing that turns it into decode's text),
`response_filter()` and `stop_ids`. A failure here ends only the sequence it happened in.
"""
from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence


# ---- the stage frame ----

class TextStages:
    """Stages applied in order; push(text) -> settled output, flush() -> the rest. With no stages
    the text passes unchanged (a tokenizer with no post-processing, a family with no filter)."""

    def __init__(self, *stages):
        self.stages = stages

    def push(self, text: str) -> str:
        for s in self.stages:
            text = s.push(text)
        return text

    def flush(self) -> str:
        text = ""
        for s in self.stages:
            text = s.push(text) + s.flush()
        return text


class BufferedStage:
    """A text function applied to the text up to the last point no later text can reach across."""

    def __init__(self):
        self.buf = ""

    def push(self, text: str) -> str:
        self.buf += text
        cut = self.settled(self.buf)
        out, self.buf = self.apply(self.buf[:cut]), self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.apply(self.buf), ""
        return out


# ---- the detokenizer ----

class StreamDecoder:
    """Turns generated ids into text chunks whose concatenation is exactly tokenizer.decode(ids).

    Text is released only when it ends in a complete character, so the byte-fallback pieces of one
    character (emoji, rare CJK) come out together. The tokenizer gives the SentencePiece text of ids
    (`sp_text`) and the rest of its decode as a streaming `postprocessor()` (ChatGLM-6B: whitespace
    markers, clean-up of spaces; it holds back what the next token may still change), which has no
    stages where decode is SentencePiece's text (ChatGLM2/3).

    Each step decodes a short window ids[prefix:] and releases its characters past `sent`. After a
    release the window moves up to the ids of the previous release, when the new window's text is
    the tail of the old one (SentencePiece drops the leading space of a window's first piece; that
    space was released already) and everything before the new start is released: it then decodes
    to the same characters whatever follows.
    """

    def __init__(self, tokenizer):
        self.decode = tokenizer.sp_text
        self.post = tokenizer.postprocessor()
        self.ids: list[int] = []
        self.prefix = 0   # window start
        self.read = 0     # len(ids) at the last release: the next window start
        self.sent = 0     # characters of decode(ids[prefix:]) released

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._post(self._release(final=False), final=False)

    def flush(self) -> str:
        """The rest of the text (a dangling partial character comes out as U+FFFD, as decode gives)."""
        return self._post(self._release(final=True), final=True)

    def _post(self, text: str, final: bool) -> str:
        text = self.post.push(text)
        return text + self.post.flush() if final else text

    def _release(self, final: bool) -> str:
        text = self.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") and not final:
            return ""
        if len(text) <= self.sent:
            return ""
        out, self.sent = text[self.sent:], len(text)
        self._slide(text)
        return out

    def _slide(self, text: str) -> None:
        tail = self.decode(self.ids[self.read:])
        skip = len(text) - len(tail)
        # An empty tail may be leading spaces that a longer window still drops (ice_text.model drops
        # them all, not just the first piece's).
        if tail and skip <= self.sent and text.endswith(tail):
            self.prefix, self.sent = self.read, self.sent - skip
        self.read = len(self.ids)


# ---- response filters: THUDM's chat post-processing (process_response) ----
# THUDM's chat()/stream_chat() show process_response(tokenizer.decode(ids)); a filter turns the
# stream of decoded text into the stream of that.

# ChatGLM-6B: half-width ,!:;? next to a CJK ideograph become full-width.
_HALF, _FULL = ",!:;?", "，！：；？"
_TO_FULL = str.maketrans(_HALF, _FULL)
_CJK = "\u4e00-\u9fff"
_PUNCT = re.compile(rf"(?<=[{_CJK}])[{re.escape(_HALF)}]|[{re.escape(_HALF)}](?=[{_CJK}])")
TRAINING_TIME = ("[[训练时间]]", "2023年")


def full_width(text: str) -> str:
    return _PUNCT.sub(lambda m: m[0].translate(_TO_FULL), text)


def process_response(text: str) -> str:
    """ChatGLM-6B's process_response on the whole text at once."""
    return full_width(text.strip().replace(*TRAINING_TIME))


def process_response_v3(text: str) -> str:
    """ChatGLM3-6B's process_response for a plain reply: a blank metadata line dropped, the content
    stripped; a reply whose first line names a tool stays as it is."""
    metadata, newline, content = text.partition("\n")
    if not newline or metadata.strip():
        return text
    return content.strip().replace(*TRAINING_TIME)


class StripStage:
    """str.strip() of the whole text: leading whitespace dropped, trailing whitespace held until
    more text follows (and dropped at the end)."""

    def __init__(self):
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body):]
        return out

    def flush(self) -> str:
        self.held = ""
        return ""


class ReplaceStage(BufferedStage):
    """str.replace(old, new), holding back a trailing proper prefix of `old`."""

    def __init__(self, old: str, new: str):
        super().__init__()
        self.old, self.new = old, new

    def apply(self, text: str) -> str:
        return text.replace(self.old, self.new)

    def settled(self, text: str) -> int:
        for n in range(min(len(text), len(self.old) - 1), 0, -1):
            if self.old.startswith(text[-n:]):
                return len(text) - n
        return len(text)


class FullWidthStage:
    """full_width(): a half-width mark waits for the character after it."""

    def __init__(self):
        self.before = ""  # last character released
        self.held = ""

    def push(self, text: str) -> str:
        text = self.held + text
        if not text:
            return ""
        cut = len(text) - 1 if text[-1] in _HALF else len(text)
        self.held = text[cut:]
        return self._convert(text[:cut])

    def flush(self) -> str:
        text, self.held = self.held, ""
        return self._convert(text)

    def _convert(self, text: str) -> str:
        if not text:
            return ""
        out = full_width(self.before + text + self.held[:1])
        out = out[len(self.before):len(out) - len(self.held[:1])]
        self.before = out[-1]
        return out


class ChatGLMResponseFilter(TextStages):
    """ChatGLM-6B's process_response: strip, [[训练时间]] -> 2023年, full-width punctuation."""

    def __init__(self):
        super().__init__(StripStage(), ReplaceStage(*TRAINING_TIME), FullWidthStage())


class ChatGLM3ResponseFilter:
    """ChatGLM3-6B's process_response (process_response_v3) on a stream: the first line is held until
    its newline arrives to see whether it is a blank metadata line."""

    def __init__(self):
        self.head = ""
        self.rest: TextStages | None = None

    def push(self, text: str) -> str:
        if self.rest is None:
            self.head += text
            metadata, newline, content = self.head.partition("\n")
            if not newline:
                return ""
            if metadata.strip():  # a tool call: shown as generated
                self.rest, text = TextStages(), self.head
            else:
                self.rest, text = TextStages(StripStage(), ReplaceStage(*TRAINING_TIME)), content
            self.head = ""
        return self.rest.push(text)

    def flush(self) -> str:
        if self.rest is None:
            out, self.head = self.head, ""
            return out
        return self.rest.flush()


# ---- stop strings ----

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


# ---- the stages of one sequence, and the engine's postprocess ----

class TextOutput:
    """One sequence's stages: detokenizer -> response filter -> stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer)
        self.filter = tokenizer.response_filter()
        self.stopper = StopMatcher(stop)

    def push(self, token: int) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was hit)."""
        return self.stopper.feed(self._filtered(self.decoder.push(token)))

    def flush(self) -> tuple[str, bool]:
        """The held-back rest at the end of the sequence."""
        text = self._filtered(self.decoder.flush()) + self.filter.flush()
        text, stopped = self.stopper.feed(text)
        return (text, True) if stopped else (text + self.stopper.flush(), False)

    def _filtered(self, text: str) -> str:
        return self.filter.push(text) if text else ""


class OutputStage:
    """The engine's postprocess: each sampled token to its sequence's stages, or the end of it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(tokenizer.stop_ids)

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
