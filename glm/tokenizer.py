"""ChatGLM2's SentencePiece tokenizer with its special tokens, prompt builder and streaming decoder."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import CheckpointError

# THUDM's SPTokenizer numbers its specials right after the SentencePiece vocabulary (64789 at full size).
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # the last four: ChatGLM3


def load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing tokenizer file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with a terse text
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from None
    return sp


def longest_piece_chars(sp: spm.SentencePieceProcessor) -> int | None:
    """Most characters of normalized text one token can cover, or None when there is no such bound.

    Pieces that text can match are the normal and user-defined ones; byte pieces cover one byte
    at most. Without byte fallback, a run of unknown characters may become a single <unk>.
    """
    ids = range(sp.get_piece_size())
    if not any(sp.is_byte(i) for i in ids):
        return None
    return max(len(sp.id_to_piece(i)) for i in ids
               if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)))


def min_tokens(text_chars: int, piece_chars: int | None) -> int:
    """A lower bound on the tokens of normalized text of `text_chars` characters."""
    return 0 if piece_chars is None else -(-text_chars // piece_chars)


class ChatGLM2Tokenizer:
    """encode() gives THUDM's ids including the [gMASK] sop prefix; decode() drops every special."""

    def __init__(self, path: str | Path):
        self.sp = load_sentencepiece(Path(path))
        self.n_words = self.sp.vocab_size()
        self.special_ids = {name: self.n_words + i for i, name in enumerate(CHATGLM2_SPECIALS)}
        self.gmask_id = self.special_ids["[gMASK]"]
        self.sop_id = self.special_ids["sop"]
        self.eos_id = self.sp.eos_id()
        # THUDM's decode maps pad/unk, bos and eos to "" as well as the specials.
        self._hidden = {self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()}
        self.piece_chars = longest_piece_chars(self.sp)

    @property
    def prefix(self) -> list[int]:
        return [self.gmask_id, self.sop_id]

    def encode(self, text: str) -> list[int]:
        return self.prefix + self.sp.encode(text)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), without tokenizing: ChatGLM2's normalizer is the
        identity (one input character, one normalized character), so no token covers more input
        characters than the longest piece has."""
        return len(self.prefix) + min_tokens(len(text), self.piece_chars)

    def decode(self, ids) -> str:
        return self.sp.decode(self.visible(ids))

    def visible(self, ids) -> list[int]:
        return [i for i in ids if 0 <= i < self.n_words and i not in self._hidden]

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]] = ()) -> str:
        """THUDM's ChatGLM2 chat format: rounds numbered from 1."""
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, start=1))
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


class StreamDecoder:
    """Turns generated ids into text chunks whose concatenation is exactly tokenizer.decode(ids).

    Text is released only when it ends in a complete character, so the byte-fallback pieces of one
    character (emoji, rare CJK) come out together; a tokenizer whose decoding looks ahead (ChatGLM-6B:
    a half-width ',' becomes '，' if a CJK character follows) names its still-unstable trailing
    characters with `unstable_suffix(text)`, and those are held back too.

    Each step decodes a short window ids[prefix:] and releases its characters past `sent`. After a
    release the window moves up to the ids of the previous release, when the new window's text is
    the tail of the old one (SentencePiece drops the leading space of a window's first piece; that
    space was released already) and everything before the new start is released: it then decodes
    to the same characters whatever follows.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.unstable = getattr(tokenizer, "unstable_suffix", None)
        self.ids: list[int] = []
        self.prefix = 0   # window start
        self.read = 0     # len(ids) at the last release: the next window start
        self.sent = 0     # characters of decode(ids[prefix:]) released

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text (a dangling partial character comes out as U+FFFD, as decode gives)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") and not final:
            return ""
        end = len(text) if final or self.unstable is None else len(text) - self.unstable(text)
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        self._slide(text)
        return out

    def _slide(self, text: str) -> None:
        tail = self.tok.decode(self.ids[self.read:])
        skip = len(text) - len(tail)
        # An empty tail may be leading spaces that a longer window still drops (ice_text.model drops
        # them all, not just the first piece's).
        if tail and skip <= self.sent and text.endswith(tail):
            self.prefix, self.sent = self.read, self.sent - skip
        self.read = len(self.ids)
