"""KV memory for the engine: one pool for the whole KV budget, allocated once.

Each running sequence owns one contiguous extent of the pool (prompt + max_new_tokens tokens), so its
cache is a contiguous [layers, groups, capacity, head_dim] tensor: kernels that take one cache per
sequence use it as is, and a kernel launched once for the whole batch addresses every cache from the
pool's base and each sequence's element offset (`KVPool.element_offset`).

`KVCache` is one sequence's cache (a view of the pool, or its own memory for a single forward pass);
`ExtentAllocator` is the bookkeeping (plain Python, no tensors: the scheduler's view of memory);
`KVPool` holds the tensors. On CUDA the pool is touched at creation, so a budget that does not fit
fails at setup, never in the middle of a request; on the CPU pages are committed as they are first
written.
"""
from __future__ import annotations

import bisect

import torch

from .config import ChatGLMConfig


class KVCache:
    """One sequence's keys and values for every layer, preallocated for `capacity` tokens.

    Only the kv groups are stored (2 at full size, multi-query attention): [layers, groups, capacity, head_dim].
    A P-tuning v2 prefix ([layers, 2 (k, v), groups, prefix_len, head_dim]) occupies the first
    slots: it is visible to every token and takes no position.
    """

    def __init__(self, cfg: ChatGLMConfig, capacity: int, device, dtype: torch.dtype,
                 prefix: torch.Tensor | None = None, storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        """storage: flat (k, v) tensors to view instead of allocating (an extent of a KVPool)."""
        self.offset = 0 if prefix is None else prefix.shape[3]
        shape = (cfg.num_layers, cfg.kv_heads, self.offset + capacity, cfg.head_dim)
        if storage is None:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        else:
            self.k, self.v = (t.view(shape) for t in storage)
        if prefix is not None:
            self.k[:, :, :self.offset] = prefix[:, 0]
            self.v[:, :, :self.offset] = prefix[:, 1]
        self.capacity = capacity
        # ChatGLM-6B's prompt layout, set from its prompt by glm.model_v1.record_layout: where the
        # context ends and where its mask token is (every token past the context takes that position).
        self.context_length = self.mask_position = 0

    @staticmethod
    def bytes_per_token(cfg: ChatGLMConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def slot(self, start: int, n: int = 1) -> int:
        """The cache slot of position `start`, checking that n tokens from there fit."""
        if start + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {start + n} > capacity {self.capacity}")
        return self.offset + start

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([groups, T, head_dim]) at positions start.. and return all keys/values so far."""
        start = self.slot(start, k.shape[1])
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


class ExtentAllocator:
    """First-fit allocation of contiguous token ranges in [0, size); freed ranges coalesce."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []  # (start, length), sorted

    def allocate(self, n: int) -> int | None:
        """Start of a free range of n tokens, or None when no free range is that long."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def free(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self._free, (start, 0))
        if (i > 0 and sum(self._free[i - 1]) > start) or (i < len(self._free) and start + n > self._free[i][0]):
            raise ValueError(f"extent [{start}, {start + n}) is not allocated")
        self._free.insert(i, (start, n))
        # Merge with the right neighbour, then the left one.
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i] = (start, n + self._free.pop(i + 1)[1])
        if i > 0 and sum(self._free[i - 1]) == start:
            prev_start, prev_len = self._free[i - 1]
            self._free[i - 1] = (prev_start, prev_len + self._free.pop(i)[1])

    @property
    def free_tokens(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)


class KVPool:
    """Flat k and v storage for `tokens` tokens of every layer's KV groups, in the model's dtype."""

    def __init__(self, cfg: ChatGLMConfig, tokens: int, device, dtype: torch.dtype):
        self.cfg, self.tokens = cfg, tokens
        self.token_elements = cfg.num_layers * cfg.kv_heads * cfg.head_dim
        size = tokens * self.token_elements
        self.k = torch.empty(size, device=device, dtype=dtype)
        self.v = torch.empty(size, device=device, dtype=dtype)
        if self.k.is_cuda:
            self.k.zero_()
            self.v.zero_()

    @staticmethod
    def bytes_per_token(cfg: ChatGLMConfig, dtype: torch.dtype) -> int:
        return KVCache.bytes_per_token(cfg, dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def cache(self, start: int, capacity: int) -> KVCache:
        """The KVCache viewing tokens [start, start + capacity) of the pool."""
        if not 0 <= start <= start + capacity <= self.tokens:
            raise ValueError(f"extent [{start}, {start + capacity}) outside the pool of {self.tokens} tokens")
        lo, hi = start * self.token_elements, (start + capacity) * self.token_elements
        return KVCache(self.cfg, capacity, self.k.device, self.k.dtype, storage=(self.k[lo:hi], self.v[lo:hi]))

    def element_offset(self, cache: KVCache) -> int:
        """Where a cache of this pool starts, in elements from the pool's base."""
        return (cache.k.data_ptr() - self.k.data_ptr()) // self.k.element_size()

    def shrink(self, start: int, capacity: int, n: int) -> None:
        """Rearrange the extent [start, start + capacity) in place so that its first n tokens form an
        extent of n tokens (the layout of `cache(start, n)`); the caller frees the rest."""
        if not 0 <= n <= capacity:
            raise ValueError(f"cannot keep {n} tokens of a {capacity}-token extent")
        if n == capacity:
            return
        rows = self.cfg.num_layers * self.cfg.kv_heads
        hd = self.cfg.head_dim
        lo = start * self.token_elements
        for flat in (self.k, self.v):
            src = flat[lo:lo + capacity * self.token_elements].view(rows, capacity, hd)
            dst = flat[lo:lo + n * self.token_elements].view(rows, n, hd)
            # Row r moves from r * capacity to r * n (never forward): in order, a row's source is
            # only overwritten by itself, so a clone is needed exactly when the two overlap.
            for r in range(1, rows):
                piece = src[r, :n]
                dst[r] = piece.clone() if r * capacity < (r + 1) * n else piece

    def copy_rows(self, src_start: int, src_capacity: int, dst_start: int, dst_capacity: int, n: int) -> None:
        """Copy the KV of positions 0..n-1 from one extent to another (a prefix-cache hit)."""
        if n > min(src_capacity, dst_capacity):
            raise ValueError(f"cannot copy {n} tokens between extents of {src_capacity} and {dst_capacity}")
        src, dst = self.cache(src_start, src_capacity), self.cache(dst_start, dst_capacity)
        dst.k[:, :, :n] = src.k[:, :, :n]
        dst.v[:, :, :n] = src.v[:, :, :n]
