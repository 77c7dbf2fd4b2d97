"""The decode step on the Triton backend under TRITON_INTERPRET=1 (CPU tensors): what crosses between
host and device in a step (one staged copy in, the sampled ids out), how many kernels it launches,
the rotary tables, the CUDA graphs' bucket and padding logic, setup's warm-up and self-test at the
model's shapes, and sticky device errors. The step tests run ChatGLM2 and ChatGLM-6B (2-D positions)."""
from __future__ import annotations

import collections
import logging
import sys

import pytest
import torch

import glm
from glm import staging
from glm.engine import Engine
from glm.errors import sticky_device_error
from glm.gpu import graphs, selftest
from glm.model_v1 import rotary_2d, rotary_table_2d
from glm.ops import rotary_angles
from glm.sampling import SamplingParams
from devtools.tiny import write_checkpoint_v1

GLM_DIR = str(glm.__file__).rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def fast(tiny_dir):
    return glm.load(tiny_dir, backend="triton")


@pytest.fixture(scope="module")
def fast_v1(tmp_path_factory):
    return glm.load(write_checkpoint_v1(tmp_path_factory.mktemp("tiny-v1-step")), backend="triton")


FAMILIES = ["chatglm2", "chatglm"]


def model_of(request, family):
    return request.getfixturevalue("fast" if family == "chatglm2" else "fast_v1")


