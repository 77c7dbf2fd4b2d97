"""ChatGLM-6B (v1): conformance with THUDM's numbers (chatglm.cpp vectors) and the engine around it."""
from __future__ import annotations

import json

import pytest
import torch

import glm
from glm import ops as glm_ops
from glm.config import ChatGLMConfig
from glm.kvpool import KVCache
from glm.loader import choose_ops
from glm.model_v1 import ChatGLM, GLMBlock, TiedHead, apply_rotary_2d, attention_mask, positions_2d, rotary_2d
from glm.llm import GLM
from glm.quant import QuantLinear, dequantize
from glm.output import process_response
from devtools.tiny import write_checkpoint_v1
from devtools.vectors import VEC_CFG, hidden_state_steps, read_glm_block, read_glm_model_weights

from reference import DataReader

TOL = 5e-4


def _report(name, errors):
    print(f"{name}: max abs error per step {', '.join(f'{e:.2e}' for e in errors)}")
    assert max(errors) < TOL, f"{name}: {errors}"


def test_glm_model_vectors():
    cfg = VEC_CFG
    r = DataReader("glm_model.data")
    sd = read_glm_model_weights(r, cfg)
    with torch.device("meta"):
        model = ChatGLM(cfg, choose_ops("cpu", torch.float32))
    model.load_state_dict(sd, assign=True, strict=True)
    cache = KVCache(cfg, 8, "cpu", torch.float32)
    errors = [(got - want).abs().max().item() for got, want in hidden_state_steps(model, r, cfg, cache)]
    assert (cache.context_length, cache.mask_position) == (2, 1)
    _report("glm_model.data", errors)


def test_glm_block_vectors():
    cfg = VEC_CFG
    r = DataReader("glm_block.data")
    block = GLMBlock(cfg, 0, choose_ops("cpu", torch.float32))  # THUDM layer_id 3 only scales and unscales the scores
    block.load_state_dict(read_glm_block(r, cfg), strict=True)
    # VECTORS.md 3.6: positions [[0,1,2,2],[0,0,0,1]] = context of 3 with the mask at index 2.
    cache = KVCache(cfg, 8, "cpu", torch.float32)
    cache.context_length, cache.mask_position = 3, 2
    errors, start = [], 0
    for n in (4, 1, 1):
        x = torch.from_numpy(r.read(n, cfg.hidden_size))
        y = torch.from_numpy(r.read(n, cfg.hidden_size))
        pos, blk = positions_2d(cache, start, n)
        cos, sin = rotary_2d(cfg, pos[None], blk[None])
        with torch.inference_mode():
            out = block(x[None], cos, sin, [attention_mask(cache, start, n)], [start], [cache])[0]
        errors.append((out - y).abs().max().item())
        start += n
    r.assert_consumed()
    _report("glm_block.data", errors)


def test_positions_follow_thudm_layout():
    cache = KVCache(VEC_CFG, 8, "cpu", torch.float32)
    cache.context_length, cache.mask_position = 3, 2
    pos, blk = positions_2d(cache, 0, 6)
    assert pos.tolist() == [0, 1, 2, 2, 2, 2] and blk.tolist() == [0, 0, 0, 1, 2, 3]
    assert attention_mask(cache, 0, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert attention_mask(cache, 4, 1) is None


def test_rotary_2d_full_head_layout():
    """Head dim 128 (the .data files use 4, where every pairing coincides): dims 0..63 rotate with the
    position as pairs (j, j+32), dims 64..127 with the block position as pairs (64+j, 96+j), at
    theta_j = fp16(10000^(-j/32))."""
    cfg = ChatGLMConfig(family="chatglm", num_layers=1, hidden_size=256, num_heads=2, kv_heads=2, head_dim=128)
    pos, block = torch.tensor([[1000]]), torch.tensor([[37]])
    x = torch.randn(1, 1, 1, 128, dtype=torch.float64)
    cos, sin = rotary_2d(cfg, pos, block)
    out = apply_rotary_2d(x.float(), cos, sin)[0, 0, 0].double()
    x = x[0, 0, 0]
    for j in (0, 5, 31):
        theta = float(torch.tensor(10000.0 ** (-j / 32)).half())
        for base, p in ((0, 1000), (64, 37)):
            a, b = x[base + j], x[base + j + 32]
            c, s = torch.cos(torch.tensor(theta * p, dtype=torch.float64)), torch.sin(torch.tensor(theta * p, dtype=torch.float64))
            assert abs(out[base + j] - (a * c - b * s)) < 1e-4
            assert abs(out[base + j + 32] - (b * c + a * s)) < 1e-4


# ---- tiny THUDM-layout checkpoints through glm.load ----

# int8/int4 model vs the fp32 model of its dequantized weights, absolute on logits of magnitude
# <= ~20: the same math, up to the summation order of whichever quantized kernel runs.
QUANT_TOL = 1e-3


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory):
    return write_checkpoint_v1(tmp_path_factory.mktemp("tiny_v1"))


