"""Tests of the fused decode attention (glm/cpu/csrc/attention.cpp via glm.cpu.kernels.decode_attention).

Reference, written here in float64: the new k, v go into the cache at the slot, then for query
head h (kv group h // (heads / groups)) softmax(q . k_j / sqrt(hd)) . v over slots 0..slot.
Tolerances: fp32 1e-5 of max|v|; bf16 output rounded to bf16, 2**-8 relative + 1e-3 of max|v|.
Every ISA path is tested (scalar code for hd not in {16, 32, 64, 128}); a sequence's output must be
bitwise the same alone, in any batch, at any position in it and with any thread count.
"""
import pytest
import torch

from glm.cpu import kernels
from glm.config import ChatGLMConfig
from glm.kvpool import KVCache


def make(B, heads, groups, hd, slots, dtype, seed, layers=3, capacity=None):
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or max(slots) + 5
    q = torch.randn(B, heads, hd, generator=g).to(dtype)
    k = torch.randn(B, groups, hd, generator=g).to(dtype)
    v = torch.randn(B, groups, hd, generator=g).to(dtype)
    kc = [torch.randn(layers, groups, capacity, hd, generator=g).to(dtype) for _ in range(B)]
    vc = [torch.randn(layers, groups, capacity, hd, generator=g).to(dtype) for _ in range(B)]
    return q, k, v, kc, vc


def reference(q, k, v, kc, vc, layer, slots):
    B, heads, hd = q.shape
    groups = k.shape[1]
    out = torch.empty(B, heads, hd, dtype=torch.float64)
    for b in range(B):
        keys = kc[b][layer, :, :slots[b] + 1].double().clone()
        values = vc[b][layer, :, :slots[b] + 1].double().clone()
        keys[:, -1], values[:, -1] = k[b].double(), v[b].double()
        for h in range(heads):
            grp = h // (heads // groups)
            p = ((keys[grp] @ q[b, h].double()) / hd ** 0.5).softmax(-1)
            out[b, h] = p @ values[grp]
    return out


def check(out, ref, v, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    vmax = v.abs().max().item()
    if dtype == torch.float32:
        tol = 1e-5 * vmax
    else:
        tol = 2 ** -8 * ref.abs() + 1e-3 * vmax
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups,hd", [(32, 2, 128), (4, 2, 16), (6, 3, 64), (4, 1, 24)])
def test_matches_reference_and_writes_cache(mod, isa, dtype, heads, groups, hd):
    slots = [0, 16, 300, 47]  # a first token, a 16-multiple + 1, longer, a masked tail
    q, k, v, kc, vc = make(len(slots), heads, groups, hd, slots, dtype, seed=hd + heads)
    layer = 1
    ref = reference(q, k, v, kc, vc, layer, slots)
    before = [c.clone() for c in kc]
    out = kernels.decode_attention(q, k, v, kc, vc, layer, slots, hd ** -0.5)
    check(out, ref, v, dtype)
    for b, s in enumerate(slots):
        assert torch.equal(kc[b][layer, :, s], k[b]) and torch.equal(vc[b][layer, :, s], v[b])
        changed = kc[b] != before[b]
        changed[layer, :, s] = False
        assert not changed.any(), "only the new token's cache row may change"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant(mod, isa, dtype):
    slots = [5, 130, 0, 64, 33, 7, 260, 16]
    q, k, v, kc, vc = make(len(slots), 32, 2, 128, slots, dtype, seed=3)
    copies = [c.clone() for c in kc], [c.clone() for c in vc]
    batch = kernels.decode_attention(q, k, v, kc, vc, 2, slots, 128 ** -0.5)
    for b in range(len(slots)):
        alone = kernels.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], [copies[0][b]], [copies[1][b]],
                                         2, [slots[b]], 128 ** -0.5)
        assert torch.equal(alone[0], batch[b]), b
    order = list(reversed(range(len(slots))))
    rev = kernels.decode_attention(q[order], k[order], v[order], [kc[i] for i in order], [vc[i] for i in order],
                                   2, [slots[i] for i in order], 128 ** -0.5)
    assert torch.equal(rev, batch[order])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.decode_attention(q, k, v, kc, vc, 2, slots, 128 ** -0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, batch)


