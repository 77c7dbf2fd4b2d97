"""glm.gpu.linear's Triton kernels (the Triton interpreter on CPU tensors when there is no GPU):
numbers against a float64 reference of the dequantized weight, bitwise batch invariance of the
decode kernel, odd shapes and tails, and the QuantLinear / HalfLinear dispatch."""
from __future__ import annotations

import pytest
import torch

from glm.gpu.ops import TritonOps
from glm.quant import HalfLinear, QuantLinear, dequantize, half_weight_linear, quantize

gpu_linear = pytest.importorskip("glm.gpu.linear", exc_type=ImportError)
from glm.gpu import prefill as gpu_prefill  # noqa: E402
from linear_cases import DEVICE, activations, linear_under_test, stored_weights  # noqa: E402


def reference(x, weight, bias=None):
    """float64 x @ W^T + b, W already dequantized exactly (integers times fp16 scales)."""
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


def assert_close_to(y: torch.Tensor, ref: torch.Tensor):
    """Within fp16 output rounding plus fp32 accumulation error of the float64 reference."""
    assert y.dtype == torch.float16 and y.shape == ref.shape
    err = (y.double().cpu() - ref.cpu()).abs()
    bound = 2e-3 * ref.abs().cpu() + 1e-4 * ref.abs().max().item() + 1e-6
    assert (err <= bound).all(), f"max error {err.max().item():.3g} (ref max {ref.abs().max().item():.3g})"


@pytest.mark.parametrize("bits", [4, 8])
# decode GEMV (<= 8 rows), prefill GEMM, dequantize + tensor-core GEMM (>= 80 rows), M tails
@pytest.mark.parametrize("m", [1, 3, 8, 9, 79, 85])
@pytest.mark.parametrize("n,k", [(37, 300), (64, 512), (5, 2)])  # N and K tails, K < one tile
def test_quant_linear_matches_float64_reference(bits, m, n, k):
    qweight, scale = stored_weights(n, k, bits)
    bias = (torch.randn(n) * 0.1).half().to(DEVICE)
    x = activations(m, k)
    # From MIN_ROWS rows the weights are dequantized to fp16 first (each product rounded to half,
    # as THUDM's kernel does): the reference multiplies those.
    dtype = torch.float16 if m >= gpu_prefill.MIN_ROWS else torch.float64
    w = dequantize(qweight.cpu(), scale.cpu(), bits, dtype)
    y = gpu_linear.quant_linear(x, qweight, scale, bias, bits)
    assert_close_to(y, reference(x.cpu(), w, bias.cpu()))
    assert_close_to(gpu_linear.quant_linear(x, qweight, scale, None, bits), reference(x.cpu(), w))


def test_int4_nibble_order_high_nibble_first():
    # Bytes 0x7F and 0x81: columns 7, -1 (low nibble 0xF sign-extended), -8, 1 -- high nibble first.
    qweight = torch.tensor([[0x7F, 0x81 - 256]], dtype=torch.int8, device=DEVICE)
    scale = torch.tensor([0.5], dtype=torch.float16, device=DEVICE)
    x = torch.eye(4, dtype=torch.float16, device=DEVICE)
    for rows in (x[:1], x):  # the decode kernel, 1 and 4 rows; then the GEMM with 12 rows
        y = gpu_linear.quant_linear(rows, qweight, scale, None, 4)
        assert y.cpu().flatten().tolist() == [3.5, -0.5, -4.0, 0.5][:rows.shape[0]]
    y = gpu_linear.quant_linear(x.repeat(3, 1), qweight, scale, None, 4)
    assert y.cpu().flatten().tolist() == [3.5, -0.5, -4.0, 0.5] * 3


@pytest.mark.parametrize("m", [1, 8, 9, 70])
def test_half_linear_matches_float64_reference(m):
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(45, 200, generator=g) * 0.05).half().to(DEVICE)
    x = activations(m, 200)
    assert_close_to(gpu_linear.half_linear(x, weight), reference(x.cpu(), weight.cpu()))


def test_thudm_quantized_layer_close_to_fp16_weights():
    # quantize() is THUDM's quantizer: the kernel's output is x @ (q * s)^T, near the fp16 layer.
    g = torch.Generator().manual_seed(4)
    weight = (torch.randn(48, 256, generator=g) * 0.02).half()
    x = activations(4, 256)
    for bits in (4, 8):
        qweight, scale = quantize(weight, bits)
        y = gpu_linear.quant_linear(x, qweight.to(DEVICE), scale.to(DEVICE), None, bits)
        assert_close_to(y, reference(x.cpu(), dequantize(qweight, scale, bits, torch.float64)))


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_decode_rows_bitwise_batch_invariant(bits):
    """A row's output is the same bits alone and at any position in a batch of 1..8 rows."""
    n, k = 40, 384
    x = activations(8, k, seed=7)
    run = linear_under_test(n, k, bits, seed=8)
    alone = torch.cat([run(x[i:i + 1]) for i in range(8)])
    for m in range(1, 9):
        assert torch.equal(run(x[:m]), alone[:m]), f"batch of {m} differs from rows alone"
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    assert torch.equal(run(x[perm]), alone[perm])


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_exact_rows_are_decode_rows_at_any_row_count(bits):
    """exact_rows: prefill's many rows go through the decode kernel in blocks of 8, so every row is
    the bits it gets alone (as a decode step computes it), at any row count and position."""
    n, k = 40, 384
    x = activations(37, k, seed=11)
    run = linear_under_test(n, k, bits, seed=12)
    alone = torch.cat([run(x[i:i + 1], exact_rows=False) for i in range(len(x))])
    for m in (9, 16, 23, 37):
        assert torch.equal(run(x[:m], exact_rows=True), alone[:m]), f"{m} rows differ from the rows alone"
    assert torch.equal(run(x[5:29], exact_rows=True), alone[5:29])


