"""ChatGLM-6B's tokenizer over ice_text.model: THUDM's whitespace pre-processing, the [gMASK] <sop>
suffix, and decoding with THUDM's post-processing (whitespace back, half-width punctuation next to
CJK characters to full-width).

Special tokens are found by their piece in the SentencePiece model, not by number, so the same class
serves the real ice_text.model (where [gMASK] is 130001) and the tiny one glm.tiny trains.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError
from .tokenizer import load_sentencepiece, longest_piece_chars, min_tokens

MAX_BLANK = 80
NEWLINE, TAB = "<n>", "<|tab|>"
BLANKS = tuple(f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1))
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
REQUIRED_PIECES = ("[MASK]", "[gMASK]", "<sop>", "<eop>", NEWLINE, TAB) + BLANKS

_SPACES = re.compile(" {2,}")
_BLANK = re.compile(r"<\|blank_(\d+)\|>")
# ice_text.model NFKC-normalizes full-width punctuation to half-width; THUDM maps it back where it
# touches a CJK ideograph (the condition only looks at ideographs, which the mapping never changes).
_HALF = ",!:;?"
_FULL = "，！：；？"
_TO_FULL = str.maketrans(_HALF, _FULL)
_CJK = "\u4e00-\u9fff"
_PUNCT = re.compile(rf"(?<=[{_CJK}])[{re.escape(_HALF)}]|[{re.escape(_HALF)}](?=[{_CJK}])")
# Proper prefixes of the markers decode turns back into whitespace: text ending in one may still change.
_MARKER_PREFIXES = {m[:i] for m in (NEWLINE, TAB) + BLANKS for i in range(1, len(m))}
_LONGEST_MARKER = max(len(m) for m in BLANKS)


def encode_whitespace(text: str) -> str:
    """THUDM's pre-processing: newline, tab and runs of 2..80 spaces become their pieces."""
    text = text.replace("\n", NEWLINE).replace("\t", TAB)
    return _SPACES.sub(lambda m: _blank_run(len(m.group())), text)


def _blank_run(n: int) -> str:
    # THUDM replaces the longest runs first (80 down to 2): whole 80s, then the rest.
    full, rest = divmod(n, MAX_BLANK)
    return BLANKS[-1] * full + (f"<|blank_{rest}|>" if rest >= 2 else " " * rest)


def postprocess(text: str) -> str:
    """Raw SentencePiece text -> THUDM's decoded text."""
    text = text.replace(NEWLINE, "\n").replace(TAB, "\t")
    text = _BLANK.sub(lambda m: " " * int(m[1]) if 2 <= int(m[1]) <= MAX_BLANK else m[0], text)
    return _PUNCT.sub(lambda m: m[0].translate(_TO_FULL), text)


class ChatGLMTokenizer:
    """encode() gives THUDM's ids ending in [gMASK] <sop>; decode() drops every special."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.sp = load_sentencepiece(path)
        self.n_words = self.sp.vocab_size()
        unk = self.sp.unk_id()
        missing = [p for p in REQUIRED_PIECES if self.sp.piece_to_id(p) == unk]
        if missing:
            raise CheckpointError(f"{path}: not a ChatGLM-6B ice_text.model (pieces missing: "
                                  f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
        piece = self.sp.piece_to_id
        self.mask_id, self.gmask_id = piece("[MASK]"), piece("[gMASK]")
        self.sop_id, self.eos_id = piece("<sop>"), piece("<eop>")
        self.special_ids = {p: piece(p) for p in SPECIALS if piece(p) != unk}
        hidden = set(self.special_ids.values()) | {unk}
        hidden |= {i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()) if i >= 0}
        self._hidden = frozenset(hidden)
        self.piece_chars = longest_piece_chars(self.sp)

    @property
    def suffix(self) -> list[int]:
        return [self.gmask_id, self.sop_id]

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(encode_whitespace(text)) + self.suffix

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) that costs a normalization, not a tokenization: NFKC
        and whitespace folding can shorten text by any factor (a run of ideographic spaces becomes
        one), so the bound is taken on the normalized text."""
        return len(self.suffix) + min_tokens(len(self.sp.normalize(encode_whitespace(text))), self.piece_chars)

    def decode(self, ids) -> str:
        return postprocess(self.sp.decode(self.visible(ids)))

    def visible(self, ids) -> list[int]:
        return [i for i in ids if 0 <= i < self.n_words and i not in self._hidden]

    @staticmethod
    def unstable_suffix(text: str) -> int:
        """How many trailing characters of decoded text may still change when more text follows.

        A partial whitespace marker ('<|blank_1' may become 10 spaces) or a half-width punctuation
        mark (a CJK character may follow it).
        """
        for n in range(min(len(text), _LONGEST_MARKER - 1), 0, -1):
            if text[-n:] in _MARKER_PREFIXES:
                return n
        return 1 if text and text[-1] in _HALF else 0

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]] = ()) -> str:
        """THUDM's ChatGLM-6B chat format: the bare query, or rounds numbered from 0."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："
