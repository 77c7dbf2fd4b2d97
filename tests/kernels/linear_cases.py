"""The layers the Triton linear tests (test_gpu_linear.py, test_gpu_prefill.py) compute: THUDM's
stored int4/int8 weights with every code, fp16 activation rows, and a whole layer under test."""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def stored_weights(n: int, k: int, bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random stored codes in which every byte value appears (all 256: every int8 code and every
    pair of int4 nibbles -8..7) where there is room, and fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    cols = k // 2 if bits == 4 else k
    q = torch.randint(-128, 128, (n, cols), generator=g, dtype=torch.int16).to(torch.int8)
    q.view(-1)[:256] = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)[:q.numel()]
    scale = (torch.rand(n, generator=g) * 0.02 + 0.001).half()
    return q.to(DEVICE), scale.to(DEVICE)


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).half().to(DEVICE)


def linear_under_test(n: int, k: int, bits: int, seed: int):
    """glm.gpu.linear's layer as a function of its input rows (and keywords such as exact_rows):
    bits 16 is an fp16 weight without bias, 4 and 8 THUDM's stored codes with a bias."""
    from glm.gpu import linear

    if bits == 16:
        weight = activations(n, k, seed) * 0.05
        return lambda rows, **kw: linear.half_linear(rows, weight, **kw)
    qweight, scale = stored_weights(n, k, bits, seed)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1).half().to(DEVICE)
    return lambda rows, **kw: linear.quant_linear(rows, qweight, scale, bias, bits, **kw)
