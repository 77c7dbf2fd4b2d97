"""The model on the Triton backend under TRITON_INTERPRET=1 (CPU tensors, the kernels CUDA runs):
THUDM's reference vectors, the tiny int4 ChatGLM2 and int8 ChatGLM-6B checkpoints against the
float32 CPU path, greedy text, batch invariance, generate and the engine."""
from __future__ import annotations

import logging

import pytest
import torch

import glm
from glm.config import ChatGLMConfig
from glm.errors import CheckpointError
from glm.gpu import memory, selftest
from glm.gpu.ops import TritonOps
from glm.kvpool import KVPool
from glm.loader import choose_ops
from glm.quant import HalfLinear, QuantLinear
from devtools.tiny import write_checkpoint_v1
from devtools.vectors import MODEL_FILES, hidden_state_steps, vector_model
from reference import DataReader

REL = 0.02  # the bound: within 2% of the largest value


def triton_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.half().eval()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert rel < REL, f"{what}: max error {rel:.4f} of the largest value"
    return rel


@pytest.mark.parametrize("name", MODEL_FILES)  # ChatGLM2, ChatGLM3, ChatGLM-6B
def test_reference_vectors(name):
    """Prefill then KV-cache decode steps on a pool-backed cache (the engine's layout)."""
    r = DataReader(name)
    cfg, model = vector_model(name, r, TritonOps())
    cache = KVPool(cfg, 8, "cpu", torch.float16).cache(0, 8)
    for step, (got, want) in enumerate(hidden_state_steps(triton_model(model), r, cfg, cache)):
        assert got.dtype == torch.float16
        assert_close(got, want, f"step {step}")


# ---- tiny checkpoints, loaded as a user would

@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory):
    return write_checkpoint_v1(tmp_path_factory.mktemp("tiny_v1_gpu"))  # int8, as THUDM's chatglm-6b-int8


@pytest.fixture(scope="module")
def models(tiny_dir, tiny_v1):
    """(triton fp16, float32 CPU) for the int4 ChatGLM2 and the int8 ChatGLM-6B tiny checkpoints."""
    return {"chatglm2-int4": (glm.load(tiny_dir, backend="triton"), glm.load(tiny_dir)),
            "chatglm-int8": (glm.load(tiny_v1, backend="triton"), glm.load(tiny_v1))}


FAMILIES = ["chatglm2-int4", "chatglm-int8"]


def test_loader_builds_the_cuda_model(models):
    for name in FAMILIES:
        model = models[name][0]
        assert model.dtype == torch.float16, name
        assert type(model.model.ops) is TritonOps, name
        ops = {type(m).__name__: type(m.ops) for m in model.model.modules() if hasattr(m, "ops")}
        assert set(ops.values()) == {TritonOps}, (name, ops)
        assert any(isinstance(m, QuantLinear) for m in model.model.modules())
    v2 = models["chatglm2-int4"][0].model
    assert isinstance(v2.output_layer, HalfLinear) and v2.embedding.word_embeddings.weight.dtype == torch.float16
    assert models["chatglm-int8"][0].config.quantization_bit == 8


def prompts(tok):
    return [tok.build_prompt("你好"), tok.build_prompt("晚上睡不着应该怎么办", [("你好", "你好!")]), "hello world"]


def assert_logits_match(fast, ref, name: str) -> None:
    """fast's logits within the GPU tolerance of ref's on every prompt, top-1 equal at >= 95% of positions."""
    total = agree = 0
    for p in prompts(ref.tokenizer):
        ids = ref.tokenizer.encode(p)
        got, want = fast.logits(ids), ref.logits(ids)
        assert_close(got, want, f"{name} {p!r}")
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    assert agree >= 0.95 * total, f"{name}: top-1 equal at {agree}/{total} positions"


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_the_float32_cpu_path(models, name):
    assert_logits_match(*models[name], name)


