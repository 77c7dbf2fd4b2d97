"""The operations a model's layers compute with, and their reference implementation in torch.

The loader picks one implementation when it loads a model and hands it to every layer (`ops`):
`TorchOps` here (any device, no compiled code), `glm.cpu.ops.CpuOps` (the fused CPU kernels) or
`glm.gpu.ops.TritonOps` (the Triton kernels). The models call `ops.<op>` and nothing else, so they
have one path whatever computes them; an implementation overrides what its kernels do better.

Exact rows: with `exact_rows` on, a position's row is the same bits in whatever prefill chunk
computes it, so cached KV reproduces a recomputation bit for bit (the engine's prefix cache turns
it on for its steps with `rows_exactly`). `computes_rows_exactly` says whether that is possible.
A model runs a prompt's rows (rows the prefix cache may keep) inside `prefill_rows()`. Where a
decode step computes a row as such a prefill does, `decode_writes_prefill_kv` is True; where not
(TritonOps: prefill in fixed-size tensor-core chunks, decode in the GEMV), the engine recomputes a
reply's decoded rows as prefill before the cache keeps them.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .config import ChatGLMConfig
from .quant import dequantize, int8_activation_linear

# Output rows of an fp16 weight widened at a time for a dense GEMM (bf16 prefill, or no kernels):
# bounds the transient copy to BLOCK_ROWS x in_features instead of the whole matrix (the 65024 x 4096
# output layer: 0.5 GB in bf16, 1 GB in fp32), so peak memory stays near the checkpoint's size.
BLOCK_ROWS = 4096


class TorchOps:
    """torch ops only: the reference every other implementation is tested against.

    int8_activations (CPU, int4 weights, float32 x): quantized linears quantize each row of x to
    int8 and multiply as integers (glm.quant.int8_activation_linear), the opt-in numerics that
    the CPU kernels compute with VNNI.
    """

    name = "torch"
    # Whether fp16 checkpoint weights are read as they are (else the loader casts them once).
    reads_half_weights = False
    exact_rows = False
    # Whether a decode step writes a position's KV as an exact prefill of it would (prefill_rows).
    decode_writes_prefill_kv = True

    def __init__(self, int8_activations: bool = False):
        self.int8_activations = int8_activations

    # ---- the exact-rows setting ----
    def computes_rows_exactly(self, dtype: torch.dtype, half_weights: bool) -> bool:
        """Whether, with exact_rows on, every row is the same bits in any prefill chunk (and in a
        decode step where decode_writes_prefill_kv), for activations in `dtype` (half_weights: the blocks have fp16 dense linears). torch's
        GEMMs and SDPA round a row differently depending on how many rows there are: never."""
        return False

    @contextmanager
    def rows_exactly(self, on: bool = True):
        """exact_rows set to `on` for the body, then back to what it was."""
        before, self.exact_rows = self.exact_rows, on
        try:
            yield
        finally:
            self.exact_rows = before

    def prefill_rows(self):
        """The context a prompt's rows run in (the same as any other rows here)."""
        return nullcontext()

    # ---- pointwise ----
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight * xf).to(x.dtype)

    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for h = [gate | up] along the last dim (ChatGLM2's MLP)."""
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    # ---- linears (x [M, K]) ----
    def quant_linear(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None, bits: int) -> torch.Tensor:
        """x @ W^T + b for W in THUDM's int4 / int8 layout (glm.quant)."""
        bias = _cast(bias, x.dtype)
        if x.is_cuda:
            # THUDM's GPU path with torch ops instead of its embedded cpm_kernels binary: dequantize
            # to fp16 (each product rounded to half, as its kernel does), then an fp16 GEMM. Runs on
            # any CUDA GPU, a T4 (sm_75) included; torch's int4 GEMM kernels need sm_80.
            w = dequantize(qweight, scale.half(), bits, torch.float16).to(x.dtype)
            return F.linear(x, w, bias)
        if self.int8_activations and bits == 4 and x.dtype == torch.float32:
            return int8_activation_linear(x, qweight, scale, bias)
        return F.linear(x, dequantize(qweight, scale, bits, x.dtype), bias)

    def half_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T + b for a weight kept in fp16 whatever x's dtype."""
        bias = _cast(bias, x.dtype)
        if weight.dtype == x.dtype:
            return F.linear(x, weight, bias)
        return blocked_linear(x.contiguous(), weight.shape[0], bias, lambda s, e, out: out.copy_(weight[s:e]))

    # ---- attention over the KV caches ----
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, layer: int, starts: list[int], caches) -> torch.Tensor:
        """ChatGLM2's causal self-attention: q [B, T, heads, hd], k, v [B, T, groups, hd] of the
        tokens at positions starts[b].., rotated here (apply_rotary with cos, sin [B, T, hd/4]);
        k, v are stored in each sequence's cache. Returns [B, T, heads, hd]."""
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Each sequence attends over its own cache: rows never see each other, and a row's result
        # does not depend on what else is in the batch.
        out = []
        for b, cache in enumerate(caches):
            keys, values = cache.update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
            out.append(attend(q[b].transpose(0, 1), keys, values, cache.offset + starts[b]))
        return torch.stack(out).transpose(1, 2)

    def masked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: list,
                         layer: int, starts: list[int], caches) -> torch.Tensor:
        """ChatGLM-6B's attention: q, k, v [B, T, heads, hd], q and k already rotated; a decode row
        (T = 1) sees every key, a prompt row the keys masks[b] allows ([T, S] bool, None: all).
        Returns [B, T, heads, hd]."""
        T = q.shape[1]
        out = []
        for b, cache in enumerate(caches):
            keys, values = cache.update(layer, starts[b], k[b].transpose(0, 1), v[b].transpose(0, 1))
            qb = q[b].transpose(0, 1)
            if T == 1:  # the plain decode path (CPU SDPA is slow at T=1)
                out.append(attend(qb, keys, values, starts[b]))
            else:
                out.append(F.scaled_dot_product_attention(qb, keys, values, attn_mask=masks[b]))
        return torch.stack(out).transpose(1, 2)


