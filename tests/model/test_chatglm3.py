"""ChatGLM3-6B: its tokenizer against golden ids, checkpoint detection, and generation that stops at
its stop tokens and streams THUDM's process_response text."""
from __future__ import annotations

import json

import pytest

import glm
from glm.config import ChatGLMConfig
from devtools.tiny import write_checkpoint
from glm.output import StreamDecoder, process_response_v3
from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from reference import reference_path


@pytest.fixture(scope="module")
def tok():
    return ChatGLM3Tokenizer(reference_path("tokenizers", "chatglm2", "tokenizer.model"))


def cases(kind):
    data = json.loads(reference_path("tokenizer_cases.json").read_text(encoding="utf-8"))
    found = [c for c in data["cases"] if c["model"] == "chatglm3-6b" and c["kind"] == kind]
    assert found, kind
    return found


def chat_text(messages) -> str:
    """THUDM's build_chat_input as text: <|role|> + metadata line + content per message, then <|assistant|>."""
    return "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages) + "<|assistant|>"


def test_special_ids_stops_and_defaults(tok):
    assert [tok.special_ids[r] for r in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")] == \
        [64794, 64795, 64796, 64797]
    assert tok.stop_ids == {2, 64795, 64797}
    assert ChatGLM3Tokenizer.chat_defaults == {"temperature": 0.8, "top_p": 0.8}


def test_encode_case(tok):
    (case,) = cases("encode")
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", cases("chat_template_ids"), ids=lambda c: str(len(c["messages"])))
def test_chat_prompt_golden_ids(tok, case):
    assert tok.encode(chat_text(case["messages"])) == case["ids"]


def test_build_prompt_is_the_chat_format(tok):
    (_, two_turns, _) = cases("chat_template_ids")
    user, assistant, query = (m["content"] for m in two_turns["messages"])
    prompt = ChatGLM3Tokenizer.build_prompt(query, [(user, assistant)])
    assert prompt == f"<|user|>\n{user}<|assistant|>\n{assistant}<|user|>\n{query}<|assistant|>"
    assert tok.encode(prompt) == two_turns["ids"]
    assert ChatGLM3Tokenizer.build_prompt("你好") == "<|user|>\n你好<|assistant|>"


def test_text_before_roles_and_metadata_line(tok):
    plain = ChatGLM2Tokenizer(reference_path("tokenizers", "chatglm2", "tokenizer.model"))
    assert tok.encode("你好") == plain.encode("你好")  # no role token: as ChatGLM2
    # a tool call's metadata line ("get_weather\n") is encoded apart from its message
    ids = tok.encode("<|assistant|>get_weather\n```python\ntool_call()\n```")
    assert ids == tok.prefix + [64796] + tok.sp.encode("get_weather\n") + tok.sp.encode("```python\ntool_call()\n```")


def test_decode_drops_role_tokens(tok):
    # role tokens hide; the message keeps the space of its own dummy prefix, as sp.decode gives it
    assert tok.decode(tok.encode(chat_text([{"role": "user", "content": "你好"}]))) == "\n 你好"


def test_response_filter():
    assert process_response_v3("\n 你好👋！[[训练时间]] \n") == "你好👋！2023年"
    assert process_response_v3("get_weather\n{'city': 'x'}") == "get_weather\n{'city': 'x'}"  # a tool call as is
    f = ChatGLM3Tokenizer.response_filter()
    assert [f.push(c) for c in ("\n", " 你", "好 ", "\n")] + [f.flush()] == ["", "你", "好", "", ""]


# ---- checkpoint detection ----

# THUDM/chatglm3-6b's config.json and tokenizer_config.json as published (keys that matter here).
CHATGLM3_CONFIG = {
    "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "add_bias_linear": False, "add_qkv_bias": True, "ffn_hidden_size": 13696, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "torch_dtype": "float16",
    "transformers_version": "4.30.2", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}
CHATGLM3_TOKENIZER_CONFIG = {"name_or_path": "THUDM/chatglm3-6b", "remove_space": False, "do_lower_case": False,
                             "tokenizer_class": "ChatGLMTokenizer"}


def _config_dir(tmp_path, config, **files):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (tmp_path / name.replace("__", ".")).write_text(text)
    return ChatGLMConfig.from_file(tmp_path / "config.json")


def test_detects_published_chatglm3(tmp_path):
    cfg = _config_dir(tmp_path, CHATGLM3_CONFIG, tokenizer_config__json=json.dumps(CHATGLM3_TOKENIZER_CONFIG))
    assert cfg.family == "chatglm3" and cfg.max_context == 8192 and cfg.kv_heads == 2


@pytest.mark.parametrize("files", [
    {"tokenizer_config__json": json.dumps(CHATGLM3_TOKENIZER_CONFIG)},  # a renamed config.json
    {"tokenization_chatglm__py": 'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]'},
], ids=["tokenizer_config", "tokenizer_code"])
def test_detects_chatglm3_from_tokenizer_files(tmp_path, files):
    config = dict(CHATGLM3_CONFIG, _name_or_path="/data/my-model")
    assert _config_dir(tmp_path, config, **files).family == "chatglm3"


def test_chatglm2_stays_chatglm2(tmp_path):
    config = dict(CHATGLM3_CONFIG, _name_or_path="THUDM/chatglm2-6b", seq_length=32768)
    tok_config = dict(CHATGLM3_TOKENIZER_CONFIG, name_or_path="THUDM/chatglm2-6b")
    cfg = _config_dir(tmp_path, config, tokenizer_config__json=json.dumps(tok_config),
                      tokenization_chatglm__py='special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]')
    assert cfg.family == "chatglm2"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert ChatGLMConfig.from_file(tmp_path / "config.json").family == "chatglm2"


# ---- the tiny chatglm3 checkpoint ----

@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("chatglm3-6b"), chatglm3=True)
    return glm.load(path, device="cpu")


