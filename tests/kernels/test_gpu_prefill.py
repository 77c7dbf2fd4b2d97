"""glm.gpu.prefill (the Triton interpreter on CPU tensors when there is no GPU): the dequantize kernel
bit for bit against glm.quant.dequantize, the dequantize + matmul linears against a float64
reference, the row-count dispatch of glm.gpu.linear, and the row invariance of fixed-size chunks.

What CPU tensors prove about exact chunks: torch.matmul at one fixed shape gives row i the same bits
whatever the other rows hold (the kernel is chosen from the shape, and each output's reduction order
from the kernel), and the chunking code pads, slices and reassembles rows without mixing them. That
cuBLAS on a T4 keeps the same property at [256, K] x [K, N] is what `python -m glm.gpu selftest`
and bench/gpu.py check on the device (the cached vs uncached text and KV)."""
from __future__ import annotations

import pytest
import torch

from glm.quant import dequantize

gpu_prefill = pytest.importorskip("glm.gpu.prefill", exc_type=ImportError)
from glm.gpu import linear as gpu_linear  # noqa: E402
from linear_cases import DEVICE, activations, linear_under_test, stored_weights  # noqa: E402


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(37, 300), (16, 512), (5, 2), (3, 1030)])  # tails in N and K
def test_dequantize_is_bitwise_thudms_fp16_dequantization(bits, n, k):
    q, scale = stored_weights(n, k, bits)
    got = gpu_prefill.dequantize(q, scale, bits)
    want = dequantize(q.cpu(), scale.cpu(), bits, torch.float16)
    assert got.shape == (n, k) and got.dtype == torch.float16
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


def test_dequantize_nibble_order_and_sign():
    # 0x7F, 0x81, 0x08: columns 7, -1, -8, 1, 0, -8 (high nibble first, both sign-extended).
    q = torch.tensor([[0x7F, 0x81 - 256, 0x08]], dtype=torch.int8, device=DEVICE)
    w = gpu_prefill.dequantize(q, torch.tensor([0.5], dtype=torch.float16, device=DEVICE), 4)
    assert w.cpu().flatten().tolist() == [3.5, -0.5, -4.0, 0.5, 0.0, -4.0]
    q8 = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8, device=DEVICE)
    w8 = gpu_prefill.dequantize(q8, torch.tensor([1.0], dtype=torch.float16, device=DEVICE), 8)
    assert w8.cpu().flatten().tolist() == [-128.0, -1.0, 0.0, 127.0]


def assert_fp16_of(y: torch.Tensor, x: torch.Tensor, w16: torch.Tensor, bias=None):
    """y is x @ w16^T (+ bias) with fp32 accumulation, rounded once: within an fp16 rounding of the
    float64 product (plus accumulation error)."""
    ref = x.double().cpu() @ w16.double().cpu().t()
    if bias is not None:
        ref = ref + bias.double().cpu()
    err = (y.double().cpu() - ref).abs()
    assert (err <= 1e-3 * ref.abs() + 1e-5 * ref.abs().max() + 1e-6).all(), f"max error {err.max():.3g}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("chunk", [None, 16])
def test_quant_linear_on_tensor_cores(bits, chunk):
    q, scale = stored_weights(40, 256, bits, seed=2)
    bias = (torch.randn(40) * 0.1).half().to(DEVICE)
    x = activations(37, 256)
    w16 = dequantize(q.cpu(), scale.cpu(), bits, torch.float16)
    assert_fp16_of(gpu_prefill.quant_linear(x, q, scale, bias, bits, chunk), x, w16, bias)
    assert_fp16_of(gpu_prefill.quant_linear(x, q, scale, None, bits, chunk), x, w16)


