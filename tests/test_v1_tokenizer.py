"""ChatGLM-6B (v1) tokenizer: THUDM's ids both ways, the prompt format, and streaming decode."""
from __future__ import annotations

import json
import random

import pytest

from glm.errors import CheckpointError
from glm.tokenizer import ChatGLM2Tokenizer, StreamDecoder
from glm.tokenizer_v1 import ChatGLMTokenizer, encode_whitespace, postprocess

from reference import reference_path


@pytest.fixture(scope="module")
def tok():
    return ChatGLMTokenizer(reference_path("tokenizers", "chatglm", "ice_text.model"))


@pytest.fixture(scope="module")
def tok2():
    return ChatGLM2Tokenizer(reference_path("tokenizers", "chatglm2", "tokenizer.model"))


def _cases(kind):
    cases = json.loads(reference_path("tokenizer_cases.json").read_text(encoding="utf-8"))["cases"]
    found = [c for c in cases if c["model"] == "chatglm-6b" and c["kind"] == kind]
    assert found, f"no chatglm-6b {kind} cases"
    return found


def test_encode_and_decode_cases(tok):
    for case in _cases("encode_and_decode"):
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"], case["text"]


def test_chat_prompt_cases(tok):
    for case in _cases("chat_prompt"):
        history = [tuple(turn) for turn in case["history"]]
        assert tok.build_prompt(case["query"], history) == case["text"]


def test_special_ids_and_suffix(tok):
    assert (tok.mask_id, tok.gmask_id, tok.sop_id, tok.eos_id) == (130000, 130001, 130004, 130005)
    assert tok.encode("")[-2:] == [130001, 130004]
    assert tok.decode([130001, 130004, 130005, 3, 0, 130400]) == ""


def test_whitespace_runs():
    assert encode_whitespace("a\tb\nc") == "a<|tab|>b<n>c"
    assert encode_whitespace("a" + " " * 163 + "b") == "a" + "<|blank_80|>" * 2 + "<|blank_3|>" + "b"
    assert encode_whitespace("a" + " " * 81 + "b") == "a<|blank_80|> b"
    assert postprocess("<|blank_81|><|blank_1|><|blank_80|>") == "<|blank_81|><|blank_1|>" + " " * 80


def test_full_width_punctuation():
    assert postprocess("你好,世界!ok, fine: 是? a;b 好;") == "你好，世界！ok, fine: 是？ a;b 好；"
    assert postprocess(",你,,好,") == "，你，，好，"


def test_roundtrip_whitespace_and_cjk(tok):
    text = "第一行\n\t缩进  两个空格" + " " * 100 + "end"
    assert tok.decode(tok.encode(text)) == text


def test_missing_or_wrong_model(tmp_path, tok2):
    with pytest.raises(CheckpointError):
        ChatGLMTokenizer(tmp_path / "ice_text.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        ChatGLMTokenizer(tmp_path / "bad.model")
    with pytest.raises(CheckpointError, match="ice_text.model"):  # a ChatGLM2 tokenizer lacks the v1 pieces
        ChatGLMTokenizer(reference_path("tokenizers", "chatglm2", "tokenizer.model"))


def test_unstable_suffix():
    u = ChatGLMTokenizer.unstable_suffix
    assert [u(t) for t in ("", "ab", "a,", "你，", "x<", "x<|blank_1", "x<|blank_81", "x<|tab|", "<n")] == \
        [0, 0, 1, 0, 1, 9, 0, 6, 2]


# ---- streaming ----

def _stream(tokenizer, ids):
    dec = StreamDecoder(tokenizer)
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    return chunks


def _stream_before_v1(tokenizer, ids):
    """The StreamDecoder as it was before v1 (for ChatGLM2 the chunks must stay exactly these)."""
    chunks, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 2):
        final = n == len(ids) + 1
        n = min(n, len(ids))
        done, text = tokenizer.decode(ids[prefix:read]), tokenizer.decode(ids[prefix:n])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            chunks.append("")
            continue
        prefix, read = read, n
        chunks.append(text[len(done):])
    return chunks


def _pool(tokenizer, pieces):
    ids = [tokenizer.sp.piece_to_id(p) for p in pieces]
    assert all(i != tokenizer.sp.unk_id() for i in ids), pieces
    return ids + [tokenizer.sp.unk_id()]


V1_PIECES = ["<n>", "▁", ",", ":", ";", "!", "?", "<", "|", ">", "n", "▁<", "tab", "blank", "_", "2", "8", "0",
             "1", "你", "好", "。", "a", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "[gMASK]", "<sop>", "<eop>",
             "<0xF0>", "<0x9F>", "<0x91>", "<0x8B>", "<0xE4>", "<0xBD>", "<0xA0>", "<pad>"]
V2_PIECES = ["▁", ",", "!", "?", "<", "a", "你", "好", "<0xF0>", "<0x9F>", "<0x91>", "<0x8B>", "<0xE4>",
             "<0xBD>", "<0xA0>", "</s>", "<0x0A>"]


def _random_sequences(tokenizer, pieces, n, seed):
    rng = random.Random(seed)
    pool = _pool(tokenizer, pieces)
    for _ in range(n):
        length = rng.randint(1, 40)
        yield [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(tokenizer.n_words + 20)
               for _ in range(length)]


def test_stream_v1_random(tok):
    for ids in _random_sequences(tok, V1_PIECES, 3000, seed=1):
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


def test_stream_v1_holds_lookahead(tok):
    ids = tok.encode("答案是a,你好")[:-2] + _pool(tok, ["<", "|", "blank", "_", "2", "|", ">", "好"])
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert all(not c.endswith(",") and "<" not in c for c in chunks)  # ',' became '，'; the marker two spaces


def test_stream_v2_unchanged_random(tok2):
    for ids in _random_sequences(tok2, V2_PIECES, 3000, seed=2):
        chunks = _stream(tok2, ids)
        assert "".join(chunks) == tok2.decode(ids), ids
        assert chunks == _stream_before_v1(tok2, ids), ids


# THUDM/chatglm-6b's config.json, the keys that name token ids (and what from_dict needs).
CHATGLM_6B_CONFIG = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": 130528, "hidden_size": 4096,
    "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384, "max_sequence_length": 2048,
    "layernorm_epsilon": 1e-05, "position_encoding_2d": True, "quantization_bit": 0,
    "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
    "pad_token_id": 3,
}


@pytest.mark.parametrize("keys", ["all", "none"])
def test_config_special_ids_are_the_real_tokenizers(tok, keys):
    """The v1 config's special ids (as THUDM's config.json gives them, and our defaults when a
    config.json leaves them out) are the real ice_text.model's pieces."""
    from glm.config import ChatGLMConfig

    d = dict(CHATGLM_6B_CONFIG)
    if keys == "none":
        for k in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
            del d[k]
    cfg = ChatGLMConfig.from_dict(d)
    assert cfg.family == "chatglm"
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.mask_token_id, cfg.gmask_token_id) == \
        (tok.sop_id, tok.eos_id, tok.mask_id, tok.gmask_id)
    assert tok.sp.id_to_piece(cfg.pad_token_id) == "<pad>"