def rotary_angles(cfg: ChatGLMConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, rot/2] for the rotated half of each head (fp32).

    rope_ratio (ChatGLM2-32K) interpolates positions; it does not change the base. Computed in fp32
    for every position (THUDM's HF code rounds positions > 2048 to fp16 under torch_dtype=float16;
    chatglm.cpp and we do not).
    """
    rot = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, rot, 2, device=positions.device, dtype=torch.float32) / rot))
    angles = (positions.float() / cfg.rope_ratio)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ChatGLM2's rotary: rotate adjacent pairs (x[2i], x[2i+1]) of the first half of the head dim.
    x: [B, T, heads, hd]; cos, sin [B, T, hd/4]."""
    rot = x.shape[-1] // 2
    xr = x[..., :rot].float().unflatten(-1, (rot // 2, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at cache slots start.. over keys 0..start+T-1.

    q: [heads, T, hd]; k, v: [groups, S, hd]; query head h uses group h // (heads / groups).
    """
    heads, T, hd = q.shape
    groups, S, _ = k.shape
    if T == 1:
        # Decode: one grouped matmul per step. (CPU SDPA costs far more than the math here.)
        qg = q.view(groups, heads // groups, hd)
        scores = (qg @ k.transpose(1, 2)).float() * hd ** -0.5
        return (scores.softmax(-1).to(v.dtype) @ v).view(heads, 1, hd)
    if q.is_cuda and groups != heads:
        # Expanded so that SDPA can pick a fused kernel (its GQA mode is math-only on a T4).
        k = k.repeat_interleave(heads // groups, dim=0)
        v = v.repeat_interleave(heads // groups, dim=0)
    q, k, v = q[None], k[None], v[None]
    gqa = k.shape[1] != heads
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out[0]


def blocked_linear(x: torch.Tensor, out_features: int, bias: torch.Tensor | None, widen) -> torch.Tensor:
    """x @ W^T + b, W widened block by block by widen(start, end, out) into one reused buffer."""
    block_rows = BLOCK_ROWS
    y = x.new_empty(x.shape[0], out_features)
    buf = x.new_empty(min(block_rows, out_features), x.shape[1])
    for s in range(0, out_features, block_rows):
        e = min(s + block_rows, out_features)
        y[:, s:e] = x @ widen(s, e, buf[:e - s]).t()
    if bias is not None:
        y += bias
    return y


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