def test_extreme_scores(mod, isa):
    """One key dominating (softmax ~one-hot) and scores far below the max (exp underflows to 0)."""
    slots = [40]
    q, k, v, kc, vc = make(1, 2, 1, 128, slots, torch.float32, seed=9)
    kc[0][0, 0, :40] = -q[0, 0] * 3  # very negative scores for head 0
    k[0, 0] = q[0, 0] * 3             # the new token's key: a huge score
    ref = reference(q, k, v, kc, vc, 0, slots)
    out = kernels.decode_attention(q, k, v, kc, vc, 0, slots, 128 ** -0.5)
    check(out, ref, v, torch.float32)
    assert torch.allclose(out[0, 0], v[0, 0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups,hd", [(32, 2, 128), (4, 2, 16), (4, 1, 24)])
def test_rotary_in_kernel_is_apply_rotary(mod, isa, dtype, heads, groups, hd):
    """cos, sin given: the kernel rotates q and k itself, bit for bit as glm.ops.apply_rotary, reading
    q, k, v as views into one qkv row per sequence (as the model passes them)."""
    from glm.model import rotary_angles
    from glm.ops import apply_rotary

    slots = [0, 17, 300]
    B = len(slots)
    g = torch.Generator().manual_seed(hd)
    qkv = (torch.randn(B, (heads + 2 * groups) * hd, generator=g) * 3).to(dtype)
    q, k, v = qkv.split([heads * hd, groups * hd, groups * hd], dim=-1)
    q, k, v = q.view(B, heads, hd), k.view(B, groups, hd), v.view(B, groups, hd)
    cfg = ChatGLMConfig(hidden_size=heads * hd, num_heads=heads, kv_heads=groups, head_dim=hd, num_layers=3)
    cos, sin = rotary_angles(cfg, torch.tensor(slots)[:, None] + 1000)  # [B, 1, hd / 4]
    assert cos.shape == (B, 1, hd // 4)
    _, _, _, kc, vc = make(B, heads, groups, hd, slots, dtype, seed=5)
    kc2, vc2 = [c.clone() for c in kc], [c.clone() for c in vc]
    fused = kernels.decode_attention(q, k, v, kc, vc, 1, slots, hd ** -0.5, cos[:, 0], sin[:, 0])
    qr = apply_rotary(q[:, None], cos, sin)[:, 0]
    kr = apply_rotary(k[:, None], cos, sin)[:, 0]
    plain = kernels.decode_attention(qr, kr, v, kc2, vc2, 1, slots, hd ** -0.5)
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(kc + vc, kc2 + vc2)), "caches must hold the rotated k, same bits"
    assert not torch.equal(kr, k), "the rotation must have changed something"


def test_input_validation(mod):
    q, k, v, kc, vc = make(2, 4, 2, 16, [3, 4], torch.float32, seed=1, capacity=5)
    with pytest.raises(RuntimeError, match="outside cache capacity"):
        kernels.decode_attention(q, k, v, kc, vc, 0, [3, 5], 0.25)
    with pytest.raises(RuntimeError, match="layer"):
        kernels.decode_attention(q, k, v, kc, vc, 3, [3, 4], 0.25)
    with pytest.raises(RuntimeError, match="one dtype|q's dtype"):
        kernels.decode_attention(q, k, v, [c.bfloat16() for c in kc], vc, 0, [3, 4], 0.25)
    with pytest.raises(RuntimeError, match="one k cache"):
        kernels.decode_attention(q, k, v, kc[:1], vc, 0, [3, 4], 0.25)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.decode_attention(q.half(), k.half(), v.half(), kc, vc, 0, [3, 4], 0.25)
    cs = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="both cos and sin"):
        kernels.decode_attention(q, k, v, kc, vc, 0, [3, 4], 0.25, cs, None)
    with pytest.raises(RuntimeError, match="2 P <= head dim"):
        kernels.decode_attention(q, k, v, kc, vc, 0, [3, 4], 0.25, torch.ones(2, 9), torch.ones(2, 9))
    with pytest.raises(RuntimeError, match="float32 \\[B, P\\]"):
        kernels.decode_attention(q, k, v, kc, vc, 0, [3, 4], 0.25, cs.double(), cs.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_uses_kernel_and_matches_torch_path(mod, tiny_dir, monkeypatch, dtype):
    """The tiny model's decode steps through the kernel (the CPU kernels' ops) agree with the
    per-sequence torch path (the torch ops)."""
    import glm

    fast = glm.load(tiny_dir, dtype=dtype)
    monkeypatch.setattr(kernels, "used_for", lambda device, dtype: False)  # the loader's choice: torch
    torch_only = glm.load(tiny_dir, dtype=dtype)
    cfg: ChatGLMConfig = fast.config
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (1, n), generator=g) for n in (5, 9)]

    def run(m):
        caches = [KVCache(cfg, 16, "cpu", dtype) for _ in prompts]
        with torch.inference_mode():
            for p, c in zip(prompts, caches):
                m.model(p, [0], [c])
            tok = torch.tensor([[7], [11]])
            return [m.model(tok, [5 + i, 9 + i], caches)[:, -1].float() for i in range(3)]

    fused = run(fast)
    assert len(calls) == 3 * cfg.num_layers
    plain = run(torch_only)
    assert len(calls) == 3 * cfg.num_layers
    tol = 1e-5 if dtype == torch.float32 else 0.02
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() <= tol * b.abs().max().item()
