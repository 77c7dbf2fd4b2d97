"""Loading THUDM checkpoints as published: config.json, tokenizer, pytorch_model*.bin or *.safetensors.

Pickles are read with weights_only=True (a checkpoint can never run code) and memory-mapped:
quantized weights, embeddings and (with the CPU kernels) fp16 linears are used in place, so peak
memory stays at the size of the checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ChatGLMConfig
from .cpu import kernels
from .device import resolve as resolve_device
from .errors import CheckpointError, WeightsError
from .ops import TorchOps
from .quant import HalfLinear, QuantLinear, quantize as quantize_weight

log = logging.getLogger("glm")

PREFIX = "transformer."
IGNORED = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq")  # recomputed buffers
QUANTIZED_LINEARS = {  # family -> linear layers THUDM quantizes in every block
    "chatglm2": ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "chatglm3": ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "chatglm": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
}


class Checkpoint:
    """Tensors of a checkpoint directory by name, read lazily shard by shard (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self.files = self._weight_files(path)
        self._index: dict[str, Path] = {}
        self._cache: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self.files:
            for name in self._open(f):
                self._index[name] = f

    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
                files = [path / f for f in sorted(set(weight_map.values()))]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(path.glob(pattern))
            if files:
                return files
        raise CheckpointError(f"{path}: no weights found (expected pytorch_model.bin, "
                              f"pytorch_model-*.bin with pytorch_model.bin.index.json, or *.safetensors)")

    def _open(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._cache:
            self._cache[f] = _read_weights(f)
        return self._cache[f]

    def names(self) -> set[str]:
        return set(self._index)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing from the checkpoint "
                                  f"({', '.join(f.name for f in self.files)})")
        return self._open(self._index[name])[name]

    def file_of(self, name: str) -> str:
        return self._index[name].name


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(f))
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{f}: refused: {_unpickling_reason(e)}; a checkpoint may hold only tensors "
                              f"and plain containers, and code in it is never run") from None
    except Exception as e:  # torch raises many kinds; the file is what matters to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot read weights ({msg})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f}: not a state dict of tensors")
    return sd


def _unpickling_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused: its first line only
    suggests weights_only=False, which is exactly what must not be done with an untrusted file."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "unsupported" in line.lower() or "weightsunpickler" in line.lower():
            return line.rstrip(".")
    return lines[0] if lines else type(e).__name__


def build_model(cfg: ChatGLMConfig, ops: TorchOps) -> nn.Module:
    """The family's model computing with `ops`, on the meta device (no memory), ready for assignment
    of real tensors."""
    if cfg.family in ("chatglm2", "chatglm3"):
        from .model import ChatGLM2 as Model
    else:
        from .model_v1 import ChatGLM as Model
    with torch.device("meta"):
        return Model(cfg, ops)


