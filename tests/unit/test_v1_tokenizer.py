"""ChatGLM-6B (v1) tokenizer: THUDM's ids both ways, the prompt format, and streaming decode."""
from __future__ import annotations

import json
import random

import pytest

from pathlib import Path

from glm.errors import CheckpointError
from glm.output import (ChatGLM3ResponseFilter, ChatGLMResponseFilter, StreamDecoder, TextStages, process_response,
                        process_response_v3)
from glm.tokenizer import ChatGLM2Tokenizer
from glm.tokenizer_v1 import (ChatGLMTokenizer, CleanUpStage, MarkerStage, clean_up_spaces,
                              encode_whitespace, restore_whitespace, split_specials)

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
    """chatglm.cpp's texts show the chat reply (full-width next to CJK); THUDM's decode gives the
    half-width marks the ids hold, and its process_response gives the full-width ones back."""
    for case in _cases("encode_and_decode"):
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"].translate(str.maketrans("，！：；？", ",!:;?")), case["text"]
        assert process_response(tok.decode(case["ids"])) == case["text"], case["text"]


def test_chat_prompt_cases(tok):
    for case in _cases("chat_prompt"):
        history = [tuple(turn) for turn in case["history"]]
        assert tok.build_prompt(case["query"], history) == case["text"]


def test_special_ids_and_suffix(tok):
    assert (tok.mask_id, tok.gmask_id, tok.sop_id, tok.eos_id, tok.pad_id) == (130000, 130001, 130004, 130005, 3)
    assert tok.stop_ids == {130005}
    assert tok.encode("")[-2:] == [130001, 130004]
    # control pieces decode to nothing, pad ids are removed, ids past the vocabulary are dropped
    assert tok.decode([130001, 130004, 130005, 130000, 1, 2, 3, 130400, -1]) == ""


# ---- THUDM's tokenizer (transformers 4.30.2) on texts beyond the public cases ----

def _thudm(kind):
    return json.loads((Path(__file__).parent / "data" / "chatglm6b_thudm_cases.json").read_text("utf-8"))[kind]


@pytest.mark.parametrize("case", _thudm("encode"), ids=lambda c: repr(c["text"])[:30])
def test_thudm_encode_cases(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["decoded"]


def test_thudm_decode_cases(tok):
    """Random id sequences: decode, decode(skip_special_tokens=True), process_response and the
    streamed text, all against THUDM's."""
    for case in _thudm("decode"):
        ids = case["ids"]
        assert tok.decode(ids) == case["decoded"], ids
        assert tok.decode(ids, skip_special_tokens=True) == case["skip"], ids
        assert process_response(case["decoded"]) == case["response"], ids
        chunks = _stream(tok, ids)
        assert "".join(chunks) == case["decoded"], ids
        reply = tok.response_filter()
        assert "".join(reply.push(c) for c in chunks) + reply.flush() == case["response"], ids


@pytest.mark.parametrize("text, ids", [
    # bos/eos/mask/unk/pad names become their ids; the whitespace on both sides goes (newlines too)
    ("a <sop> b", [104, 130004, 463]),
    ("x<eop>y", [399, 130005, 548]),
    ("<unk>\n<pad>", [0, 3]),
    ("[MASK]  z", [130000, 1075]),
    ("\u3000<sop>\u3000中文", [130004, 5, 68088]),
    # THUDM's own [gMASK], [sMASK] and </s> are plain text, as are near misses
    ("[gMASK] </s>", [53, 199, 15475, 42, 98, 106, 33]),
])
def test_special_token_names_in_text(tok, text, ids):
    assert tok.encode(text) == ids + tok.suffix
    assert split_specials("a \n<sop>\t b<eop><pad>") == ["a", "<sop>", "b", "<eop>", "", "<pad>", ""]


@pytest.mark.parametrize("text, decoded", [
    ("a , b .", "a, b."), ("Hello , world !", "Hello, world!"), ("what ?", "what?"),
    ("I 'm here", "I'm here"), ("don 't", "don 't"), ("can n't", "cann't"), ("it 's", "it's"), ("we 've", "we've"),
    ("they 're", "they're"), ("x ' y", "x'y"), ("a  ,", "a ,"),  # one pass each: one space of two goes
    ("x" + " " * 81 + ".", "x" + " " * 80 + "."),
])
def test_decode_cleans_up_spaces(tok, text, decoded):
    assert tok.decode(tok.encode(text)) == decoded


def test_unk_and_half_width(tok):
    assert tok.decode([0]) == " ⁇ " and tok.decode([0], skip_special_tokens=True) == ""
    assert tok.decode([74874, 0, 74874]) == "你好 ⁇ 你好"
    ids = tok.encode("你好，世界！问：好？")
    assert tok.decode(ids) == "你好,世界!问:好?"  # ice_text.model's NFKC: the ids hold half-width marks
    assert process_response(tok.decode(ids)) == "你好，世界！问：好？"


def test_whitespace_runs():
    assert encode_whitespace("a\tb\nc") == "a<|tab|>b<n>c"
    assert encode_whitespace("a" + " " * 163 + "b") == "a" + "<|blank_80|>" * 2 + "<|blank_3|>" + "b"
    assert encode_whitespace("a" + " " * 81 + "b") == "a<|blank_80|> b"
    assert restore_whitespace("<|blank_81|><|blank_1|><|blank_02|><|blank_80|>") == \
        "<|blank_81|><|blank_1|><|blank_02|>" + " " * 80


def test_process_response():
    assert process_response("  你好,世界!ok, fine: 是? a;b 好; \n") == "你好，世界！ok, fine: 是？ a;b 好；"
    assert process_response(",你,,好,") == "，你，，好，"
    assert process_response("[[训练时间]],训练于[[训练时间]]") == "2023年，训练于2023年"


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
             "<0xF0>", "<0x9F>", "<0x91>", "<0x8B>", "<0xE4>", "<0xBD>", "<0xA0>", "<pad>", ".", "'", "▁'", "s",
             "m", "t", "ve", "re", "▁n", "▁v", "v", "r"]
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