def test_tiny_checkpoint_layout(tiny3):
    tok = tiny3.tokenizer
    assert tiny3.config.family == "chatglm3" and isinstance(tok, ChatGLM3Tokenizer)
    assert tiny3.config.max_context == 8192 and tiny3.config.vocab_size >= tok.n_words + 9
    assert tok.stop_ids == {2, tok.n_words + 6, tok.n_words + 8}


def _forcing(model, token: int, when):
    """The model's forward with `token` made the argmax of the last position when when(end) holds
    (end: the number of tokens in the cache after the call)."""
    inner = model.model.forward

    def forward(tokens, starts, caches, last_only=False, **kw):
        logits = inner(tokens, starts, caches, last_only, **kw)
        if when(starts[0] + tokens.shape[1]):
            logits[..., token] = 1e4
        return logits
    return forward


@pytest.mark.parametrize("role", ["<|user|>", "<|observation|>"])
def test_generation_stops_at_role_tokens(tiny3, role):
    tok = tiny3.tokenizer
    prompt = tok.build_prompt("你好")
    prompt_len = len(tok.encode(prompt))
    tiny3.model.forward = _forcing(tiny3, tok.special_ids[role], lambda end: end >= prompt_len + 3)
    try:
        stream = tiny3.generate(prompt, max_new_tokens=24, temperature=0.9, seed=7)
        text = "".join(stream)
    finally:
        del tiny3.model.forward
    assert stream.finish_reason == "eos" and stream.new_tokens == 3
    assert text == process_response_v3(tok.decode(stream.seq.tokens[prompt_len:]))


def test_stream_is_process_response_of_the_reply(tiny3):
    """The reply starts with a newline (its blank metadata line, as the real model's does): the
    stream is the stripped text after it, as THUDM's stream_chat shows."""
    tok = tiny3.tokenizer
    prompt = tok.build_prompt("你好")
    prompt_len = len(tok.encode(prompt))
    newline = tok.sp.piece_to_id("<0x0A>")
    tiny3.model.forward = _forcing(tiny3, newline, lambda end: end == prompt_len)  # the first token only
    try:
        stream = tiny3.generate(prompt, max_new_tokens=12, temperature=0, seed=1)
        chunks = list(stream)
    finally:
        del tiny3.model.forward
    new = stream.seq.tokens[prompt_len:]
    reply = tok.decode(new)
    assert new[0] == newline and reply.startswith("\n") and len(reply.strip()) > 3
    assert "".join(chunks) == process_response_v3(reply) == reply.strip()


def test_stream_decoder_unchanged_for_chatglm3(tok):
    ids = tok.encode(chat_text([{"role": "user", "content": "你好👋 ok"}]))
    d = StreamDecoder(tok)
    assert "".join([d.push(i) for i in ids] + [d.flush()]) == tok.decode(ids) == "\n 你好👋 ok"