@pytest.mark.parametrize("name", FAMILIES)
def test_tensor_core_linears_match_the_float32_cpu_path(models, name):
    """Every linear on glm.gpu.prefill's tensor-core path (exact chunks of 16 rows: the int4/int8
    dequantize + matmul and the fp16 output layer)."""
    from glm.gpu import prefill

    with prefill.exact_chunks(16):
        assert_logits_match(*models[name], name)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_text(models, name):
    """Prefill (SDPA) then decode (the kernel over the engine's pool): the float32 path's greedy text."""
    fast, ref = models[name]
    for p in prompts(ref.tokenizer)[:2]:
        want = ref.generate(p, max_new_tokens=10, temperature=0)
        want_text = "".join(want)
        got = fast.generate(p, max_new_tokens=10, temperature=0)
        assert "".join(got) == want_text and got.new_tokens == want.new_tokens >= 3


def _drain(seq):
    out = []
    while (item := seq.read(timeout=0)) is not None:
        out.append(item)
    return "".join(out)


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_invariant_in_the_engine(models, name):
    """Each sequence's sampled text is the same alone and beside the others in one engine."""
    fast = models[name][0]
    ps = prompts(fast.tokenizer)
    params = [glm.SamplingParams(max_new_tokens=8, temperature=0.8, seed=s) for s in (1, 2, 3)]
    alone = ["".join(fast.generate(p, max_new_tokens=8, temperature=0.8, seed=s)) for p, s in zip(ps, (1, 2, 3))]
    engine = fast.use_engine()  # stepped here: not the one generate() started
    seqs = [engine.submit(fast.tokenizer.encode(p), sp) for p, sp in zip(ps, params)]
    peak = 0
    while engine.step():
        peak = max(peak, len(engine.active))
    assert peak == 3
    assert [_drain(s) for s in seqs] == alone


def test_backend_argument_errors(tiny_dir, monkeypatch):
    with pytest.raises(CheckpointError, match="backend must be one of torch, triton"):
        glm.load(tiny_dir, backend="cuda")
    with pytest.raises(CheckpointError, match="computes in float16"):
        glm.load(tiny_dir, backend="triton", dtype=torch.float32)
    from glm import gpu
    monkeypatch.setattr(gpu, "interpreting", lambda: False)
    with pytest.raises(CheckpointError, match="TRITON_INTERPRET=1"):
        glm.load(tiny_dir, backend="triton")


def test_failed_selftest_loads_the_torch_backend(tiny_dir, monkeypatch, caplog):
    def broken(device):
        raise RuntimeError("device kernel image is invalid")
    monkeypatch.setitem(selftest.CHECKS, "row_attention", broken)
    selftest.passes.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="glm"):
            model = glm.load(tiny_dir, backend="triton")
    finally:
        selftest.passes.cache_clear()
    assert model.dtype == torch.float32
    # the ops glm.load picks for float32 on the CPU: the CPU kernels where they build, else torch
    assert {type(m.ops) for m in model.model.modules() if hasattr(m, "ops")} == {type(choose_ops("cpu", torch.float32))}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "row_attention: RuntimeError: device kernel image is invalid" in warnings[0]
    assert "".join(model.generate("hello", max_new_tokens=3, temperature=0))


# ---- the GPU memory plan (the computation; the device query is torch.cuda.mem_get_info)

def chatglm2_6b_config() -> ChatGLMConfig:
    from devtools.tiny import FULL, config_json
    return ChatGLMConfig.from_dict(config_json(FULL, 65024, 4))


