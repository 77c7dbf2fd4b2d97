"""THUDM's int4/int8 format (FORMATS.md) and the Linear modules that compute from it."""
from __future__ import annotations

import pytest
import torch

import glm
from glm.loader import choose_ops
from glm.ops import TorchOps
from glm.quant import HalfLinear, QuantLinear, dequantize, pack_int4, quantize, unpack_int4


def test_int4_nibble_order_matches_formats_md():
    # columns (2j, 2j+1) -> byte (high nibble, low nibble), two's complement
    q = torch.tensor([[-7, 3, 0, 7, -1, -8, 5, -2]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (1, 4)
    assert [b & 0xFF for b in packed[0].tolist()] == [0x93, 0x07, 0xF8, 0x5E]
    # dequantization rule from FORMATS.md section 4, written out per byte
    for j, b in enumerate(packed[0].tolist()):
        assert b >> 4 == q[0, 2 * j]
        lo = (b & 0x0F) - 16 if b & 0x08 else b & 0x0F
        assert lo == q[0, 2 * j + 1]


def test_int4_pack_unpack_round_trip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(16)[torch.randperm(256)].view(8, 32)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    b = torch.arange(-128, 128, dtype=torch.int8).view(4, 64)
    assert torch.equal(pack_int4(unpack_int4(b)), b)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_is_thudm_math_in_fp16(bits):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 64, generator=g) * 0.05).half()
    q, scale = quantize(w, bits)
    maxq = 2 ** (bits - 1) - 1
    # absmax / maxq per row, in fp16; codes = round-half-even(w / scale) in fp16
    want_scale = (w.abs().max(dim=-1).values / maxq)
    assert scale.dtype == torch.float16 and torch.equal(scale, want_scale)
    codes = torch.round(w / want_scale[:, None]).to(torch.int8)
    assert codes.abs().max() <= maxq
    assert torch.equal(unpack_int4(q) if bits == 4 else q, codes)
    assert q.shape == ((48, 32) if bits == 4 else (48, 64))


def test_quantize_all_zero_row_gives_zero_codes():
    w = torch.zeros(2, 8, dtype=torch.float16)
    w[1, 3] = 1.0
    q, scale = quantize(w, 4)
    assert unpack_int4(q)[0].abs().sum() == 0 and scale[0] == 0
    assert unpack_int4(q)[1, 3] == 7


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 40, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_fp32_dequantize_then_matmul(bits, rows, dtype):
    g = torch.Generator().manual_seed(bits * 100 + rows)
    n, k = 96, 128
    q, scale = quantize((torch.randn(n, k, generator=g) * 0.02).half(), bits)
    bias = (torch.randn(n, generator=g) * 0.1).half()
    lin = QuantLinear(k, n, bits, bias=True, ops=choose_ops("cpu", dtype))
    lin.load_state_dict({"weight": q, "weight_scale": scale, "bias": bias})
    x = torch.randn(rows, k, generator=g).to(dtype)
    ref = x.float() @ (unpack_int4(q) if bits == 4 else q).float().mul(scale.float()[:, None]).T + bias.float()
    got = lin(x)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("rows", [5, 100])
def test_half_linear_matches_fp32(rows):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g).half()
    lin = HalfLinear(64, 40, ops=choose_ops("cpu", torch.float32))
    lin.load_state_dict({"weight": w})
    x = torch.randn(rows, 64, generator=g)
    torch.testing.assert_close(lin(x), x @ w.float().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_inputs_give_each_row_what_it_gets_alone(bits, dtype):
    """Prefill-sized inputs go through the fused kernels in chunks: every row is bitwise what it is
    when computed alone (so a prompt's chunking never changes its cache or logits)."""
    g = torch.Generator().manual_seed(bits)
    n, k = 48, 256
    q, scale = quantize((torch.randn(n, k, generator=g) * 0.02).half(), bits)
    lin = QuantLinear(k, n, bits, ops=choose_ops("cpu", dtype))
    lin.load_state_dict({"weight": q, "weight_scale": scale})
    x = torch.randn(77, k, generator=g).to(dtype)
    whole = lin(x)
    for i in (0, 31, 32, 33, 76):
        assert torch.equal(whole[i], lin(x[i:i + 1])[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_cuda_fp16_matches_reference(bits):
    g = torch.Generator().manual_seed(7)
    q, scale = quantize((torch.randn(256, 512, generator=g) * 0.02).half(), bits)
    lin = QuantLinear(512, 256, bits, ops=TorchOps()).cuda()
    lin.load_state_dict({"weight": q, "weight_scale": scale})
    x = torch.randn(4, 512, generator=g)
    ref = x @ dequantize(q, scale, bits).T
    got = lin(x.half().cuda()).float().cpu()
    assert (got - ref).abs().max() <= 5e-3 * ref.abs().max()


def fp32_reference_model(path):
    """The same checkpoint with every quantized weight dequantized to fp32 plain nn.Linear layers, on
    the torch ops."""
    from glm.loader import Checkpoint, PREFIX, build_model
    from glm.config import ChatGLMConfig
    cfg = ChatGLMConfig.from_file(path / "config.json")
    ckpt = Checkpoint(path)
    model = build_model(cfg, TorchOps())
    state = {}
    for name, meta in model.state_dict().items():
        key = PREFIX + name
        t = ckpt.get(key)
        if t.dtype == torch.int8:
            t = dequantize(t, ckpt.get(key + "_scale"), cfg.quantization_bit)
        state[name] = t.float()
    model.load_state_dict(state, assign=True)
    return model.float()


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny8_dir"])
def test_quantized_checkpoint_logits_match_dequantized_fp32_model(fixture, request):
    path = request.getfixturevalue(fixture)
    m = glm.load(path)
    ids = m.tokenizer.encode("[Round 1]\n\n问：你好, world 👋\n\n答：")
    ref_model = fp32_reference_model(path)
    from glm.kvpool import KVCache
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids]), [0], [KVCache(m.config, len(ids), "cpu", torch.float32)])[0]
    got = m.logits(ids)
    # identical math up to fp32 summation order: 1e-4 of the logit scale
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (got - ref).abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load_reproduces_thudm_bytes(bits, tiny_fp16_dir, tiny_dir, tiny8_dir):
    # devtools.tiny draws the same fp16 weights for every --bits and quantizes them with THUDM's math,
    # so quantize-on-load of the fp16 checkpoint must give the int checkpoint's exact bytes.
    stored = glm.load(tiny_dir if bits == 4 else tiny8_dir)
    quantized = glm.load(tiny_fp16_dir, quantize=bits)
    assert quantized.config.quantization_bit == bits
    qs, ss = stored.model.state_dict(), quantized.model.state_dict()
    n = 0
    for name, t in qs.items():
        if t.dtype == torch.int8 or name.endswith("weight_scale"):
            assert torch.equal(t, ss[name]), name
            n += 1
    assert n == 4 * 2 * stored.config.num_layers
