"""ChatGLM-6B's tokenizer over ice_text.model, giving the ids and text THUDM's tokenizer gives under
transformers 4.30.2, and THUDM's chat post-processing as a separate streaming step.

Encoding: the names of the tokens Hugging Face counts as special for this tokenizer (bos <sop>, eos
<eop>, mask [MASK], unk <unk>, pad <pad>) written in the text become those tokens, and the
whitespace around them is dropped (plain-string special tokens strip both sides); every piece of
text between them is encoded on its own (its own dummy prefix) after THUDM's whitespace
pre-processing; [gMASK] <sop> end the ids. [gMASK], [sMASK] and </s> are plain text.

Decoding: pad ids are removed, control pieces decode to nothing, <unk> to SentencePiece's " ⁇ ",
THUDM's whitespace markers turn back into whitespace, and Hugging Face's
clean_up_tokenization_spaces removes the space before . ? ! , and English contractions. The
full-width punctuation of a chat reply is not decoding: glm.output.ChatGLMResponseFilter (THUDM's
process_response) does it on the stream.

Special tokens are found by their piece in the SentencePiece model, not by number, so the same class
serves the real ice_text.model (where [gMASK] is 130001) and the tiny one devtools.tiny trains.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError
from .output import BufferedStage, ChatGLMResponseFilter, TextStages
from .tokenizer import load_sentencepiece, longest_piece_chars, min_tokens

MAX_BLANK = 80
NEWLINE, TAB = "<n>", "<|tab|>"
BLANKS = tuple(f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1))
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
REQUIRED_PIECES = ("[MASK]", "[gMASK]", "<sop>", "<eop>", NEWLINE, TAB) + BLANKS
# THUDM's tokenizer_config.json: bos, eos, mask, unk, pad (gmask_token and end_token are not HF specials).
HF_SPECIALS = ("<sop>", "<eop>", "[MASK]", "<unk>", "<pad>")
_HF_SPECIAL = re.compile("(" + "|".join(map(re.escape, HF_SPECIALS)) + ")")

_SPACES = re.compile(" {2,}")
_MARKER = re.compile("|".join(map(re.escape, (NEWLINE, TAB) + BLANKS)))
_MARKER_TEXT = {NEWLINE: "\n", TAB: "\t"} | {b: " " * n for n, b in enumerate(BLANKS, start=2)}
_MARKER_PREFIXES = {m[:i] for m in (NEWLINE, TAB) + BLANKS for i in range(1, len(m))}
_LONGEST_MARKER = max(map(len, BLANKS))
# Hugging Face's clean_up_tokenization: these replacements, one pass each, in this order.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def encode_whitespace(text: str) -> str:
    """THUDM's pre-processing: newline, tab and runs of 2..80 spaces become their pieces."""
    text = text.replace("\n", NEWLINE).replace("\t", TAB)
    return _SPACES.sub(lambda m: _blank_run(len(m.group())), text)


def _blank_run(n: int) -> str:
    # THUDM replaces the longest runs first (80 down to 2): whole 80s, then the rest.
    full, rest = divmod(n, MAX_BLANK)
    return BLANKS[-1] * full + (f"<|blank_{rest}|>" if rest >= 2 else " " * rest)


def split_specials(text: str) -> list[str]:
    """Text and special-token names alternating (odd indices: names), whitespace next to a name removed."""
    parts = _HF_SPECIAL.split(text)
    for i in range(1, len(parts), 2):
        parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
    return parts


def restore_whitespace(text: str) -> str:
    """THUDM's post-processing: <n>, <|tab|> and <|blank_2..80|> back to whitespace."""
    return _MARKER.sub(lambda m: _MARKER_TEXT[m[0]], text)


def clean_up_spaces(text: str) -> str:
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


def postprocess(text: str) -> str:
    """SentencePiece's text -> THUDM's decoded text."""
    return clean_up_spaces(restore_whitespace(text))


class ChatGLMTokenizer:
    """encode()/decode() as THUDM's tokenizer (see the module docstring)."""

    # Sampling defaults of a request that gives none (THUDM's chat() defaults for ChatGLM-6B).
    chat_defaults = {"temperature": 0.95, "top_p": 0.7}

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
        self.pad_id = piece("<pad>")
        self.special_ids = {p: piece(p) for p in SPECIALS if piece(p) != unk}
        self.hf_special_ids = {name: piece(name) for name in HF_SPECIALS}
        self.stop_ids = frozenset({self.eos_id})
        self.piece_chars = longest_piece_chars(self.sp)

    @property
    def suffix(self) -> list[int]:
        return [self.gmask_id, self.sop_id]

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(split_specials(text)):
            if i % 2:
                ids.append(self.hf_special_ids[part])
            elif part:
                ids += self.sp.encode(encode_whitespace(part))
        return ids + self.suffix

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) that costs a normalization, not a tokenization: NFKC
        and whitespace folding can shorten text by any factor (a run of ideographic spaces becomes
        one), so the bound is taken on the normalized text."""
        return len(self.suffix) + min_tokens(len(self.sp.normalize(encode_whitespace(text))), self.piece_chars)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return postprocess(self.sp_text(ids, skip_special_tokens))

    def sp_text(self, ids, skip_special_tokens: bool = False) -> str:
        """SentencePiece's text of the ids, before THUDM's post-processing (pad and unknown ids dropped)."""
        hidden = set(self.hf_special_ids.values()) if skip_special_tokens else {self.pad_id}
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words and i not in hidden])

    @staticmethod
    def postprocessor() -> TextStages:
        """Streaming postprocess(): push SentencePiece text, get the decoded text as it settles."""
        return TextStages(MarkerStage(), CleanUpStage())

    @staticmethod
    def response_filter() -> ChatGLMResponseFilter:
        """THUDM's process_response on a stream of decoded text."""
        return ChatGLMResponseFilter()

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]] = ()) -> str:
        """THUDM's ChatGLM-6B chat format: the bare query, or rounds numbered from 0."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："


class MarkerStage(BufferedStage):
    apply = staticmethod(restore_whitespace)

    @staticmethod
    def settled(text: str) -> int:
        # Markers never overlap, so only a trailing proper prefix of one can still change.
        for n in range(min(len(text), _LONGEST_MARKER - 1), 0, -1):
            if text[-n:] in _MARKER_PREFIXES:
                return len(text) - n
        return len(text)


class CleanUpStage(BufferedStage):
    """clean_up_spaces. Each replacement only deletes spaces, and a match can reach across a point
    only if the text before it ends in a proper prefix of a pattern (' ', " '", ' n', " n'", " 'v",
    " 'r"); a point after any other character splits the text into parts cleaned up independently."""

    apply = staticmethod(clean_up_spaces)

    def __init__(self):
        super().__init__()
        self.before = ""  # last character released (the one before buf)

    def push(self, text: str) -> str:
        out = super().push(text)
        if out:
            self.before = out[-1]
        return out

    def settled(self, text: str) -> int:
        for cut in range(len(text), 0, -1):
            if not self._open(text[cut - 1], text[cut - 2] if cut >= 2 else self.before):
                return cut
            # Inside a run of spaces with two more after it: no pattern holds two spaces in a row,
            # and the future can delete at most the run's last two (" ' " then " 's").
            if text[cut - 1:cut + 2] == "   ":
                return cut
        return 0

    @staticmethod
    def _open(last: str, before: str) -> bool:
        # Conservative where a space before `last` may itself be deleted by an earlier pass.
        if last == " ":
            return True
        if last == "'":
            return before in (" ", "n")
        if last == "n":
            return before == " "
        if last in ("v", "r"):
            return before in (" ", "'")
        return False
