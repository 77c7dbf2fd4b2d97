"""Make a small random-weight ChatGLM2 (or ChatGLM-6B) checkpoint in exactly THUDM's on-disk layout.

    python -m devtools.tiny OUTDIR [--family chatglm2|chatglm3|chatglm] [--bits 4|8|0] [--layers N] [--full-size] [--device cuda]

Deterministic (fixed seeds, fixed corpus) and written in seconds: config.json, a SentencePiece
tokenizer.model trained locally on devtools/data/tiny_corpus.txt, and pytorch_model.bin with int8-packed
`weight` + `weight_scale` for the quantized linears, fp16 for everything else. It is what the
tests, the demo and CI run on when no real weights are present. `--full-size` writes ChatGLM2-6B's
shapes with random int4 codes (for benchmarks; speed does not depend on the values) and needs a
real tokenizer.model via --tokenizer.

`--family chatglm3` writes the same model as ChatGLM3-6B is published: config.json named
THUDM/chatglm3-6b with its 8K rotary cache, and tokenizer_config.json.

`--family chatglm` writes the first generation instead (int8 by default): a config.json with
chatglm-6b's keys, an ice_text.model trained the same way with THUDM's special pieces laid out as in
the real one (see train_tokenizer_v1), and THUDM's v1 tensor names including the tied lm_head.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from glm.config import ChatGLMConfig
from glm.loader import QUANTIZED_LINEARS
from glm.quant import quantize

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, multi_query_group_num=2, kv_channels=16,
            ffn_hidden_size=160, seq_length=32768)  # as the real config: rotary cache 32K, context 8K
FULL = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, multi_query_group_num=2, kv_channels=128,
            ffn_hidden_size=13696, seq_length=32768, padded_vocab_size=65024)


def train_tokenizer(out: Path, vocab_size: int = 1000) -> None:
    """A byte-fallback BPE SentencePiece model with the real one's normalizer settings."""
    import sentencepiece as spm

    text = CORPUS.read_text(encoding="utf-8")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines() * 4), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    out.write_bytes(buf.getvalue())


TINY_V1 = dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=256, max_sequence_length=2048)
FULL_V1 = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384,
               max_sequence_length=2048, vocab_size=130528)


def train_tokenizer_v1(out: Path, vocab_size: int = 1000) -> None:
    """A unigram SentencePiece model with ice_text.model's settings and piece layout.

    As in the real model: unk/<s>/</s>/<pad> at 0..3, <n> at 4, the learned pieces, then the control
    specials ([MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>), <|tab|>, <|blank_2..80|>,
    and the 256 byte pieces last. Pieces keep their scores, so moving them changes only their ids.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from glm.tokenizer_v1 import BLANKS, NEWLINE, SPECIALS, TAB, encode_whitespace

    lines = [encode_whitespace(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True, remove_extra_whitespaces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=[NEWLINE, TAB, *BLANKS], control_symbols=list(SPECIALS),
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    model = pb.ModelProto()
    model.ParseFromString(buf.getvalue())
    pieces = list(model.pieces)
    by_name = {p.piece: p for p in pieces}
    tail = [by_name[n] for n in (*SPECIALS, TAB, *BLANKS)]
    learned = [p for p in pieces[4:] if p.type == pb.ModelProto.SentencePiece.NORMAL]
    byte_pieces = [p for p in pieces if p.type == pb.ModelProto.SentencePiece.BYTE]
    order = pieces[:4] + [by_name[NEWLINE]] + learned + tail + byte_pieces
    assert len(order) == len(pieces)
    copies = [type(p)() for p in order]
    for c, p in zip(copies, order):
        c.CopyFrom(p)
    del model.pieces[:]
    model.pieces.extend(copies)
    out.write_bytes(model.SerializeToString())


def config_json_v1(shape: dict, vocab: int, bits: int, specials: dict[str, int]) -> dict:
    """chatglm-6b's config.json keys; the special ids are where the tokenizer has them."""
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "bos_token_id": specials["<sop>"], "eos_token_id": specials["<eop>"],
        "mask_token_id": specials["[MASK]"], "gmask_token_id": specials["[gMASK]"], "pad_token_id": 3,
        "layernorm_epsilon": 1e-05, "position_encoding_2d": True, "pre_seq_len": None,
        "prefix_projection": False, "quantization_bit": bits, "quantization_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.27.1", "use_cache": True,
        "vocab_size": vocab, **shape,
    }