def test_scale_is_applied_once():
    # An all-ones layer with scale 2: each output is 2 * sum(x), not 4 * sum(x) and not sum(x).
    q = torch.full((4, 8), 0x11, dtype=torch.int8, device=DEVICE)  # nibbles 1, 1
    scale = torch.full((4,), 2.0, dtype=torch.float16, device=DEVICE)
    x = torch.ones(gpu_prefill.MIN_ROWS, 16, dtype=torch.float16, device=DEVICE)
    y = gpu_linear.quant_linear(x, q, scale, torch.ones(4, dtype=torch.float16, device=DEVICE), 4)
    assert y.cpu().unique().tolist() == [33.0]


def test_row_count_dispatch():
    """Below MIN_ROWS glm.gpu.linear's kernels, from it the tensor-core path: same bits as calling it."""
    q, scale = stored_weights(24, 128, 4, seed=3)
    x = activations(gpu_prefill.MIN_ROWS, 128, seed=4)
    assert torch.equal(gpu_linear.quant_linear(x, q, scale, None, 4), gpu_prefill.quant_linear(x, q, scale, None, 4))
    below = x[:-1]
    assert not torch.equal(gpu_linear.quant_linear(below, q, scale, None, 4),
                           gpu_prefill.quant_linear(below, q, scale, None, 4))
    # exact_rows keeps the decode GEMV at any count (outside an exact chunk)
    alone = torch.cat([gpu_linear.quant_linear(x[i:i + 1], q, scale, None, 4) for i in range(3)])
    assert torch.equal(gpu_linear.quant_linear(x, q, scale, None, 4, exact_rows=True)[:3], alone)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_exact_chunks_give_a_row_the_same_bits_anywhere(bits):
    """Row i alone, in a chunk among others, across a chunk boundary, at any offset: bitwise equal."""
    n, k, chunk = 40, 256, 16
    x = activations(45, k, seed=5)
    run = linear_under_test(n, k, bits, seed=6)
    with gpu_prefill.exact_chunks(chunk):
        alone = torch.cat([run(x[i:i + 1]) for i in range(len(x))])
        for s, e in ((0, 45), (3, 40), (7, 8), (15, 33), (0, 16)):
            assert torch.equal(run(x[s:e]), alone[s:e]), f"rows {s}:{e} differ from the rows alone"
    assert gpu_prefill.chunk_rows() is None  # the context is left as it was


def test_scratch_is_shared_between_layers():
    qa, sa = stored_weights(48, 256, 4, seed=7)
    qb, sb = stored_weights(16, 512, 8, seed=8)
    x, z = activations(64, 256, seed=9), activations(64, 512, seed=10)
    ya = gpu_prefill.quant_linear(x, qa, sa, None, 4)
    yb = gpu_prefill.quant_linear(z, qb, sb, None, 8)
    assert torch.equal(gpu_prefill.quant_linear(x, qa, sa, None, 4), ya)
    assert_fp16_of(yb, z, dequantize(qb.cpu(), sb.cpu(), 8, torch.float16))
    assert gpu_prefill.SCRATCH.reserve(0, DEVICE).numel() >= 48 * 256


def test_causal_attention_close_to_sdpa_and_the_same_bits_in_any_chunk():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(11)
    heads, groups, hd, S = 4, 2, 128, 70
    q = torch.randn(heads, S, hd, generator=g).half().to(DEVICE)
    k, v = (torch.randn(groups, S, hd, generator=g).half().to(DEVICE) for _ in range(2))
    whole = gpu_prefill.causal_attention(q, k, v)
    ke, ve = (t.float().repeat_interleave(heads // groups, 0)[None] for t in (k, v))
    ref = F.scaled_dot_product_attention(q.float()[None], ke, ve, is_causal=True)[0]
    assert (whole.float() - ref).abs().max() < 2e-3
    # rows s..e as a prefill chunk over slots 0..e: within a 32-row block, across blocks, one row
    for s, e in ((0, 1), (5, 40), (33, 70), (69, 70), (31, 33)):
        part = gpu_prefill.causal_attention(q[:, s:e], k[:, :e], v[:, :e])
        assert torch.equal(part, whole[:, s:e]), f"rows {s}:{e} differ from the whole prompt's"