@pytest.fixture(scope="module")
def tiny_v1_fp16(tmp_path_factory):
    return write_checkpoint_v1(tmp_path_factory.mktemp("tiny_v1_fp16"), bits=0)


@pytest.fixture(scope="module")
def model(tiny_v1):
    return glm.load(tiny_v1)


def _dequantized_fp32(path, cfg) -> ChatGLM:
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    state = {}
    for key, t in sd.items():
        if key == "lm_head.weight" or key.endswith((".weight_scale", "inv_freq")):
            continue
        name = key.removeprefix("transformer.")
        if t.dtype == torch.int8:
            t = dequantize(t, sd[key + "_scale"], cfg.quantization_bit, torch.float32)
        state[name] = t.float()
    with torch.device("meta"):
        ref = ChatGLM(cfg, glm_ops.TorchOps())
    ref.load_state_dict(state, assign=True, strict=True)
    return ref.eval()


def test_tiny_v1_checkpoint_is_thudm_layout(tiny_v1, model):
    cfg_json = json.loads((tiny_v1 / "config.json").read_text())
    for key in ("inner_hidden_size", "position_encoding_2d", "max_sequence_length", "vocab_size", "bos_token_id",
                "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id", "quantization_bit"):
        assert key in cfg_json, key
    assert cfg_json["quantization_bit"] == 8
    tok = model.tokenizer
    assert (cfg_json["bos_token_id"], cfg_json["eos_token_id"], cfg_json["gmask_token_id"], cfg_json["mask_token_id"]) \
        == (tok.sop_id, tok.eos_id, tok.gmask_id, tok.mask_id)
    # ice_text.model's layout: <n> at 4, the specials after the learned pieces, bytes last
    sp = tok.sp
    assert sp.id_to_piece(4) == "<n>" and sp.id_to_piece(tok.sop_id) == "<sop>"
    assert [sp.id_to_piece(tok.mask_id + i) for i in range(10)] == [
        "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<|tab|>", "<|blank_2|>"]
    assert sp.id_to_piece(tok.n_words - 1) == "<0xFF>"
    sd = torch.load(tiny_v1 / "pytorch_model.bin", weights_only=True)
    assert torch.equal(sd["lm_head.weight"], sd["transformer.word_embeddings.weight"])
    qkv = sd["transformer.layers.0.attention.query_key_value.weight"]
    assert qkv.dtype == torch.int8 and "transformer.layers.1.mlp.dense_4h_to_h.bias" in sd
    assert sum(isinstance(m, QuantLinear) for m in model.model.modules()) == 4 * model.config.num_layers
    text = "你好,世界\n\tcode  here"
    assert tok.decode(tok.encode(text)) == text
    assert process_response(tok.decode(tok.encode(text))) == "你好，世界\n\tcode  here"


def test_tied_head_has_no_second_copy(model):
    names = [n for n, _ in model.model.named_parameters()] + [n for n, _ in model.model.named_buffers()]
    assert "word_embeddings.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert model.model.word_embeddings.weight.dtype == torch.float16


def test_tied_head_equals_one_matmul():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=g).half()
    x = torch.randn(2, 3, 64, generator=g)
    want = x @ w.float().t()
    tol = 1e-5 * want.abs().max().item()  # fp32 summation order differs between kernels and one matmul
    assert (TiedHead(choose_ops("cpu", torch.float32))(x, w) - want).abs().max().item() <= tol