def normal_fp16(g: torch.Generator, *shape, std: float = 0.02) -> torch.Tensor:
    """Drawn on the generator's device (a GPU draws a full-size checkpoint in moments), returned on the CPU."""
    return (torch.randn(*shape, generator=g, device=g.device) * std).half().cpu()


def rotary_inv_freq(dim: int) -> torch.Tensor:
    """The rotary embedding's inverse frequencies THUDM stores (a buffer the loader recomputes)."""
    return (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half()


def random_linear(key: str, n: int, k: int, bits: int, g: torch.Generator, random_codes: bool) -> dict:
    """One block linear's tensors: fp16 N(0, 0.02) weights, THUDM-quantized when bits is set
    (random_codes: int codes and scales drawn directly, fast at 6B size)."""
    if bits and random_codes:
        codes = torch.randint(-128, 128, (n, k * bits // 8), generator=g, dtype=torch.int8, device=g.device)
        return {key + ".weight": codes.cpu(),
                key + ".weight_scale": (torch.rand(n, generator=g, device=g.device) * 0.004 + 0.001).half().cpu()}
    w = (torch.randn(n, k, generator=g) * 0.02).half()
    if not bits:
        return {key + ".weight": w}
    q, scale = quantize(w, bits)
    return {key + ".weight": q, key + ".weight_scale": scale}


def random_state_dict_v1(cfg: ChatGLMConfig, bits: int, seed: int = 0, random_codes: bool = False,
                         device: str = "cpu") -> dict:
    """THUDM's v1 tensor names (all four block linears with biases; lm_head a copy of the embeddings).
    device: where the random numbers are drawn (the tensors are returned on the CPU)."""
    g = torch.Generator(device).manual_seed(seed)
    normal = partial(normal_fp16, g)
    h, p = cfg.hidden_size, "transformer.layers"
    sd = {"transformer.word_embeddings.weight": normal(cfg.vocab_size, h, std=0.5)}
    # [out, in] of each quantized linear (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
    shapes = dict(zip(QUANTIZED_LINEARS["chatglm"], [(3 * cfg.q_size, h), (h, cfg.q_size),
                                                     (cfg.ffn_hidden_size, h), (h, cfg.ffn_hidden_size)]))
    for i in range(cfg.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{i}.{norm}.weight"] = (1 + normal(h, std=0.1).float()).half()
            sd[f"{p}.{i}.{norm}.bias"] = normal(h, std=0.1)
        sd[f"{p}.{i}.attention.rotary_emb.inv_freq"] = rotary_inv_freq(cfg.head_dim // 2)
        for name, (n, k) in shapes.items():
            key = f"{p}.{i}.{name}"
            sd |= random_linear(key, n, k, bits, g, random_codes)
            sd[key + ".bias"] = normal(n, std=0.1)
    # Random signs: with the output tied to the embeddings, a near-identity final norm would make
    # the model repeat its input token (the residual stream is dominated by it).
    sd["transformer.final_layernorm.weight"] = normal(h, std=1.0)
    sd["transformer.final_layernorm.bias"] = normal(h, std=0.1)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()
    return sd


def config_json(shape: dict, vocab: int, bits: int, rope_ratio: float | None = None) -> dict:
    """chatglm2-6b's config.json keys."""
    cfg = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
        "original_rope": True, "post_layer_norm": True, "rmsnorm": True, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.27.1", "use_cache": True,
        "eos_token_id": 2, "pad_token_id": 0, "padded_vocab_size": vocab, **shape,
    }
    if bits:
        cfg["quantization_bit"] = bits
    if rope_ratio:
        cfg["rope_ratio"] = rope_ratio
    return cfg


def chatglm3_files(cfg: dict) -> dict[str, str]:
    """What tells a chatglm3-6b checkpoint from chatglm2-6b, as THUDM publishes it: config.json's
    name and 8K rotary cache, and tokenizer_config.json (name and THUDM's tokenizer class)."""
    cfg.update({"_name_or_path": "THUDM/chatglm3-6b", "seq_length": 8192})
    tok_cfg = {"name_or_path": "THUDM/chatglm3-6b", "remove_space": False, "do_lower_case": False,
               "tokenizer_class": "ChatGLMTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    return {"tokenizer_config.json": json.dumps(tok_cfg, indent=2) + "\n"}


def random_state_dict(cfg: ChatGLMConfig, bits: int, seed: int = 0, random_codes: bool = False,
                      device: str = "cpu") -> dict:
    """THUDM-named tensors. random_codes: draw int4/int8 codes directly (fast at 6B size).
    device: where the random numbers are drawn (the tensors are returned on the CPU)."""
    g = torch.Generator(device).manual_seed(seed)
    normal = partial(normal_fp16, g)
    h, p = cfg.hidden_size, "transformer.encoder.layers"
    sd = {"transformer.embedding.word_embeddings.weight": normal(cfg.vocab_size, h, std=1.0)}
    sd["transformer.rotary_pos_emb.inv_freq"] = rotary_inv_freq(cfg.head_dim // 2)
    # [out, in] of each quantized linear (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
    qkv, *_ = names = QUANTIZED_LINEARS["chatglm2"]
    shapes = dict(zip(names, [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size),
                              (2 * cfg.ffn_hidden_size, h), (h, cfg.ffn_hidden_size)]))
    for i in range(cfg.num_layers):
        sd[f"{p}.{i}.input_layernorm.weight"] = (1 + normal(h, std=0.1).float()).half()
        sd[f"{p}.{i}.post_attention_layernorm.weight"] = (1 + normal(h, std=0.1).float()).half()
        for name, (n, k) in shapes.items():
            sd |= random_linear(f"{p}.{i}.{name}", n, k, bits, g, random_codes)
        sd[f"{p}.{i}.self_attention.query_key_value.bias"] = normal(shapes[qkv][0], std=0.1)
    sd["transformer.encoder.final_layernorm.weight"] = (1 + normal(h, std=0.1).float()).half()
    sd["transformer.output_layer.weight"] = normal(cfg.vocab_size, h, std=1.0 / h ** 0.5 * 4)
    return sd


@contextmanager
def staged(out: str | Path):
    """A temporary directory inside `out` whose files move into `out` once all of them are written,
    so an interrupted run never leaves a partial checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-"))
    try:
        yield tmp
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place_tokenizer(dest: Path, given: str | Path | None, full_size: bool, train, what: str) -> None:
    """The given tokenizer model, or one trained on the tiny corpus (a full-size model needs the real one)."""
    if given:
        shutil.copyfile(given, dest)
    elif full_size:
        raise SystemExit(f"--full-size needs --tokenizer PATH (a real {what})")
    else:
        train(dest)


def write_checkpoint(out: str | Path, *, bits: int = 4, full_size: bool = False, layers: int | None = None,
                     tokenizer: str | Path | None = None, rope_ratio: float | None = None, seed: int = 0,
                     chatglm3: bool = False, device: str = "cpu") -> Path:
    """A ChatGLM2 (or, same model, ChatGLM3) checkpoint (see write_checkpoint_v1 for the first generation).
    device: where the random weights are drawn ("cuda": a full-size checkpoint in seconds)."""
    with staged(out) as tmp:
        place_tokenizer(tmp / "tokenizer.model", tokenizer, full_size, train_tokenizer, "ChatGLM2 tokenizer.model")
        import sentencepiece as spm
        n_words = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).vocab_size()
        shape = dict(FULL if full_size else TINY)
        if layers:
            shape["num_layers"] = layers
        vocab = shape.pop("padded_vocab_size", None) or -(-(n_words + 9) // 64) * 64  # room for the specials
        cfg_dict = config_json(shape, vocab, bits, rope_ratio)
        for name, text in (chatglm3_files(cfg_dict) if chatglm3 else {}).items():
            (tmp / name).write_text(text)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        cfg = ChatGLMConfig.from_dict(cfg_dict)
        torch.save(random_state_dict(cfg, bits, seed, random_codes=full_size, device=device), tmp / "pytorch_model.bin")
    return Path(out)


def write_checkpoint_v1(out: str | Path, *, bits: int = 8, full_size: bool = False, layers: int | None = None,
                        tokenizer: str | Path | None = None, seed: int = 0, device: str = "cpu") -> Path:
    """A ChatGLM-6B checkpoint: config.json, ice_text.model, pytorch_model.bin."""
    from glm.tokenizer_v1 import ChatGLMTokenizer

    with staged(out) as tmp:
        place_tokenizer(tmp / "ice_text.model", tokenizer, full_size, train_tokenizer_v1, "ChatGLM-6B ice_text.model")
        tok = ChatGLMTokenizer(tmp / "ice_text.model")
        shape = dict(FULL_V1 if full_size else TINY_V1)
        if layers:
            shape["num_layers"] = layers
        vocab = shape.pop("vocab_size", None) or -(-tok.n_words // 64) * 64
        specials = {"<sop>": tok.sop_id, "<eop>": tok.eos_id, "[MASK]": tok.mask_id, "[gMASK]": tok.gmask_id}
        cfg_dict = config_json_v1(shape, vocab, bits, specials)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        cfg = ChatGLMConfig.from_dict(cfg_dict)
        torch.save(random_state_dict_v1(cfg, bits, seed, random_codes=full_size, device=device), tmp / "pytorch_model.bin")
    return Path(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m devtools.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--family", choices=("chatglm2", "chatglm3", "chatglm"), default="chatglm2",
                    help="chatglm2 (ChatGLM2-6B), chatglm3 (ChatGLM3-6B) or chatglm (the first-generation ChatGLM-6B)")
    ap.add_argument("--bits", type=int, choices=(0, 4, 8),
                    help="0 = fp16 checkpoint (default 4 for chatglm2, 8 for chatglm)")
    ap.add_argument("--layers", type=int, help="number of layers (default 2, or 28 with --full-size)")
    ap.add_argument("--full-size", action="store_true", help="ChatGLM2-6B shapes with random int codes")
    ap.add_argument("--tokenizer", help="copy this tokenizer.model (ice_text.model) instead of training one")
    ap.add_argument("--rope-ratio", type=float, help="write rope_ratio (as chatglm2-6b-32k does)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="where the random weights are drawn: cpu, or cuda (a full-size checkpoint in seconds; "
                         "other values than the CPU's)")
    a = ap.parse_args(argv)
    if a.family == "chatglm":
        if a.rope_ratio:
            ap.error("--rope-ratio is a ChatGLM2 option")
        path = write_checkpoint_v1(a.outdir, bits=8 if a.bits is None else a.bits, full_size=a.full_size,
                                   layers=a.layers, tokenizer=a.tokenizer, seed=a.seed, device=a.device)
        print(f"wrote {path}/ (config.json, ice_text.model, pytorch_model.bin)")
        return
    a.bits = 4 if a.bits is None else a.bits
    path = write_checkpoint(a.outdir, bits=a.bits, full_size=a.full_size, layers=a.layers,
                            tokenizer=a.tokenizer, rope_ratio=a.rope_ratio, seed=a.seed, chatglm3=a.family == "chatglm3",
                            device=a.device)
    extra = ", tokenizer_config.json" if a.family == "chatglm3" else ""
    print(f"wrote {path}/ (config.json{extra}, tokenizer.model, pytorch_model.bin)")


if __name__ == "__main__":
    main()