def test_stream_v1_holds_what_may_change(tok):
    ids = tok.encode("答案是a ,你好")[:-2] + _pool(tok, ["<", "|", "blank", "_", "2", "|", ">", "好"])[:-1]
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == "答案是a,你好  好"
    assert all("<" not in c for c in chunks)  # the marker came out as two spaces, never in parts
    assert not any(c.endswith("a ") for c in chunks)  # the space before ',' was held, then removed


TEXT_ALPHABET = [" ", "'", "n", "t", "m", "s", "v", "e", "r", ".", "?", "!", ",", "x", "你", ":", ";", "\n", "\t",
                 "[[训练时间]]", "[", "]", "训练", "时间", "<n>", "<", "|", "blank_", "2", "8", "|>", "\u3000"]


@pytest.mark.parametrize("make, whole", [
    (lambda: TextStages(MarkerStage(), CleanUpStage()), lambda s: clean_up_spaces(restore_whitespace(s))),
    (ChatGLMResponseFilter, process_response),
    (ChatGLM3ResponseFilter, process_response_v3),
], ids=["decode-postprocess", "chatglm-response", "chatglm3-response"])
def test_text_stages_equal_the_whole_text_function(make, whole):
    """However the text is cut into chunks, the streamed output is the function of the whole text."""
    rng = random.Random(3)
    for _ in range(20000):
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(0, 25)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        f = make()
        assert "".join(f.push(c) for c in chunks) + f.flush() == whole(text), (text, chunks)


def test_long_whitespace_is_released_as_it_comes():
    """A run of spaces waits only for its last two (the most the next text can delete), so a reply of
    blanks streams, and costs no more per token than its own text."""
    stages = ChatGLMTokenizer.postprocessor()
    outs = [stages.push("<|blank_80|>") for _ in range(1000)]
    assert all(len(o) >= 78 for o in outs)
    text = "".join(outs) + stages.push(" ' s") + stages.flush()
    assert text == clean_up_spaces(" " * 80000 + " ' s") == " " * 79999 + "'s"


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
    assert (cfg.bos_token_id, cfg.mask_token_id, cfg.gmask_token_id) == (tok.sop_id, tok.mask_id, tok.gmask_id)
    assert tok.sp.id_to_piece(cfg.pad_token_id) == "<pad>"