def swap_linears(model: nn.Module, cfg: ChatGLMConfig, bits: int, ops: TorchOps) -> None:
    """Replace nn.Linear by the module that computes from the stored format (gpt-fast style): the
    quantized ones, and fp16 ones where the ops read fp16 weights as they are."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent_name, _, attr = name.rpartition(".")
        quantized = bits and any(name.endswith(s) for s in QUANTIZED_LINEARS[cfg.family])
        with torch.device("meta"):
            if quantized:
                new = QuantLinear(module.in_features, module.out_features, bits, bias=module.bias is not None, ops=ops)
            elif ops.reads_half_weights:
                new = HalfLinear(module.in_features, module.out_features, bias=module.bias is not None, ops=ops)
            else:
                continue
        setattr(model.get_submodule(parent_name), attr, new)


def _has_config(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def find_checkpoint(root: str, preferred: str | None = None) -> str:
    """Locate the checkpoint directory under `root`, deterministically.

    - `root` itself when it holds config.json;
    - else its one subdirectory holding config.json (as script/download-weights writes
      weights/<name>/). When several do, `preferred`'s directory wins if present,
      otherwise the first in sorted name order; the choice is logged.
    Hidden entries (download-weights' in-progress temp dirs start with '.') are ignored.
    """
    if "://" in root:
        raise WeightsError(
            f"COG_WEIGHTS={root!r} is a URL; this predictor needs a local checkpoint directory "
            "(run script/download-weights first)"
        )
    if not os.path.isdir(root):
        raise WeightsError(
            f"weights directory {root!r} does not exist: run `script/download-weights` "
            "or set COG_WEIGHTS to a checkpoint directory"
        )
    if _has_config(root):
        return root
    candidates = sorted(
        name
        for name in os.listdir(root)
        if not name.startswith(".") and _has_config(os.path.join(root, name))
    )
    if not candidates:
        raise WeightsError(
            f"no checkpoint in {root!r}: expected config.json there or in a subdirectory "
            "such as weights/chatglm2-6b-int4/ (run `script/download-weights`)"
        )
    chosen = preferred if preferred in candidates else candidates[0]
    if len(candidates) > 1:
        log.info("several checkpoints in %s: %s; using %s", root, ", ".join(candidates), chosen)
    return os.path.join(root, chosen)


@dataclass(frozen=True)
class LoadedModel:
    """What a checkpoint directory loads into: its config, tokenizer and model, and the device the
    model's tensors are on (glm.load builds the facade, glm.GLM, from them)."""
    config: ChatGLMConfig
    tokenizer: object
    model: nn.Module
    device: torch.device


def load_model(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: int | None = None, int8_activations: bool = False, backend: str | None = None) -> LoadedModel:
    """Load a ChatGLM checkpoint directory (the arguments: glm.load's)."""
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    device = resolve_device(device)
    backend = _backend(device, backend)
    if backend == "triton":
        if dtype not in (None, torch.float16):
            raise CheckpointError(f"backend 'triton' computes in float16, got dtype {dtype}")
        if int8_activations:
            raise CheckpointError("int8_activations is a CPU-kernel option; backend 'triton' does not use it")
    dtype = dtype or (torch.float16 if device.type == "cuda" or backend == "triton" else torch.float32)
    cfg = ChatGLMConfig.from_file(path / "config.json")
    tokenizer = _load_tokenizer(cfg, path)
    ckpt = Checkpoint(path)
    bits = _target_bits(cfg, quantize)
    if int8_activations:
        _check_int8_activations(bits, device, dtype)
    ops = choose_ops(device, dtype, backend=backend, int8_activations=int8_activations)
    model = build_model(cfg, ops)
    swap_linears(model, cfg, bits, ops)
    convert = _Converter(ckpt, cfg, bits, device, dtype)
    state = {name: convert(name, meta) for name, meta in model.state_dict().items()}
    _check_unexpected(ckpt, model)
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False).eval()
    if ops.name == "triton" and device.type == "cuda":
        # The kernels at this model's shapes; on failure the torch ops (or GLM_REQUIRE_GPU_KERNELS' error).
        from .gpu import selftest
        failure = selftest.run_model(model, device)
        if failure is not None:
            backend = selftest.fallback(device, f"at the model's shapes: {failure}")
            return load_model(path, device, dtype, quantize, int8_activations, backend)
    if cfg.quantization_bit == 0 and bits:
        cfg = _with_bits(cfg, bits)
    log.info("loaded %s (%s, %s, %s, ops %s) in %.1fs; max_context=%d", path, cfg.family,
             f"int{bits}" if bits else "fp16", f"{device.type}/{str(dtype).removeprefix('torch.')}", ops.name,
             time.perf_counter() - t0, cfg.max_context)
    return LoadedModel(cfg, tokenizer, model, device)


BACKENDS = ("torch", "triton")


def _backend(device: torch.device, requested: str | None) -> str:
    """The backend to build: the requested one, or on CUDA "triton" when triton imports; "triton"
    only if its self-test passes on the device (else one log line and "torch")."""
    if requested not in (None, *BACKENDS):
        raise CheckpointError(f"backend must be one of {', '.join(BACKENDS)} (or None for automatic), got {requested!r}")
    if requested == "torch" or (requested is None and device.type != "cuda"):
        return "torch"
    from . import gpu
    if not gpu.triton_available():
        if requested is None:
            from .gpu import selftest
            return selftest.fallback(device, "triton is not installed")
        raise CheckpointError("backend 'triton' needs the triton package (pip install triton)")
    if device.type == "cpu" and not gpu.interpreting():
        raise CheckpointError("backend 'triton' on the CPU runs only under the Triton interpreter: "
                              "set TRITON_INTERPRET=1 before starting Python")
    if device.type not in ("cuda", "cpu"):
        raise CheckpointError(f"backend 'triton' needs a CUDA device, got {device}")
    from .gpu import selftest
    return "triton" if selftest.passes(device) else "torch"


def choose_ops(device: torch.device | str, dtype: torch.dtype, *, backend: str = "torch",
               int8_activations: bool = False) -> TorchOps:
    """What computes a model: the Triton kernels (backend "triton"), else the CPU kernels where they
    serve `device` and `dtype`, else torch."""
    if backend == "triton":
        from .gpu.ops import TritonOps
        return TritonOps()
    if kernels.used_for(device, dtype):
        from .cpu.ops import CpuOps
        return CpuOps(int8_activations)
    return TorchOps(int8_activations)