def test_blocked_widening_equals_one_matmul(monkeypatch):
    """The fp16 head widened BLOCK_ROWS rows at a time (bf16 prefill, or no kernels): any block size,
    a partial last block included, gives the one-matmul result."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=g).half()
    bias = torch.randn(1000, generator=g)
    x = torch.randn(6, 64, generator=g)
    want = x @ w.float().t() + bias
    tol = 1e-5 * want.abs().max().item()
    for rows in (7, 256, 4096):
        monkeypatch.setattr(glm_ops, "BLOCK_ROWS", rows)
        y = glm_ops.blocked_linear(x, 1000, bias, lambda s, e, out: out.copy_(w[s:e]))
        assert y.shape == want.shape and (y - want).abs().max().item() <= tol


def test_int8_logits_match_dequantized_fp32(tiny_v1, model):
    _check_against_dequantized(tiny_v1, model)


def test_int4_logits_match_dequantized_fp32(tmp_path):
    path = write_checkpoint_v1(tmp_path, bits=4)
    model = glm.load(path)
    assert model.config.quantization_bit == 4
    _check_against_dequantized(path, model)


def _check_against_dequantized(path, model):
    ref = GLM(model.config, model.tokenizer, _dequantized_fp32(path, model.config), torch.device("cpu"))
    ids = model.tokenizer.encode(model.tokenizer.build_prompt("晚上睡不着应该怎么办", [("你好", "你好,我是 ChatGLM")]))
    got, want = model.logits(ids), ref.logits(ids)
    err = (got - want).abs().max().item()
    print(f"int{model.config.quantization_bit} vs dequantized fp32: max abs logit error {err:.2e} "
          f"(logits up to {want.abs().max():.1f})")
    assert err < QUANT_TOL


def test_tiny_cli_defaults(tmp_path):
    from devtools.tiny import main
    main(["--family", "chatglm", str(tmp_path / "v1")])
    main([str(tmp_path / "v2")])
    assert json.loads((tmp_path / "v1" / "config.json").read_text())["quantization_bit"] == 8
    assert (tmp_path / "v1" / "ice_text.model").is_file()
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_bit"] == 4
    assert (tmp_path / "v2" / "tokenizer.model").is_file()


def test_decode_steps_match_full_prefill(model):
    """Cached decode (position = mask, block position counting) equals recomputing the whole sequence."""
    tok, cfg = model.tokenizer, model.config
    ids = tok.encode("北京是中国的首都")
    cache = KVCache(cfg, len(ids) + 6, "cpu", model.dtype)
    with torch.inference_mode():
        logits = model.model(torch.tensor([ids]), [0], [cache], last_only=True)
        seq = list(ids)
        for _ in range(6):
            seq.append(int(logits[0, -1].argmax()))
            logits = model.model(torch.tensor([seq[-1:]]), [len(seq) - 1], [cache], last_only=True)
            full = model.logits(seq)[-1]
            assert (logits[0, -1] - full).abs().max().item() < 1e-4
    assert cache.context_length == len(ids) - 1 and cache.mask_position == len(ids) - 2


def test_long_prompt_prefills_in_one_pass(model):
    """A prompt longer than the engine's 256-token chunk: its bidirectional context must be seen whole."""
    tok = model.tokenizer
    ids = tok.encode("今天天气很好,我们一起去公园散步吧。" * 30)
    assert len(ids) > 300
    inner, calls = model.model.forward, []

    def forward(tokens, starts, caches, last_only=False, **kw):
        calls.append((starts[0], tokens.shape[1]))
        return inner(tokens, starts, caches, last_only, **kw)

    model.model.forward = forward
    try:
        stream = model.generate(tok.decode(ids), max_new_tokens=2, temperature=0)
        list(stream)
    finally:
        del model.model.forward
    assert stream.seq.prompt_ids == ids
    assert calls == [(0, len(ids)), (len(ids), 1)]
    assert stream.seq.tokens[len(ids)] == int(model.logits(ids)[-1].argmax())


def test_generate_streams_stops_at_eos_and_is_seeded(model):
    tok, prompt = model.tokenizer, model.tokenizer.build_prompt("你好")
    assert prompt == "你好" and model.tokenizer.stop_ids == {tok.eos_id}
    runs = []
    for _ in range(2):
        stream = model.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.9, seed=1234)
        chunks = list(stream)
        runs.append(chunks)
        new = stream.seq.tokens[len(stream.seq.prompt_ids):]
        # the stream is THUDM's stream_chat text: its process_response of the decoded reply
        assert "".join(chunks) == process_response(tok.decode(new)) and len(new) == 24
        assert stream.finish_reason == "length"
        assert len([c for c in chunks if c]) > 1  # streamed, not one block
    assert runs[0] == runs[1]

    # Make <eop> the argmax from the 4th generated token on: generation must end there, without its text.
    inner = model.model.forward
    prompt_len = len(tok.encode(prompt))

    def forward(tokens, starts, caches, last_only=False, **kw):
        logits = inner(tokens, starts, caches, last_only, **kw)
        if starts[0] + tokens.shape[1] >= prompt_len + 3:
            logits[..., tok.eos_id] = 1e4
        return logits

    model.model.forward = forward
    try:
        stream = model.generate(prompt, max_new_tokens=24, temperature=0.9, seed=7)
        text = "".join(stream)
    finally:
        del model.model.forward
    assert stream.finish_reason == "eos" and stream.new_tokens == 3
    assert text == process_response(tok.decode(stream.seq.tokens[len(stream.seq.prompt_ids):]))


def test_batched_decode_equals_solo(model):
    tok = model.tokenizer
    prompts = [tok.build_prompt("你好"), tok.build_prompt("晚上睡不着应该怎么办", [("你好", "你好!")])]
    solo = ["".join(model.generate(p, max_new_tokens=12, temperature=0.7, seed=5)) for p in prompts]
    engine = model.use_engine()  # stepped here: not the one generate() started
    seqs = [engine.submit(tok.encode(p), glm.SamplingParams(max_new_tokens=12, temperature=0.7, seed=5))
            for p in prompts]
    while engine.step():
        pass
    assert ["".join(_drain(s)) for s in seqs] == solo


def _drain(seq):
    out = []
    while (item := seq.read(timeout=0)) is not None:
        out.append(item)
    return out


def test_fp16_checkpoint_quantized_on_load(tiny_v1_fp16):
    fp16 = glm.load(tiny_v1_fp16)
    q4 = glm.load(tiny_v1_fp16, quantize=4)
    assert q4.config.quantization_bit == 4
    ids = fp16.tokenizer.encode("你好")
    a, b = fp16.logits(ids), q4.logits(ids)
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.1 * a.abs().max()
