"""THUDM's chat post-processing of a decoded reply (process_response) as streaming output steps.

THUDM's chat()/stream_chat() show process_response(tokenizer.decode(ids)); a filter here turns the
stream of decoded text into the stream of that. Each is built from text stages whose push() returns
only text that no later input can change, and flush() the rest, so the chunks add up exactly to
process_response of the whole text.
"""
from __future__ import annotations

import re

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


class TextStages:
    """Stages applied in order; push(text) -> settled output, flush() -> the rest."""

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