def _check_int8_activations(bits: int, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu" or dtype != torch.float32 or bits != 4:
        raise CheckpointError(f"int8_activations needs an int4 model on the CPU in float32 "
                              f"(got int{bits}, {device.type}, {str(dtype).removeprefix('torch.')})")
    k = kernels.get()
    if k is None or not k.has_vnni():
        log.warning("int8 activations without AVX-512 VNNI kernels: same results on a slow reference path")


def _load_tokenizer(cfg: ChatGLMConfig, path: Path):
    if cfg.family == "chatglm2":
        from .tokenizer import ChatGLM2Tokenizer
        return ChatGLM2Tokenizer(path / "tokenizer.model")
    if cfg.family == "chatglm3":
        from .tokenizer import ChatGLM3Tokenizer
        return ChatGLM3Tokenizer(path / "tokenizer.model")
    from .tokenizer_v1 import ChatGLMTokenizer
    return ChatGLMTokenizer(path / "ice_text.model")


def _target_bits(cfg: ChatGLMConfig, quantize: int | None) -> int:
    if quantize in (None, 0):
        return cfg.quantization_bit
    if quantize not in (4, 8):
        raise CheckpointError(f"quantize must be 4 or 8, got {quantize!r}")
    if cfg.quantization_bit not in (0, quantize):
        raise CheckpointError(f"cannot quantize an int{cfg.quantization_bit} checkpoint to int{quantize}")
    return quantize


def _with_bits(cfg: ChatGLMConfig, bits: int) -> ChatGLMConfig:
    from dataclasses import replace
    return replace(cfg, quantization_bit=bits)


class _Converter:
    """Checkpoint tensor -> the checked tensor a model buffer/parameter computes with."""

    def __init__(self, ckpt: Checkpoint, cfg: ChatGLMConfig, bits: int, device: torch.device, dtype: torch.dtype):
        self.ckpt, self.cfg, self.bits, self.device, self.dtype = ckpt, cfg, bits, device, dtype
        self._scales: dict[str, torch.Tensor] = {}  # from quantize-on-load, until their module asks

    def __call__(self, name: str, meta: torch.Tensor) -> torch.Tensor:
        key = name if name == "lm_head.weight" else PREFIX + name
        if meta.dtype == torch.int8 or name.endswith(".weight_scale"):
            return self._quantized(key, meta)
        t = self.ckpt.get(key)
        self._check(key, t, meta.shape, float_dtype=True)
        # fp16 buffers (embeddings, HalfLinear weights) stay in checkpoint precision
        return t.to(device=self.device, dtype=torch.float16 if meta.dtype == torch.float16 else self.dtype)

    def _quantized(self, key: str, meta: torch.Tensor) -> torch.Tensor:
        is_scale = key.endswith(".weight_scale")
        if self.cfg.quantization_bit:  # stored quantized: check and use as is
            t = self.ckpt.get(key)
            self._check(key, t, meta.shape, float_dtype=is_scale)
            if not is_scale and t.dtype != torch.int8:
                raise CheckpointError(f"{self.ckpt.file_of(key)}: tensor '{key}' has dtype {t.dtype}, "
                                      f"expected torch.int8 for an int{self.bits} checkpoint")
            return t.to(self.device)
        if is_scale:
            return self._scales.pop(key).to(self.device)
        # quantize on load from the fp16 weight, exactly as THUDM's quantize() does
        w = self.ckpt.get(key)
        self._check(key, w, (meta.shape[0], meta.shape[1] * 8 // self.bits), float_dtype=True)
        q, self._scales[key + "_scale"] = quantize_weight(w.to(torch.float16), self.bits)
        return q.to(self.device)

    def _check(self, key: str, t: torch.Tensor, shape, float_dtype: bool) -> None:
        where = f"{self.ckpt.file_of(key)}: tensor '{key}'"
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{where} has shape {list(t.shape)}, expected {list(shape)} for this config.json")
        if float_dtype and not t.is_floating_point():
            raise CheckpointError(f"{where} has dtype {t.dtype}, expected a float dtype")


def _check_unexpected(ckpt: Checkpoint, model: nn.Module) -> None:
    wanted = {PREFIX + n for n in model.state_dict()} | {"lm_head.weight"}
    extra = sorted(n for n in ckpt.names() - wanted if not n.endswith(IGNORED))
    if extra:
        shown = ", ".join(f"'{n}' ({ckpt.file_of(n)})" for n in extra[:5])
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) not part of this model: {shown}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
