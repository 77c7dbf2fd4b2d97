"""Model configuration, read from a checkpoint's config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# ChatGLM2 was trained at 8K context; the 32K variant interpolates positions by rope_ratio.
# THUDM's chat() uses max_length 8192 (2-series) and 32768 (-32k); config.seq_length is only
# the length of the rotary cache (32768 for every 2-series model), so it is not the context.
CHATGLM2_TRAINED_CONTEXT = 8192

# Sane ranges for each size, checked before anything is allocated: a config.json is outside input,
# and absurd values would otherwise build (or fail late on) a model of that size. The largest
# ChatGLM has 28 layers, 4096 hidden, 13696 FFN, 130528 vocabulary and a 32768-token context.
BOUNDS = {
    "num_layers": (1, 256), "hidden_size": (1, 65536), "num_heads": (1, 1024), "kv_heads": (1, 1024),
    "head_dim": (1, 1024), "ffn_hidden_size": (1, 262144), "vocab_size": (1, 1 << 20),
    "seq_length": (1, 1 << 20), "max_context": (1, 1 << 20), "rope_ratio": (1e-3, 1e3),
    "rope_base": (1.0, 1e9), "norm_eps": (1e-12, 0.1),
}
MAX_PARAMETERS = 100e9


@dataclass(frozen=True)
class ChatGLMConfig:
    family: str = "chatglm2"          # "chatglm2", "chatglm3" (same model, other tokenizer) or "chatglm" (v1)
    num_layers: int = 28
    hidden_size: int = 4096
    num_heads: int = 32
    kv_heads: int = 2                 # multi_query_group_num; v1 has one kv head per query head
    head_dim: int = 128               # kv_channels
    ffn_hidden_size: int = 13696
    vocab_size: int = 65024           # padded_vocab_size: rows of the embedding / output layer
    seq_length: int = 32768           # rotary cache length (v1: max_sequence_length)
    max_context: int = 8192           # longest prompt + generation we serve
    rope_ratio: float = 1.0           # ChatGLM2-32K: positions are divided by this
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = True
    quantization_bit: int = 0         # 0 (fp16 checkpoint), 4 or 8
    # No eos_token_id: where generation stops is the tokenizer's (its stop_ids, from its model file).
    pad_token_id: int = 0
    # v1 only: the ids that lay out the 2-D positions (<sop> starts generation, [gMASK]/[MASK] mark the blank)
    bos_token_id: int | None = None
    mask_token_id: int | None = None
    gmask_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def parameters(self) -> int:
        """Roughly how many weights this config describes (attention, MLP, embedding, output)."""
        attention = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.ffn_hidden_size
        return self.num_layers * (attention + mlp) + 2 * self.vocab_size * self.hidden_size

    def check_bounds(self) -> "ChatGLMConfig":
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise CheckpointError(f"config.json: {name} = {value!r} is outside the sane range [{lo}, {hi}]")
        if self.num_heads % self.kv_heads:
            raise CheckpointError(f"config.json: {self.num_heads} attention heads cannot be grouped "
                                  f"over {self.kv_heads} key/value heads")
        for name in ("pad_token_id", "bos_token_id", "mask_token_id", "gmask_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < BOUNDS["vocab_size"][1]:
                raise CheckpointError(f"config.json: {name} = {value} is not a token id")
        if self.parameters > MAX_PARAMETERS:
            raise CheckpointError(f"config.json describes {self.parameters:.3g} parameters, more than "
                                  f"the {MAX_PARAMETERS:.0e} this engine serves")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ChatGLMConfig":
        try:
            return cls._parse(d).check_bounds()
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
            raise CheckpointError(f"config.json: bad value ({e})") from None

    @classmethod
    def _parse(cls, d: dict) -> "ChatGLMConfig":
        if "multi_query_group_num" in d or "padded_vocab_size" in d:
            return cls._from_chatglm2(d)
        if "inner_hidden_size" in d or d.get("position_encoding_2d"):
            return cls._from_chatglm1(d)
        raise CheckpointError(
            "config.json: not a ChatGLM config (expected ChatGLM2 keys such as "
            "'multi_query_group_num'/'padded_vocab_size' or ChatGLM-6B's 'inner_hidden_size')")

    @classmethod
    def _from_chatglm2(cls, d: dict) -> "ChatGLMConfig":
        heads = _get(d, "num_attention_heads", int)
        hidden = _get(d, "hidden_size", int)
        rope_ratio = float(d.get("rope_ratio", 1.0) or 1.0)
        if not BOUNDS["rope_ratio"][0] <= rope_ratio <= BOUNDS["rope_ratio"][1]:  # before it scales the context
            raise CheckpointError(f"config.json: rope_ratio = {rope_ratio!r} is outside the sane range "
                                  f"{list(BOUNDS['rope_ratio'])}")
        seq_length = int(d.get("seq_length", 32768))
        return cls(
            family="chatglm2",
            num_layers=_get(d, "num_layers", int),
            hidden_size=hidden,
            num_heads=heads,
            kv_heads=int(d["multi_query_group_num"]) if d.get("multi_query_attention", True) else heads,
            head_dim=int(d.get("kv_channels", hidden // heads)),
            ffn_hidden_size=_get(d, "ffn_hidden_size", int),
            vocab_size=int(d.get("padded_vocab_size", d.get("vocab_size", 65024))),
            seq_length=seq_length,
            max_context=min(seq_length, int(CHATGLM2_TRAINED_CONTEXT * rope_ratio)),
            rope_ratio=rope_ratio,
            norm_eps=float(d.get("layernorm_epsilon", 1e-5)),
            qkv_bias=bool(d.get("add_qkv_bias", True)),
            quantization_bit=_quant_bits(d),
            pad_token_id=int(d.get("pad_token_id", 0) or 0),
        )

    @classmethod
    def _from_chatglm1(cls, d: dict) -> "ChatGLMConfig":
        heads = _get(d, "num_attention_heads", int)
        hidden = _get(d, "hidden_size", int)
        seq_length = int(d.get("max_sequence_length", 2048))
        return cls(
            family="chatglm",
            num_layers=_get(d, "num_layers", int),
            hidden_size=hidden,
            num_heads=heads,
            kv_heads=heads,
            head_dim=hidden // heads,
            ffn_hidden_size=int(d.get("inner_hidden_size", 4 * hidden)),
            vocab_size=_get(d, "vocab_size", int),
            seq_length=seq_length,
            max_context=seq_length,
            norm_eps=float(d.get("layernorm_epsilon", 1e-5)),
            qkv_bias=True,
            quantization_bit=_quant_bits(d),
            pad_token_id=int(d.get("pad_token_id", 3) or 3),
            bos_token_id=_id(d, "bos_token_id", 130004),
            mask_token_id=_id(d, "mask_token_id", 130000),
            gmask_token_id=_id(d, "gmask_token_id", 130001),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ChatGLMConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (a checkpoint directory needs config.json)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        try:
            cfg = cls.from_dict(d)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if cfg.family == "chatglm2" and is_chatglm3(path.parent, d):
            from dataclasses import replace
            cfg = replace(cfg, family="chatglm3")
        return cfg


def is_chatglm3(directory: Path, config: dict) -> bool:
    """A ChatGLM3 checkpoint as THUDM publishes it: config.json's or tokenizer_config.json's name is
    THUDM/chatglm3-*, or its tokenizer files name the <|observation|> role (ChatGLM2's have no roles)."""
    tok_config = _read_text(directory / "tokenizer_config.json")
    names = (str(config.get("_name_or_path", "")), _json_name(tok_config))
    if any("chatglm3" in n.lower() for n in names):
        return True
    return "<|observation|>" in tok_config or "<|observation|>" in _read_text(directory / "tokenization_chatglm.py")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _json_name(text: str) -> str:
    try:
        d = json.loads(text) if text else {}
    except ValueError:
        return ""
    return str(d.get("name_or_path", "")) if isinstance(d, dict) else ""


def _get(d: dict, key: str, typ):
    if key not in d:
        raise CheckpointError(f"config.json: missing key '{key}'")
    try:
        return typ(d[key])
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: bad value for '{key}': {d[key]!r}") from None


def _id(d: dict, key: str, default: int) -> int:
    return default if d.get(key) is None else _get(d, key, int)


def _quant_bits(d: dict) -> int:
    bits = d.get("quantization_bit") or 0
    if bits not in (0, 4, 8):
        raise CheckpointError(f"config.json: unsupported quantization_bit {bits!r} (supported: 4, 8, or absent)")
    if d.get("quantization_embeddings"):
        raise CheckpointError("config.json: quantized embeddings (quantization_embeddings: true) are not supported")
    return int(bits)