def test_quant_linear_computes_on_the_triton_ops():
    layer = QuantLinear(256, 24, bits=4, bias=True, ops=TritonOps())
    qweight, scale = stored_weights(24, 256, 4, seed=9)
    layer.weight, layer.weight_scale = qweight, scale
    layer.bias = (torch.randn(24) * 0.1).half().to(DEVICE)
    x = activations(6, 256).view(2, 3, 256)
    y = layer(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float16
    expected = gpu_linear.quant_linear(x.view(6, 256), qweight, scale, layer.bias, 4)
    assert torch.equal(y.view(6, 24), expected)


def test_half_linear_computes_on_the_triton_ops():
    ops = TritonOps()
    head = HalfLinear(128, 33, ops=ops)
    head.weight = (activations(33, 128, seed=10) * 0.05)
    x = activations(2, 128).view(1, 2, 128)
    expected = gpu_linear.half_linear(x.view(2, 128), head.weight)
    assert torch.equal(head(x).view(2, 33), expected)
    assert torch.equal(half_weight_linear(ops, x, head.weight).view(2, 33), expected)


def test_exact_rows_is_set_for_a_step_and_cleared(monkeypatch):
    """ops.rows_exactly(): the linears ask the kernels for exact rows (each row as the decode GEMV
    computes it alone) inside it and not after it, even when the step inside fails."""
    ops = TritonOps()
    layer = QuantLinear(256, 24, bits=4, ops=ops)
    layer.weight, layer.weight_scale = stored_weights(24, 256, 4, seed=9)
    x = activations(12, 256, seed=4)
    asked = []
    real = gpu_linear.quant_linear
    monkeypatch.setattr(gpu_linear, "quant_linear",
                        lambda *a, exact_rows: asked.append(exact_rows) or real(*a, exact_rows=exact_rows))
    with ops.rows_exactly():
        exact = layer(x)
    layer(x)
    with pytest.raises(RuntimeError, match="step failed"):
        with ops.rows_exactly():
            raise RuntimeError("step failed")
    layer(x)
    assert asked == [True, False, False] and not ops.exact_rows
    alone = torch.cat([real(x[i:i + 1], layer.weight, layer.weight_scale, None, 4) for i in range(len(x))])
    assert torch.equal(exact, alone)


def test_bad_input_is_a_clear_error():
    qweight, scale = stored_weights(16, 64, 4)
    with pytest.raises(ValueError, match="fp16"):
        gpu_linear.quant_linear(activations(2, 64).float(), qweight, scale, None, 4)
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        gpu_linear.quant_linear(activations(2, 63), qweight, scale, None, 4)
    with pytest.raises(ValueError, match="bits"):
        gpu_linear.quant_linear(activations(2, 64), qweight, scale, None, 3)
    with pytest.raises(ValueError, match="scale"):
        gpu_linear.quant_linear(activations(2, 64), qweight, scale[:3], None, 4)


def test_bytes_moved_reads_each_stored_weight_once():
    # ChatGLM2-6B's dense_h_to_4h in int4: 27392 x 4096 weights, 0.5 bytes each, plus scales and I/O.
    n, k = 27392, 4096
    assert gpu_linear.bytes_moved(1, n, k, 4) == n * k // 2 + 2 * n + 2 * k + 2 * n
    # Eight decode rows read the weights once too: only the activations grow.
    assert gpu_linear.bytes_moved(8, n, k, 4) - gpu_linear.bytes_moved(1, n, k, 4) == 7 * 2 * (k + n)


def test_decode_bytes_per_weight_targets():
    """ChatGLM2-6B int4 on our kernels: <= 0.6 bytes per weight per decode step at batch 1, and at 8
    streams the weights are read once per step (only the activations grow)."""
    from glm.config import ChatGLMConfig
    from glm.gpu import roofline

    cfg = ChatGLMConfig(quantization_bit=4)
    weights = sum(n * k for n, k, _, _ in roofline.linear_shapes(cfg))
    assert weights == 28 * 4096 * (4608 + 4096 + 27392 + 13696) + 65024 * 4096
    one = roofline.step_bytes(cfg, "triton", 1)
    assert one / weights <= 0.6
    activations_8 = sum(2 * 7 * (n + k) for n, k, _, _ in roofline.linear_shapes(cfg))
    assert roofline.step_bytes(cfg, "triton", 8) - one == activations_8
    # Today's torch path moves ~14 bytes per int4 weight, THUDM's 4.5 (the figures).
    assert 13 < roofline.step_bytes(cfg, "torch", 1) / weights < 14
    assert 4.3 < roofline.step_bytes(cfg, "thudm", 1) / weights < 4.5