def test_memory_plan_for_chatglm2_6b_int4_on_a_t4():
    cfg = chatglm2_6b_config()
    assert cfg.max_context == 8192 and KVPool.bytes_per_token(cfg, torch.float16) == 28 * 2 * 2 * 128 * 2
    weights = 3_900_000_000  # what the int4 checkpoint puts on the device
    total = 15 * memory.GiB
    p = memory.MemoryPlan(weights=weights, kv_pool=8 * 8192 * 28672,
                          workspace=memory.workspace_bytes(cfg, 8, 256, torch.float16),
                          free=total - weights - memory.GiB // 4, total=total)
    assert p.kv_pool == 1_879_048_192 and 0.3 * memory.GiB < p.workspace < 0.6 * memory.GiB
    assert p.fits
    memory.check(p, 8 * 8192)
    too_big = memory.MemoryPlan(weights=weights, kv_pool=400_000 * 28672, workspace=p.workspace,
                                free=p.free, total=total)
    with pytest.raises(memory.MemoryPlanError) as e:
        memory.check(too_big, 400_000)
    room = (p.free - p.workspace - memory.RESERVE) // 28672
    assert f"KV budget of 400000 tokens does not fit" in str(e.value) and f"at most {room} tokens fit" in str(e.value)
    assert 300_000 < room < 400_000


def test_memory_plan_from_a_loaded_model(models, monkeypatch, caplog):
    fast = models["chatglm2-int4"][0]
    cfg = fast.config
    weights = memory.model_bytes(fast.model)
    assert weights == sum(t.nbytes for t in fast.model.state_dict().values())
    kv = KVPool.bytes_per_token(cfg, torch.float16)
    monkeypatch.setattr(memory, "device_memory", lambda device: (memory.RESERVE + memory.GiB, 2 * memory.GiB))
    with caplog.at_level(logging.INFO, logger="glm"):
        p = memory.check_device(fast.model, cfg, 1000, 8, 256, "cuda")
    assert p.kv_pool == 1000 * kv and p.weights == weights
    assert any(r.getMessage().startswith("GPU memory plan: weights") for r in caplog.records)
    monkeypatch.setattr(memory, "device_memory", lambda device: (memory.RESERVE, 2 * memory.GiB))
    with pytest.raises(memory.MemoryPlanError, match="at most 0 tokens fit"):
        memory.check_device(fast.model, cfg, 1000, 8, 256, "cuda")


def test_bench_device_cuda_logic_runs_under_the_interpreter(models, capsys):
    """`python -m bench --device interpret --tiny`: the GPU benchmark's code path, end to end."""
    import json

    from bench.__main__ import main
    assert main(["--device", "interpret", "--tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["backend"] == "triton" and result["layers"] == 2
    # decode through the engine with sampling on, as users send it (graphs only on CUDA)
    assert result["decode_sampling"] == "temperature 0.8, top_p 0.8" and result["cuda_graphs"] is False
    for key in ("prefill_tok_s", "prefill_exact_rows_tok_s", "batch1_decode_tok_s", "batch8_decode_tok_s",
                "ttft_s", "chat_round2_ttft_cached_s", "chat_round2_ttft_uncached_s", "peak_rss_bytes",
                "roofline_fraction_batch1", "roofline_fraction_batch8"):
        assert result[key] > 0, key
    # round 2: round 1's 16-token prompt and reply (the 1 of its 2 tokens that went through the model)
    # from the cache, then 4 new tokens
    assert result["chat_round2_prompt_tokens"] == 16 + 1 + 4 and result["chat_round2_cached_tokens"] == 17
    # The bench's checkpoint is tiny_dir's: its stored weights (every linear with its scales, the
    # fp16 output layer) are read once per step whatever the batch; 8 streams add only activations
    # and their own KV caches.
    model = models["chatglm2-int4"][0]
    weights = sum(t.nbytes for n, t in model.model.state_dict().items()
                  if "layernorm" not in n and "word_embeddings" not in n)
    linears = [m for m in model.model.modules() if isinstance(m, (QuantLinear, HalfLinear))]
    activations = sum(2 * (m.in_features + m.out_features) for m in linears)  # fp16 x in, y out per row
    kv_per_seq = 12 * KVPool.bytes_per_token(model.config, torch.float16)  # the 12-token prompt's cache
    assert result["bytes_per_step_batch1"] == weights + activations + kv_per_seq
    assert result["bytes_per_step_batch8"] == weights + 8 * (activations + kv_per_seq)
