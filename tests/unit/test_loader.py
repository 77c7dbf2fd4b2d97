"""Loading checkpoints as THUDM publishes them, and clear errors for everything else."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import glm
from glm.config import ChatGLMConfig
from glm.errors import CheckpointError

QKV0 = "transformer.encoder.layers.0.self_attention.query_key_value"


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(path, fn):
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    fn(sd)
    torch.save(sd, path / "pytorch_model.bin")


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


PROMPT_IDS = None


def logits_of(path, **kw):
    m = glm.load(path, **kw)
    return m.logits(m.tokenizer.encode("[Round 1]\n\n问：你好\n\n答："))


def test_sharded_checkpoint_with_index_loads_identically(tiny_dir, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_dir / f, d / f)
    sd = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, d / fname)
        weight_map |= {k: fname for k in keys}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(logits_of(d), logits_of(tiny_dir))


def test_safetensors_checkpoint_loads_identically(tiny_dir, tmp_path):
    from safetensors.torch import save_file  # pinned in requirements.txt
    d = tmp_path / "st"
    d.mkdir()
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_dir / f, d / f)
    sd = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "model.safetensors")
    assert torch.equal(logits_of(d), logits_of(tiny_dir))


def test_fp16_checkpoint_loads(tiny_fp16_dir):
    m = glm.load(tiny_fp16_dir)
    assert m.config.quantization_bit == 0
    assert torch.isfinite(m.logits([1001, 1003, 5, 6])).all()


@pytest.mark.parametrize("name,changes,context,ratio", [
    ("chatglm2-6b", {}, 8192, 1.0),
    ("chatglm2-6b-32k", {"rope_ratio": 16}, 32768, 16.0),
])
def test_context_and_rope_ratio_from_config(name, changes, context, ratio):
    base = {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "multi_query_attention": True,
            "multi_query_group_num": 2, "kv_channels": 128, "ffn_hidden_size": 13696, "padded_vocab_size": 65024,
            "seq_length": 32768, "layernorm_epsilon": 1e-05, "add_qkv_bias": True}
    cfg = ChatGLMConfig.from_dict({**base, **changes})
    assert (cfg.max_context, cfg.rope_ratio, cfg.kv_heads, cfg.head_dim) == (context, ratio, 2, 128)


def test_32k_variant_loads_and_differs_only_by_positions(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "32k")
    edit_config(d, rope_ratio=16)
    m = glm.load(d)
    assert m.config.rope_ratio == 16.0
    a, b = logits_of(d), logits_of(tiny_dir)
    assert torch.equal(a[:1], b[:1]) and not torch.equal(a, b)  # position 0 is the same rotation


def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match):
        glm.load(path)


def test_missing_directory_and_config(tmp_path):
    expect_error(tmp_path / "nope", "checkpoint directory not found")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", r"config.json: missing")


def test_missing_tokenizer(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    (d / "tokenizer.model").unlink()
    expect_error(d, r"tokenizer.model: missing tokenizer file")


def test_missing_weights(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    (d / "pytorch_model.bin").unlink()
    expect_error(d, r"no weights found")


def test_unsupported_quantization_bit(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    edit_config(d, quantization_bit=3)
    expect_error(d, r"config.json: unsupported quantization_bit 3")


def test_missing_tensor_names_file_and_tensor(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    edit_weights(d, lambda sd: sd.pop(QKV0 + ".weight_scale"))
    expect_error(d, rf"tensor '{QKV0}.weight_scale' is missing from the checkpoint \(pytorch_model.bin\)")


def test_wrong_shape_names_file_and_tensor(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    edit_weights(d, lambda sd: sd.__setitem__(QKV0 + ".weight", sd[QKV0 + ".weight"][:, :-1].clone()))
    expect_error(d, rf"pytorch_model.bin: tensor '{QKV0}.weight' has shape \[128, 31\], expected \[128, 32\]")


def test_int4_config_with_fp16_weights_is_reported(tiny_fp16_dir, tmp_path):
    d = copy_ckpt(tiny_fp16_dir, tmp_path / "c")
    edit_config(d, quantization_bit=4)
    expect_error(d, rf"pytorch_model.bin: tensor '{QKV0}.weight(_scale)?' (is missing|has shape)")


def test_wrong_dtype_is_reported(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    edit_weights(d, lambda sd: sd.__setitem__(QKV0 + ".weight", sd[QKV0 + ".weight"].to(torch.int16)))
    expect_error(d, rf"tensor '{QKV0}.weight' has dtype torch.int16, expected torch.int8")


def test_unexpected_tensor_is_reported(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    edit_weights(d, lambda sd: sd.__setitem__("transformer.prefix_encoder.embedding.weight", torch.zeros(2, 2)))
    expect_error(d, r"unexpected tensor\(s\) not part of this model: 'transformer.prefix_encoder.embedding.weight'")


def test_truncated_weights_file(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    expect_error(d, r"pytorch_model.bin: cannot read weights")


class Evil:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.mark}",))


def test_pickle_that_runs_code_is_refused(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    mark = tmp_path / "pwned"
    torch.save({"x": Evil(mark)}, d / "pytorch_model.bin")
    expect_error(d, r"pytorch_model.bin: refused: .*posix.system")
    assert not mark.exists()


def test_bad_config_json(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    (d / "config.json").write_text("{not json")
    expect_error(d, r"config.json: unreadable JSON")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expect_error(d, r"not a ChatGLM config")


def test_quantize_argument_checked(tiny_dir):
    with pytest.raises(CheckpointError, match="cannot quantize an int4 checkpoint to int8"):
        glm.load(tiny_dir, quantize=8)
    with pytest.raises(CheckpointError, match="quantize must be 4 or 8"):
        glm.load(tiny_dir, quantize=3)


def test_quantized_weights_are_used_in_place_from_the_mapped_file(tiny_dir):
    m = glm.load(tiny_dir)
    sd = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    w = m.model.encoder.layers[0].self_attention.query_key_value.weight
    assert w.dtype == torch.int8 and torch.equal(w, sd[QKV0 + ".weight"])
    assert m.model.embedding.word_embeddings.weight.dtype == torch.float16


def test_bf16_on_cpu(tiny_dir):
    a = logits_of(tiny_dir)
    b = logits_of(tiny_dir, dtype=torch.bfloat16)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


# ---- glm.load's deployment policy (what the server's settings choose)

def test_load_applies_the_cpu_policy_and_logs_it(tiny_dir, monkeypatch, caplog):
    threads = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="glm"):
            m = glm.load(tiny_dir, device="cpu", int8_activations=True, threads=1)
        assert torch.get_num_threads() == 1 and m.device.type == "cpu"
    finally:
        torch.set_num_threads(threads)
    lines = [r.getMessage() for r in caplog.records]
    assert f"loading checkpoint {tiny_dir} on cpu with int8 activations" in lines
    assert any(line.startswith("kernels: ") for line in lines) and "cpu: 1 threads, OMP_WAIT_POLICY=" in "\n".join(lines)
    monkeypatch.setenv("GLM_NO_KERNELS", "1")
    with pytest.raises(glm.KernelError, match=r"the CPU kernels are turned off \(GLM_NO_KERNELS=1\)"):
        glm.load(tiny_dir, require_kernels=True)


def test_a_prompt_in_the_other_generations_format_is_named(tiny_model):
    assert tiny_model.format_warning("[Round 1]\n\n问：你好\n\n答：") is None
    assert tiny_model.format_warning("[Round 0]\n问：你好\n答：") == (
        "the prompt contains '[Round 0]\\n', the other ChatGLM generation's format; this chatglm2 model "
        "expects e.g. '[Round 1]\\n\\n问：你好\\n\\n答：'")
