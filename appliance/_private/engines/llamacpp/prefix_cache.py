"""The host tier of the prompt cache: a radix tree over token blocks, the KV of each block
kept in host RAM, least recently used blocks dropped when the pool is over its byte budget.

A prompt is cut into blocks of `block_tokens` tokens; a block is a node whose parent holds
the tokens before it, so a path from a root is a cached prefix (the KV of a token depends
on every token before it, so a block is only reusable after the same prefix). A sequence's
last partial block is not stored. A lookup may end inside a block: KV rows are per token,
so the first j rows of a block serve a query that shares only its first j tokens.

Each scope (an org id; "" for the whole appliance) has its own tree, so one org's prompts
never serve, or time, another's; the byte budget and the LRU order are shared by all.
Only leaves are evicted (a block whose children are gone): a prefix outlives its
extensions. The order keeps every block before its parent (a path is touched deepest
first), so the oldest block is always a leaf and eviction is O(1).

Pure bookkeeping, no llama.cpp: the engine's worker thread owns an instance (not
thread-safe); `stats` may be read from elsewhere.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance._private.engines.llamacpp.kv_state import KvRows

Scope = str  # "" = shared by the whole appliance; otherwise the org id


class _Node:
    """A node's children, by their tokens and in token order (the child sharing the most
    leading tokens with a query is next to where the query would sort)."""

    __slots__ = ("children", "sorted_keys")

    def __init__(self) -> None:
        self.children: dict[tuple[int, ...], Block] = {}
        self.sorted_keys: list[tuple[int, ...]] = []

    def adopt(self, child: Block) -> None:
        self.children[child.tokens] = child
        bisect.insort(self.sorted_keys, child.tokens)
        child.parent = self

    def disown(self, child: Block) -> None:
        del self.children[child.tokens]
        del self.sorted_keys[bisect.bisect_left(self.sorted_keys, child.tokens)]

    def closest(self, rest: Sequence[int]) -> tuple[Block, int] | None:
        """The child sharing the most leading tokens with `rest` (at least one), if any."""
        query = tuple(rest)
        at = bisect.bisect_left(self.sorted_keys, query)
        best: tuple[Block, int] | None = None
        for key in self.sorted_keys[max(at - 1, 0) : at + 1]:
            shared = _common(key, query)
            if shared and (best is None or shared > best[1]):
                best = (self.children[key], shared)
        return best


class Block(_Node):
    """One node of the radix tree: `tokens` (exactly block_tokens ids) after its parent's,
    and their KV rows."""

    __slots__ = ("last_used", "nbytes", "parent", "payload", "scope", "tokens")

    def __init__(self, scope: Scope, tokens: tuple[int, ...], payload: KvRows, now: float) -> None:
        super().__init__()
        self.scope = scope
        self.tokens = tokens
        self.payload = payload
        self.nbytes = payload.nbytes
        self.parent: _Node | None = None
        self.last_used = now


class _Root(_Node):
    """The top of one scope's tree (no tokens of its own)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """The longest cached prefix of a query."""

    tokens: int  # how many leading tokens of the query are cached (may end mid-block)
    blocks: tuple[Block, ...]  # the blocks that hold them, root first (the last maybe partly)


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Counters since the cache was made (lookups, hits, hit_tokens, query_tokens,
    evicted_blocks) and gauges (blocks, bytes, capacity_bytes)."""

    lookups: int
    hits: int  # lookups that found at least one token
    hit_tokens: int
    query_tokens: int
    blocks: int
    bytes: int
    capacity_bytes: int
    evicted_blocks: int


class PrefixCache:
    """Token-block radix trees, one per scope, within one byte budget."""

    def __init__(
        self,
        block_tokens: int,
        capacity_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_tokens < 1 or capacity_bytes < 0:
            raise ValueError(f"block_tokens {block_tokens}, capacity_bytes {capacity_bytes}")
        self.block_tokens = block_tokens
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._roots: dict[Scope, _Root] = {}
        # Every block, least recently used first; a block always comes before its parent.
        self._order: OrderedDict[Block, None] = OrderedDict()
        self._bytes = 0
        self._lookups = self._hits = self._hit_tokens = self._query_tokens = 0
        self._evicted = 0

    def longest(self, scope: Scope, tokens: Sequence[int]) -> CachedPrefix:
        """The longest cached prefix of `tokens` (all of them when all are cached: a caller
        that must decode the last token caps it). Touches the blocks it returns."""
        path, node = self._walk(scope, tokens)
        cached = len(path) * self.block_tokens
        rest = tokens[cached : cached + self.block_tokens]
        partial = node.closest(rest) if node is not None and rest else None
        if partial is not None:
            block, shared = partial
            path.append(block)
            cached += shared
        self._touch(path)
        self._lookups += 1
        self._hits += cached > 0
        self._hit_tokens += cached
        self._query_tokens += len(tokens)
        return CachedPrefix(cached, tuple(path))

    def missing(self, scope: Scope, tokens: Sequence[int]) -> range:
        """The positions of the whole blocks of `tokens` not in the tree yet: what a save
        must read (empty when every whole block is there)."""
        path, _ = self._walk(scope, tokens)
        return range(len(path) * self.block_tokens, self._whole(tokens))

    def insert(
        self,
        scope: Scope,
        tokens: Sequence[int],
        start: int,
        rows: Callable[[int, int], KvRows],
    ) -> int:
        """Add the whole blocks of `tokens` from `start` (a block boundary) that the tree
        lacks, asking `rows(a, b)` for each one's KV; evict least recently used leaves (of
        any scope) to stay within the budget, adding only the blocks that fit. Returns the
        bytes added. Blocks before `start` must be in the tree already, or nothing is added."""
        if start % self.block_tokens:
            raise ValueError(f"start {start} is not a multiple of {self.block_tokens}")
        path, _ = self._walk(scope, tokens)
        first = len(path) * self.block_tokens
        budget = self.capacity_bytes - sum(block.nbytes for block in path)
        new = self._read_blocks(scope, tokens, first, rows, budget) if first >= start else []
        self._touch(path)  # the path is now the newest: eviction takes other leaves first
        if not new:
            return 0
        added = sum(block.nbytes for block in new)
        self._make_room(added)
        self._link(path[-1] if path else self._root(scope), new)
        self._touch(path + new)
        return added

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            lookups=self._lookups,
            hits=self._hits,
            hit_tokens=self._hit_tokens,
            query_tokens=self._query_tokens,
            blocks=len(self._order),
            bytes=self._bytes,
            capacity_bytes=self.capacity_bytes,
            evicted_blocks=self._evicted,
        )

    def _whole(self, tokens: Sequence[int]) -> int:
        return len(tokens) // self.block_tokens * self.block_tokens

    def _walk(self, scope: Scope, tokens: Sequence[int]) -> tuple[list[Block], _Node | None]:
        """The blocks of `tokens` in the tree, root first, and the node after which the
        next block would go (None: the scope has no tree)."""
        node: _Node | None = self._roots.get(scope)
        path: list[Block] = []
        if node is None:
            return path, None
        size = self.block_tokens
        for start in range(0, self._whole(tokens), size):
            child = node.children.get(tuple(tokens[start : start + size]))
            if child is None:
                break
            path.append(child)
            node = child
        return path, node

    def _read_blocks(
        self,
        scope: Scope,
        tokens: Sequence[int],
        first: int,
        rows: Callable[[int, int], KvRows],
        budget: int,
    ) -> list[Block]:
        """Blocks for the whole blocks of `tokens` from `first`, while they fit `budget`."""
        now, size = self._clock(), self.block_tokens
        blocks: list[Block] = []
        for start in range(first, self._whole(tokens), size):
            payload = rows(start, start + size)
            if payload.nbytes > budget:
                break
            budget -= payload.nbytes
            blocks.append(Block(scope, tuple(tokens[start : start + size]), payload, now))
        return blocks

    def _make_room(self, nbytes: int) -> None:
        while self._order and self._bytes + nbytes > self.capacity_bytes:
            victim, _ = self._order.popitem(last=False)
            self._drop(victim)

    def _drop(self, victim: Block) -> None:
        assert not victim.children, "the least recently used block is always a leaf"
        parent = victim.parent
        assert parent is not None
        parent.disown(victim)
        if isinstance(parent, _Root) and not parent.children:
            del self._roots[victim.scope]
        self._bytes -= victim.nbytes
        self._evicted += 1

    def _link(self, parent: _Node, new: list[Block]) -> None:
        """Hang the chain `new` under `parent`."""
        for block in new:
            parent.adopt(block)
            self._bytes += block.nbytes
            parent = block

    def _root(self, scope: Scope) -> _Root:
        root = self._roots.get(scope)
        if root is None:
            root = self._roots[scope] = _Root()
        return root

    def _touch(self, path: list[Block]) -> None:
        """Mark a path (root first) used now, deepest first so parents stay after children."""
        now = self._clock()
        for block in reversed(path):
            block.last_used = now
            self._order[block] = None
            self._order.move_to_end(block)


def _common(have: Sequence[int], want: Sequence[int]) -> int:
    shared = 0
    for a, b in zip(have, want, strict=False):
        if a != b:
            break
        shared += 1
    return shared