class Transfers:
    """Counts, per kind, the calls from glm's own code that move data between host and device on a
    GPU: host to device (torch.tensor/as_tensor with a device, Tensor.to with a device, Tensor.copy_,
    Tensor.cuda) and device to host (Tensor.tolist/item/cpu/numpy, bool/int/float of a tensor).
    Calls made by the Triton interpreter itself (it runs kernels on numpy) are not glm's."""

    H2D = {(torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "copy_"), (torch.Tensor, "cuda"), (torch.Tensor, "to")}
    D2H = {(torch.Tensor, n) for n in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")}

    def __init__(self, monkeypatch):
        self.counts = collections.Counter()
        self.where = collections.defaultdict(list)
        for kind, names in (("h2d", self.H2D), ("d2h", self.D2H)):
            for owner, name in names:
                monkeypatch.setattr(owner, name, self._counting(kind, getattr(owner, name)))

    def _counting(self, kind, fn):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(GLM_DIR) and self._moves(fn.__name__, args, kwargs):
                self.counts[kind] += 1
                self.where[kind].append(f"{caller.f_code.co_filename.rsplit('/', 1)[1]}:{caller.f_lineno}")
            return fn(*args, **kwargs)
        return wrapper

    @staticmethod
    def _moves(name, args, kwargs) -> bool:
        if name in ("tensor", "as_tensor"):
            return "device" in kwargs
        if name == "to":  # a dtype cast stays on the device
            return "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])
        return True


def launches(monkeypatch) -> collections.Counter:
    from triton.runtime.interpreter import GridExecutor
    counts = collections.Counter()
    call = GridExecutor.__call__

    def counting(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return call(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", counting)
    return counts


def decode_steps(fast, n):
    """An engine with n sequences past their prefill, each with its first token."""
    engine = Engine(fast.model, fast.tokenizer, fast.config, fast.device, max_batch=8)
    ids = fast.tokenizer.encode("hello there")
    seqs = [engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.8, seed=i,
                                              repetition_penalty=1.1 if i % 2 else 1.0)) for i in range(n)]
    while any(s.prefilling or not s.new_tokens for s in seqs):
        engine.step()
    return engine, seqs


# Triton launches per decode step: 2 layers x (2 norms, qkv, store rows, attend rows, combine the
# context splits, dense, h_to_4h, swiglu, 4h_to_h) + the final norm and the output layer (ChatGLM2);
# ChatGLM-6B's layer norms, rotary and GELU are torch ops on the device.
LAUNCHES = {
    "chatglm2": {"_rms_norm_kernel": 5, "_gemv_kernel": 9, "_store_rows_kernel": 2,
                 "_attend_rows_kernel": 2, "_combine_splits_kernel": 2, "_swiglu_kernel": 2},
    "chatglm": {"_gemv_kernel": 9, "_store_rows_kernel": 2, "_attend_rows_kernel": 2, "_combine_splits_kernel": 2},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [1, 3])
def test_a_decode_step_copies_in_once_and_out_once(request, monkeypatch, family, rows):
    engine, seqs = decode_steps(model_of(request, family), rows)
    transfers = Transfers(monkeypatch)
    kernels = launches(monkeypatch)
    batch_steps = 0
    for _ in range(2):
        assert engine.step()
        batch_steps += 1
    assert transfers.counts == {"h2d": 2, "d2h": 2}, dict(transfers.where)
    assert all(w.startswith("staging.py:") for w in transfers.where["h2d"])  # StepStaging.copy
    assert all(w.startswith("runner.py:") for w in transfers.where["d2h"])
    per_step = {k: v // batch_steps for k, v in kernels.items()}
    assert per_step == LAUNCHES[family], per_step  # whatever the number of rows
    print(f"\n{family}, {rows} rows: per decode step {sum(per_step.values())} Triton launches {per_step}, "
          f"1 host-to-device copy, 1 device-to-host copy")


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_steps_give_the_tokens_of_unstaged_ones(request, monkeypatch, family):
    """The staged plan and the rotary table change no bit: the sampled tokens equal those of decode
    steps whose layers build their plan and angles from the host lists (the context left unset)."""
    from glm import runner as runner_module
    fast = model_of(request, family)
    want_engine, want = decode_steps(fast, 3)
    while want_engine.step():
        pass
    monkeypatch.setattr(runner_module, "staged", lambda inputs: _null())
    got_engine, got = decode_steps(fast, 3)
    while got_engine.step():
        pass
    assert [s.tokens for s in got] == [s.tokens for s in want]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_rotary_table_rows_equal_the_angles_computed_per_position(fast):
    cfg = fast.config
    cos, sin = rotary_angles(cfg, torch.arange(cfg.max_context))
    for p in (0, 1, 7, 100, cfg.max_context - 1):
        c, s = rotary_angles(cfg, torch.tensor([[p]]))
        assert torch.equal(cos[p], c[0, 0]) and torch.equal(sin[p], s[0, 0])


def test_rotary_table_2d_rows_equal_the_angles_computed_per_position(fast_v1):
    """ChatGLM-6B's table: the rows of a token's position and block position side by side are
    rotary_2d's angles, bit for bit."""
    cfg = fast_v1.config
    cos, sin = rotary_table_2d(cfg)
    assert cos.shape == (cfg.max_context + 1, cfg.head_dim // 2)
    for p, b in ((0, 0), (5, 0), (3, 1), (3, 7), (cfg.max_context - 1, cfg.max_context)):
        c, s = rotary_2d(cfg, torch.tensor([[p]]), torch.tensor([[b]]))
        assert torch.equal(torch.cat((cos[p], cos[b])), c[0, 0]) and torch.equal(torch.cat((sin[p], sin[b])), s[0, 0])


def test_buckets_and_padding():
    assert [staging.bucket_for(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]
    assert staging.bucket_for(3, (8, 2)) == 8
    assert staging.padded([7, 8, 9], 4) == [7, 8, 9, 7]
    assert staging.padded([5], 1) == [5]
    with pytest.raises(ValueError):
        staging.padded([1, 2, 3], 2)
    with pytest.raises(ValueError):
        staging.padded([], 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_leave_the_real_rows_and_their_cache_unchanged(request, family):
    """What a graph of bucket 4 runs for 3 sequences: row 0 repeated as the 4th row. The real rows'
    logits and the KV they write equal those of the unpadded 3-row step, bit for bit."""
    fast = model_of(request, family)
    results = []
    for rows in (3, 4):
        engine, seqs = decode_steps(fast, 3)
        runner = engine.runner
        caches = [runner._cache(s) for s in seqs]
        starts = [s.pos for s in seqs]
        runner._stage_rows([s.tokens[-1] for s in seqs], starts, caches, rows)
        runner.staging.copy()
        with torch.inference_mode():
            logits = runner._eager(runner.staging.inputs(rows), starts, caches)
        kv = [c.k[:, :, s].clone() for c, s in zip(caches, starts)]
        results.append((logits[:3].clone(), kv))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_capture_is_refused_without_cuda(fast):
    engine = Engine(fast.model, fast.tokenizer, fast.config, fast.device, max_batch=4)
    assert graphs.DecodeGraphs().capture(lambda inputs: None, engine.runner.staging) == "CUDA graphs need a CUDA device"


@pytest.mark.parametrize("family", FAMILIES)
def test_warm_up_runs_prefill_and_every_bucket_then_serves_the_same_tokens(request, monkeypatch, caplog, family):
    fast = model_of(request, family)
    kernels = launches(monkeypatch)
    engine = Engine(fast.model, fast.tokenizer, fast.config, fast.device, max_batch=8, prefill_chunk=5)
    with caplog.at_level(logging.INFO, logger="glm"):
        engine.warm_up()
    assert "warm-up: prefill of 1, 2, 3, 5 rows, decode and sampling at 1, 2, 4, 8 rows" in caplog.text
    assert kernels["_gemv_kernel"] > 0 and kernels["_attend_rows_kernel"] > 0
    ids = fast.tokenizer.encode("hello there")
    p = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.8, seed=3)
    seq = engine.submit(ids, p)
    while engine.step():
        pass
    fresh = Engine(fast.model, fast.tokenizer, fast.config, fast.device, max_batch=8)
    again = fresh.submit(ids, p)
    while fresh.step():
        pass
    assert seq.tokens == again.tokens and seq.new_tokens == 6


def test_selftest_at_the_models_shapes(fast, monkeypatch):
    checks = selftest.model_checks(fast.model)
    names = list(checks)
    assert any(n.startswith("QuantLinear int4") for n in names) and any(n.startswith("HalfLinear") for n in names)
    assert any(n.endswith(" x20") for n in names) and any(n.endswith(" x8") for n in names)
    assert selftest.run_model(fast.model, "cpu") is None
    # wrong numbers at one shape are caught
    from glm.gpu import linear
    real = linear._linear
    monkeypatch.setattr(linear, "_linear", lambda x, w, *a: real(x, w, *a) * (1.5 if x.shape[0] == 4 else 1))
    failure = selftest.run_model(fast.model, "cpu")
    assert failure is not None and " x4: relative error" in failure


def test_a_failed_selftest_fails_setup_when_gpu_kernels_are_required(monkeypatch, caplog):
    failure = "linear: RuntimeError: no kernel image"
    with caplog.at_level(logging.ERROR, logger="glm"):
        assert selftest.fallback("cuda", failure) == "torch"
    assert caplog.records[-1].levelno == logging.ERROR and failure in caplog.records[-1].getMessage()
    monkeypatch.setenv("GLM_REQUIRE_GPU_KERNELS", "1")
    with pytest.raises(selftest.GPUKernelError, match="GLM_REQUIRE_GPU_KERNELS=1"):
        selftest.fallback("cuda", failure)


@pytest.mark.parametrize("text, sticky", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA error: uncorrectable ECC error encountered", True),
    ("cudaErrorIllegalAddress", True),
    ("CUDA error: misaligned address", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("index 70000 is out of bounds", False),
])
def test_sticky_device_errors_are_told_apart(text, sticky):
    assert sticky_device_error(RuntimeError(text)) is sticky


def test_a_sticky_device_error_makes_the_engine_unhealthy(tiny_model, monkeypatch):
    engine = Engine(tiny_model.model, tiny_model.tokenizer, tiny_model.config, tiny_model.device, max_batch=4)
    ids = tiny_model.tokenizer.encode("hello")
    seqs = [engine.submit(ids, SamplingParams(max_new_tokens=8, seed=i)) for i in range(2)]
    engine.step()

    def crash(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "_forward_decode", crash)
    engine.start()
    for s in seqs:
        with pytest.raises(glm.errors.EngineError, match="illegal memory access"):
            while s.read(timeout=10) is not None:
                pass
    assert not engine.healthy and engine.dead is not None
