"""ChatGLM2's real tokenizer against golden ids, the prompt builder, and the streaming decoder."""
from __future__ import annotations

import json
import random

import pytest

from glm.output import StreamDecoder
from glm.tokenizer import ChatGLM2Tokenizer
from reference import reference_path


@pytest.fixture(scope="module")
def tok():
    return ChatGLM2Tokenizer(reference_path("tokenizers", "chatglm2", "tokenizer.model"))


def cases(model, kind):
    data = json.loads(reference_path("tokenizer_cases.json").read_text(encoding="utf-8"))
    return [c for c in data["cases"] if c["model"] == model and c["kind"] == kind]


def test_special_token_ids(tok):
    assert tok.n_words == 64789
    assert [tok.special_ids[s] for s in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == [64789, 64790, 64791, 64792, 64793]
    assert tok.eos_id == 2


@pytest.mark.parametrize("case", cases("chatglm2-6b", "encode_and_decode"), ids=lambda c: c["text"][:20])
def test_golden_ids_both_ways(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["text"]


def test_chatglm3_encode_case(tok):
    (case,) = cases("chatglm3-6b", "encode")
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", cases("chatglm2-6b", "chat_prompt"), ids=lambda c: str(len(c["history"])))
def test_prompt_builder(case):
    assert ChatGLM2Tokenizer.build_prompt(case["query"], [tuple(h) for h in case["history"]]) == case["text"]


def test_decode_drops_every_special(tok):
    ids = tok.encode("你好") + [tok.eos_id, 64793, 64795, 0, 1]
    assert tok.decode(ids) == "你好"


def stream(tok, ids, chunking=1):
    d = StreamDecoder(tok)
    chunks = [d.push(i) for i in ids] + [d.flush()]
    return [c for c in chunks if c]


TEXTS = ["你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你。",
         "  leading spaces,   runs   of spaces\n\n\tand tabs",
         "𠀀𪚥𬺓 rare CJK, 🤖🧑‍🚀🇨🇳 emoji with ZWJ and flags",
         "def f(x):\n    return x  # 注释 comment",
         " Hello world", "trailing space & newline \n"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_a_real_encoding_is_exact_and_never_splits_a_character(tok, text):
    ids = tok.encode(text)[2:]
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)
    # byte-fallback emoji pieces arrive as whole characters
    assert any(len(c.encode()) >= 4 for c in chunks) or not any(ord(ch) > 0xFFFF for ch in text)


def test_stream_matches_decode_for_random_id_sequences(tok):
    rng = random.Random(0)
    pool = sorted({i for t in TEXTS for i in tok.encode(t)[2:]}) + [30910, 13, 2, 64790, 0]
    pool += list(range(3, 259))  # every byte piece, including lone continuation bytes
    for _ in range(2000):
        ids = [rng.choice(pool) if rng.random() < 0.85 else rng.randrange(64794) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_stream_holds_partial_character_until_complete(tok):
    d = StreamDecoder(tok)
    emoji = [243, 162, 148, 142]  # 👋 as four byte pieces
    assert [d.push(i) for i in emoji[:3]] == ["", "", ""]
    assert d.push(emoji[3]) == "👋"


def test_missing_tokenizer_file_is_a_checkpoint_error(tmp_path):
    from glm.errors import CheckpointError
    with pytest.raises(CheckpointError, match="tokenizer.model: missing tokenizer file"):
        ChatGLM2Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        ChatGLM2Tokenizer(tmp_path / "tokenizer.model")
