"""Tests of the RMSNorm and SwiGLU CPU kernels (glm/cpu/csrc/pointwise.cpp via glm.cpu.kernels).

Reference, written here in float64: rms_norm = w * x / sqrt(mean(x^2) + eps); swiglu =
g / (1 + e^-g) * u for h = [g | u]. Tolerances: fp32 a few ulp (2e-6 relative + 1e-30); bf16 one
bf16 rounding (2**-8 relative), two for swiglu (silu is rounded to bf16 before the product, as
torch's F.silu(gate) * up does). Every ISA path is tested; a row's result must be bitwise the same
alone, in any batch and with any thread count.
"""
import pytest
import torch
import torch.nn.functional as F

from glm.cpu import kernels

EPS = 1e-5


def ref_rms(x, w, eps=EPS):
    xd = x.double()
    return w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


def ref_swiglu(h):
    g, u = h.double().chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


def close(out, ref, dtype, roundings=1):
    assert out.dtype == dtype and out.shape == ref.shape
    rel = 2e-6 if dtype == torch.float32 else roundings * 2 ** -8
    err = (out.double() - ref).abs()
    assert (err <= rel * ref.abs() + 1e-30).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [4096, 37, 16, 1])
def test_rms_norm_matches_reference(mod, isa, dtype, wdtype, K):
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(5, K, generator=g) * 3).to(dtype)
    x[1] *= 1e-3  # small rows: eps matters
    w = (torch.rand(K, generator=g) + 0.5).to(wdtype)
    close(kernels.rms_norm(x, w, EPS), ref_rms(x, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F_", [13696, 33, 16])
def test_swiglu_matches_reference(mod, isa, dtype, F_):
    g = torch.Generator().manual_seed(F_)
    h = (torch.randn(3, 2 * F_, generator=g) * 4).to(dtype)
    h[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.0, -88.0, 1e-20, -1e-20]).to(dtype)  # extremes
    out = kernels.swiglu(h)
    close(out, ref_swiglu(h), dtype, roundings=2)
    gate, up = h.chunk(2, dim=-1)
    torch_path = F.silu(gate) * up
    assert (out.float() - torch_path.float()).abs().max().item() <= (2e-6 if dtype == torch.float32 else 2 ** -7) * \
        torch_path.float().abs().max().item()


def test_non_finite_inputs(mod, isa):
    h = torch.tensor([[float("nan"), float("inf"), float("-inf"), 2.0, 1.0, 1.0, 1.0, float("nan")]])
    out = kernels.swiglu(h)  # as F.silu: silu(nan) = nan, silu(inf) = inf, silu(-inf) = -inf / inf = nan
    assert out[0, 0].isnan() and out[0, 1].item() == float("inf") and out[0, 2].isnan() and out[0, 3].isnan()
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal((F.silu(gate) * up).isnan(), out.isnan())
    x = torch.tensor([[1.0, float("nan"), 2.0]])
    assert kernels.rms_norm(x, torch.ones(3), EPS).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant(mod, isa, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4096, generator=g).to(dtype)  # enough rows to run on several threads
    w = torch.rand(4096, generator=g).to(dtype)
    h = torch.randn(300, 2 * 512, generator=g).to(dtype)
    norm, act = kernels.rms_norm(x, w, EPS), kernels.swiglu(h)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.rms_norm(x, w, EPS), norm) and torch.equal(kernels.swiglu(h), act)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 7, 299):
        assert torch.equal(kernels.rms_norm(x[r:r + 1], w, EPS)[0], norm[r])
        assert torch.equal(kernels.swiglu(h[r:r + 1])[0], act[r])
    assert torch.equal(kernels.rms_norm(x.view(30, 10, 4096), w, EPS).view(300, 4096), norm)  # any leading dims


def test_input_validation(mod):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.rms_norm(x.half(), torch.ones(8), EPS)
    with pytest.raises(RuntimeError, match=r"weight must be .*\[8\]"):
        kernels.rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(RuntimeError, match="even"):
        kernels.swiglu(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.swiglu(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_uses_kernels_and_matches_torch_path(mod, tiny_dir, monkeypatch, dtype):
    """The tiny model's forward (prefill and decode) on the CPU kernels' ops agrees with the torch ops."""
    import glm
    from glm.kvpool import KVCache

    fast = glm.load(tiny_dir, dtype=dtype)
    monkeypatch.setattr(kernels, "used_for", lambda device, dtype: False)  # the loader's choice: torch
    torch_only = glm.load(tiny_dir, dtype=dtype)
    assert (fast.model.ops.name, torch_only.model.ops.name) == ("cpu-kernels", "torch")
    calls = {"rms_norm": 0, "swiglu": 0}
    for name in calls:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(*a))
    tokens = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))

    def run(m):
        cache = KVCache(m.config, 16, "cpu", dtype)
        with torch.inference_mode():
            return [m.model(tokens, [0], [cache])[0].float(), m.model(torch.tensor([[5]]), [7], [cache])[0].float()]

    fused = run(fast)
    layers = fast.config.num_layers
    assert calls == {"rms_norm": 2 * (2 * layers + 1), "swiglu": 2 * layers}
    plain = run(torch_only)
    assert calls == {"rms_norm": 2 * (2 * layers + 1), "swiglu": 2 * layers}
    tol = 1e-5 if dtype == torch.float32 else 0.03
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() <= tol * b.abs().max().item()
