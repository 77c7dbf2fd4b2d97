"""ChatGLM2's and ChatGLM3's SentencePiece tokenizers with their special tokens, stop ids, prompt
builders and the response filter each family's chat applies (glm.output streams the text)."""
from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from .errors import CheckpointError
from .output import ChatGLM3ResponseFilter, TextStages

# THUDM's SPTokenizer numbers its specials right after the SentencePiece vocabulary (64789 at full size).
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # the last four: ChatGLM3
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_ROLE = re.compile("(" + "|".join(map(re.escape, ROLES)) + ")")


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

    # Sampling defaults of a request that gives none.
    chat_defaults = {"temperature": 0.75, "top_p": 0.8}

    def __init__(self, path: str | Path):
        self.sp = load_sentencepiece(Path(path))
        self.n_words = self.sp.vocab_size()
        self.special_ids = {name: self.n_words + i for i, name in enumerate(CHATGLM2_SPECIALS)}
        self.gmask_id = self.special_ids["[gMASK]"]
        self.sop_id = self.special_ids["sop"]
        self.eos_id = self.sp.eos_id()
        # THUDM's decode maps pad/unk, bos and eos to "" as well as the specials.
        self._hidden = {self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()}
        self.stop_ids = frozenset({self.eos_id})
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

    # decode is SentencePiece's text: no post-processing stage (glm.output.StreamDecoder)
    sp_text = decode
    postprocessor = staticmethod(TextStages)

    def visible(self, ids) -> list[int]:
        return [i for i in ids if 0 <= i < self.n_words and i not in self._hidden]

    @staticmethod
    def response_filter() -> TextStages:
        """No filter: the stream is the decoded text."""
        return TextStages()

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]] = ()) -> str:
        """THUDM's ChatGLM2 chat format: rounds numbered from 1."""
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, start=1))
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B: ChatGLM2's SentencePiece model and specials, with the role tokens.

    A prompt is text in THUDM's chat format, `<|role|>{metadata}\\n{message}` per message, ending in
    `<|assistant|>`. encode() gives the ids THUDM's build_chat_input gives for it: each role name
    becomes its token, and the metadata line (up to and including the first newline) and the message
    are encoded separately. Text before the first role token is encoded as one piece of text.
    Generation stops at eos, <|user|> (the next turn) and <|observation|> (a tool call's result).
    """

    chat_defaults = {"temperature": 0.8, "top_p": 0.8}  # THUDM's chat()

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.stop_ids = frozenset({self.eos_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"]})

    def encode(self, text: str) -> list[int]:
        parts = _ROLE.split(text)
        ids = self.sp.encode(parts[0])
        for role, body in zip(parts[1::2], parts[2::2]):
            metadata, newline, message = body.partition("\n")
            ids += [self.special_ids[role]] + self.sp.encode(metadata + newline) + self.sp.encode(message)
        return self.prefix + ids

    @staticmethod
    def response_filter() -> ChatGLM3ResponseFilter:
        """THUDM's process_response on a stream of decoded text."""
        return ChatGLM3ResponseFilter()

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]] = ()) -> str:
        """THUDM's ChatGLM3 chat format (build_chat_input) as text."""
        prompt = "".join(f"<|user|>\n{q}<|assistant|>\n{r}" for q, r in history)
        return prompt + f"<|user|>\n{query}<|assistant|>"

