"""Prefix cache: finished requests' KV, kept so that a new request starts from its longest cached prefix.

A chat client sends the whole conversation every turn, so the next turn's prompt begins with the
previous turn's prompt and reply. An entry is one extent of the engine's KV pool holding the KV of
its `tokens` (prompt + output, as far as they were computed) in its first slots; a new request
copies the rows of the longest matching prefix into its own extent and prefills only the rest.
Reuse is exact to the token: the forward pass computes every row the same way in any prefill chunk
or decode step (the engine runs its steps under model.ops.rows_exactly when the cache is on), so the
copied rows are the rows a full prefill writes.

Scopes: a request reuses only KV that requests of its own scope left (glm.engine decides a request's
scope: a client's cache key, or one scope shared by every request of a single-tenant deployment; a
request with no scope neither reuses nor leaves anything). A scope is an integer salt, a keyed hash
of the client's key under a random per-process secret, so memory holds no reversible form of the
key. The salt starts every block-hash chain, so another scope's entries are never even candidates,
and each entry carries its scope, checked again before a match counts (a hash collision across
scopes matches nothing). A probe from another scope therefore does exactly the work of a prompt
nothing was cached for: it hashes its first block and finds nothing.

Lookup: every block-aligned prefix of an entry's tokens is indexed by a chained hash (vLLM style),
the deepest block the prompt shares picks the candidates, and the match is then extended and
checked token by token (a hash collision can shorten a match, never corrupt one).

Bookkeeping only (plain Python, no tensors): the cache owns its entries' extents in the engine's
ExtentAllocator and frees them on eviction. Entries are evicted least recently used first, when
the cache would exceed `max_tokens` and whenever a request needs memory (the cache lives inside the
KV budget). An entry whose tokens are a prefix of another's is redundant and dropped.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

from .kvpool import ExtentAllocator

BLOCK = 16  # tokens per indexed block; prefixes shorter than one block are not worth a lookup

_SECRET = secrets.token_bytes(32)  # the salts' key: a salt seen in memory does not give its key back


def _salt(tag: bytes, text: str = "") -> int:
    digest = hmac.digest(_SECRET, tag + text.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return int.from_bytes(digest[:8], "little")


def key_scope(key: str) -> int:
    """The scope of a client's cache key (a non-empty string)."""
    if not key:
        raise ValueError("a cache key must be a non-empty string")
    return _salt(b"key:", key)


SHARED_SCOPE = _salt(b"shared")  # requests without a key, where the deployment shares them


def block_hashes(tokens, block: int = BLOCK, scope: int = 0) -> list[int]:
    """Chained hashes of tokens[:block], tokens[:2 * block], ... (full blocks only), salted by scope."""
    hashes, h = [], scope
    for i in range(0, len(tokens) - block + 1, block):
        h = hash((h, *tokens[i:i + block]))
        hashes.append(h)
    return hashes


def common_prefix(a: tuple, b: tuple, limit: int) -> int:
    """Length of the common prefix of a and b (of one sequence type), at most limit."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class Entry:
    """A cached extent: the KV of `tokens` in the first len(tokens) slots of the extent at `start`,
    left by a request of `scope`."""

    __slots__ = ("tokens", "start", "hashes", "scope")

    def __init__(self, tokens: tuple[int, ...], start: int, hashes: list[int], scope: int):
        self.tokens, self.start, self.hashes, self.scope = tokens, start, hashes, scope

    @property
    def size(self) -> int:
        """Tokens of KV memory the entry holds (its extent is exactly that long)."""
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Entry(start={self.start}, size={self.size})"


class PrefixCache:
    def __init__(self, allocator: ExtentAllocator, max_tokens: int, block: int = BLOCK):
        if max_tokens < 0:
            raise ValueError(f"prefix cache size must be >= 0 tokens, got {max_tokens}")
        self.allocator, self.max_tokens, self.block = allocator, max_tokens, block
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # by extent start, least recently used first
        self._index: dict[int, set[int]] = {}                     # block hash -> starts of entries having it
        self.tokens = 0                                           # sum of the entries' sizes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: Entry) -> bool:
        return self._entries.get(entry.start) is entry

    @property
    def entries(self) -> list[Entry]:
        """Least recently used first."""
        return list(self._entries.values())

    def lookup(self, prompt: list[int], scope: int | None) -> tuple[Entry | None, int]:
        """The entry of `scope` sharing the longest prefix with prompt, and that length, marked as
        just used.

        At most len(prompt) - 1 tokens: the last prompt token is always computed (its logits give
        the first new token). (None, 0) when no entry of the scope shares a full block, or the
        scope is None.
        """
        if scope is None:
            return None, 0
        prompt = tuple(prompt)
        limit = len(prompt) - 1
        candidates, h = None, scope
        for i in range(0, limit - self.block + 1, self.block):
            h = hash((h, *prompt[i:i + self.block]))
            found = self._index.get(h)
            if not found:
                break
            candidates = found
        if candidates is None:
            return None, 0
        best, best_n = None, 0
        for start in candidates:
            entry = self._entries[start]
            if entry.scope != scope:
                continue
            n = common_prefix(entry.tokens, prompt, limit)
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self._entries.move_to_end(best.start)
        return best, best_n

    def insert(self, tokens, start: int, scope: int | None) -> Entry | None:
        """Take over the extent at `start` (exactly len(tokens) long) holding the KV of tokens,
        left by a request of `scope`.

        Returns the new entry, or None when the extent was freed instead: the cache is off, the
        scope is None, the tokens are shorter than a block or longer than the cache, or an entry of
        the scope already covers them. Entries of the scope that the new one covers are dropped.
        """
        tokens = tuple(tokens)
        if scope is None or not self.block <= len(tokens) <= self.max_tokens:
            self.allocator.free(start, len(tokens))
            return None
        hashes = block_hashes(tokens, self.block, scope)
        for other in [self._entries[s] for s in self._index.get(hashes[0], ())]:
            if other.scope != scope:
                continue
            if other.size >= len(tokens) and other.tokens[:len(tokens)] == tokens:
                self._entries.move_to_end(other.start)  # the new KV adds nothing: keep the old one
                self.allocator.free(start, len(tokens))
                return None
            if tokens[:other.size] == other.tokens:
                self.evict(other)
        while self.tokens + len(tokens) > self.max_tokens:
            self.evict_lru()
        entry = Entry(tokens, start, hashes, scope)
        self._entries[start] = entry
        for h in hashes:
            self._index.setdefault(h, set()).add(start)
        self.tokens += entry.size
        return entry

    def evict(self, entry: Entry) -> None:
        """Drop the entry and free its extent."""
        del self._entries[entry.start]
        for h in entry.hashes:
            starts = self._index[h]
            starts.discard(entry.start)
            if not starts:
                del self._index[h]
        self.tokens -= entry.size
        self.allocator.free(entry.start, entry.size)

    def evict_lru(self) -> bool:
        """Drop the least recently used entry; False when the cache is empty."""
        if not self._entries:
            return False
        self.evict(next(iter(self._entries.values())))
        return True

    def clear(self) -> None:
        while self.evict_lru():
            pass
