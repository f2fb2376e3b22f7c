"""The prompt cache's host tier as pure bookkeeping (no model, an injected clock): longest
prefixes (ending mid-block too), scopes, LRU eviction of leaves across scopes within the
byte budget, `missing` after partial inserts, stats."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from appliance._private.engines.llamacpp.kv_state import KvRows
from appliance._private.engines.llamacpp.prefix_cache import CachedPrefix, PrefixCache

BLOCK = 4
BLOCK_BYTES = 2 * BLOCK  # one K byte and one V byte per token, see `Stream`


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> float:
        self.now += 1
        return self.now


class Stream:
    """A stand-in for a saved KV stream: token i's K row is its position, its V row its id,
    so a block's payload shows which rows it was cut from. Records the rows asked for."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.asked: list[tuple[int, int]] = []

    def rows(self, start: int, end: int) -> KvRows:
        self.asked.append((start, end))
        k = np.arange(start, end, dtype=np.uint8).reshape(1, end - start, 1)
        v = np.array(self.tokens[start:end], dtype=np.uint8).reshape(1, end - start, 1)
        return KvRows(k, v)


def insert(cache: PrefixCache, scope: str, tokens: Sequence[int], start: int = 0) -> Stream:
    stream = Stream(tokens)
    cache.insert(scope, tokens, start, stream.rows)
    return stream


def rows_used(hit: CachedPrefix) -> tuple[list[int], list[int]]:
    """The positions and token ids held by the rows a hit uses (the last block partly)."""
    positions: list[int] = []
    ids: list[int] = []
    for block in hit.blocks:
        take = min(BLOCK, hit.tokens - len(positions))
        positions += block.payload.k[0, :take, 0].tolist()
        ids += block.payload.v[0, :take, 0].tolist()
    return positions, ids


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Callable[[], float], blocks: int = 100) -> PrefixCache:
    return PrefixCache(BLOCK, blocks * BLOCK_BYTES, clock=clock)


def test_longest_prefix_by_whole_blocks_and_mid_block(clock: Clock) -> None:
    cache = make(clock)
    conversation = list(range(10, 22))  # three whole blocks
    insert(cache, "org", conversation)

    whole = cache.longest("org", [*conversation, 99])
    assert whole.tokens == 12
    assert len(whole.blocks) == 3
    assert rows_used(whole) == (list(range(12)), conversation)

    mid_block = cache.longest("org", [*conversation[:6], 77, 78, 79])
    assert mid_block.tokens == 6
    assert len(mid_block.blocks) == 2  # the second block's first two rows
    assert rows_used(mid_block) == (list(range(6)), conversation[:6])

    shorter = cache.longest("org", conversation[:10])  # the query ends inside a block
    assert shorter.tokens == 10
    assert rows_used(shorter) == (list(range(10)), conversation[:10])

    assert cache.longest("org", [5, *conversation]) == CachedPrefix(0, ())


def test_the_best_sibling_serves_a_mid_block_hit(clock: Clock) -> None:
    cache = make(clock)
    insert(cache, "org", [1, 2, 3, 4, 5, 6, 0, 0])
    insert(cache, "org", [1, 2, 3, 4, 5, 6, 7, 0])
    insert(cache, "org", [1, 2, 3, 4, 9, 9, 9, 9])

    hit = cache.longest("org", [1, 2, 3, 4, 5, 6, 7, 8])
    assert hit.tokens == 7
    assert hit.blocks[-1].tokens == (5, 6, 7, 0)


def test_a_mid_block_hit_among_many_siblings_is_the_longest(clock: Clock) -> None:
    draw = random.Random(7)
    cache = make(clock, blocks=500)
    prefix = [1, 2, 3, 4]
    blocks = [[draw.choice((5, 6, 7)) for _ in range(BLOCK)] for _ in range(60)]
    for block in blocks:
        insert(cache, "org", [*prefix, *block])
    for _ in range(100):
        query = [draw.choice((5, 6, 7)) for _ in range(draw.randrange(1, BLOCK + 1))]
        best = max(shared(block, query) for block in blocks)
        assert cache.longest("org", [*prefix, *query]).tokens == len(prefix) + best


def shared(have: Sequence[int], want: Sequence[int]) -> int:
    count = 0
    while count < min(len(have), len(want)) and have[count] == want[count]:
        count += 1
    return count


def test_a_partial_last_block_is_not_stored(clock: Clock) -> None:
    cache = make(clock)
    stream = insert(cache, "org", list(range(10)))
    assert stream.asked == [(0, 4), (4, 8)]
    assert cache.longest("org", list(range(10))).tokens == 8
    assert cache.missing("org", list(range(10))) == range(8, 8)
    assert cache.missing("org", list(range(12))) == range(8, 12)


def test_scopes_are_isolated(clock: Clock) -> None:
    cache = make(clock)
    prompt = list(range(8))
    insert(cache, "org-a", prompt)

    assert cache.longest("org-a", prompt).tokens == 8
    assert cache.longest("org-b", prompt) == CachedPrefix(0, ())
    assert cache.longest("", prompt) == CachedPrefix(0, ())
    assert cache.missing("org-b", prompt) == range(8)

    insert(cache, "", prompt)
    assert cache.stats.blocks == 4  # each scope keeps its own copy
    assert cache.longest("", prompt).tokens == 8


def test_missing_and_insert_after_a_partial_save(clock: Clock) -> None:
    cache = make(clock)
    turn_one = list(range(8))
    turn_two = [*turn_one, *range(50, 58), 60, 61]
    insert(cache, "org", turn_one)

    assert cache.missing("org", turn_two) == range(8, 16)
    stream = insert(cache, "org", turn_two, start=8)
    assert stream.asked == [(8, 12), (12, 16)]
    assert cache.missing("org", turn_two) == range(16, 16)
    assert rows_used(cache.longest("org", turn_two)) == (list(range(16)), turn_two[:16])


def test_insert_needs_the_blocks_before_start(clock: Clock) -> None:
    cache = make(clock)
    stream = insert(cache, "org", list(range(12)), start=8)
    assert stream.asked == []
    assert cache.stats.blocks == 0
    with pytest.raises(ValueError, match="multiple"):
        cache.insert("org", list(range(12)), 6, stream.rows)


def test_insert_skips_blocks_already_there(clock: Clock) -> None:
    cache = make(clock)
    insert(cache, "org", list(range(8)))
    stream = insert(cache, "org", list(range(12)))  # start 0, but two blocks are there
    assert stream.asked == [(8, 12)]
    assert cache.stats.bytes == 3 * BLOCK_BYTES


def test_lru_evicts_across_scopes(clock: Clock) -> None:
    cache = make(clock, blocks=2)
    insert(cache, "org-a", [1, 1, 1, 1])
    clock.tick()
    insert(cache, "org-b", [2, 2, 2, 2])
    clock.tick()
    assert cache.longest("org-a", [1, 1, 1, 1]).tokens == 4  # org-a is now the newest
    clock.tick()
    insert(cache, "org-c", [3, 3, 3, 3])

    assert cache.longest("org-b", [2, 2, 2, 2]).tokens == 0
    assert cache.longest("org-a", [1, 1, 1, 1]).tokens == 4
    assert cache.longest("org-c", [3, 3, 3, 3]).tokens == 4
    assert cache.stats.evicted_blocks == 1
    assert cache.stats.bytes == 2 * BLOCK_BYTES


def test_lru_evicts_leaves_before_their_prefix(clock: Clock) -> None:
    cache = make(clock, blocks=3)
    system = [7, 7, 7, 7]
    insert(cache, "org", [*system, 1, 1, 1, 1])  # two blocks, used at the same time
    clock.tick()
    insert(cache, "org", [9, 9, 9, 9])
    clock.tick()
    insert(cache, "org", [8, 8, 8, 8])  # the leaf goes, not the prefix it extends

    assert cache.longest("org", [*system, 1, 1, 1, 1]).tokens == 4
    assert cache.longest("org", [9, 9, 9, 9]).tokens == 4
    assert cache.longest("org", [8, 8, 8, 8]).tokens == 4
    clock.tick()
    insert(cache, "org", [6, 6, 6, 6])  # now a leaf itself, the prefix is the oldest
    assert cache.longest("org", system).tokens == 0
    assert cache.stats.evicted_blocks == 2


def test_last_used_follows_the_clock(clock: Clock) -> None:
    cache = make(clock)
    insert(cache, "org", list(range(8)))
    later = clock.tick()
    hit = cache.longest("org", list(range(6)))
    assert [block.last_used for block in hit.blocks] == [later, later]


def test_a_sequence_larger_than_the_pool_keeps_what_fits(clock: Clock) -> None:
    cache = make(clock, blocks=2)
    insert(cache, "org", [5, 5, 5, 5])
    stream = insert(cache, "other", list(range(16)))
    # The path being saved is never evicted for its own extension: two blocks fit once the
    # older scope's block is gone, and a third block is read once and refused.
    assert stream.asked == [(0, 4), (4, 8), (8, 12)]
    assert cache.longest("other", list(range(16))).tokens == 8
    assert cache.longest("org", [5, 5, 5, 5]).tokens == 0
    assert cache.stats.bytes == 2 * BLOCK_BYTES


def test_a_zero_pool_stores_nothing(clock: Clock) -> None:
    cache = PrefixCache(BLOCK, 0, clock=clock)
    insert(cache, "org", list(range(8)))
    assert cache.stats.blocks == cache.stats.bytes == 0
    assert cache.longest("org", list(range(8))).tokens == 0


def test_stats_count_lookups_hits_and_the_pool(clock: Clock) -> None:
    cache = make(clock, blocks=3)
    insert(cache, "org", list(range(8)))
    cache.longest("org", list(range(10)))  # 8 of 10
    cache.longest("org", [50, 51, 52])  # 0 of 3
    cache.longest("org", [0, 1, 2, 3, 4, 99])  # 5 of 6
    insert(cache, "org", list(range(100, 108)))  # evicts one block

    stats = cache.stats
    assert (stats.lookups, stats.hits, stats.hit_tokens, stats.query_tokens) == (3, 2, 13, 19)
    assert (stats.blocks, stats.bytes, stats.capacity_bytes) == (
        3,
        3 * BLOCK_BYTES,
        3 * BLOCK_BYTES,
    )
    assert stats.evicted_blocks == 1


def test_a_random_workload_stays_within_budget_and_correct(clock: Clock) -> None:
    """Conversations growing turn by turn over a few shared system prompts, in two scopes,
    with a pool far smaller than what they hold: the budget is never exceeded and every hit
    is a prefix whose rows are the query's own positions and tokens."""
    draw = random.Random(16)
    cache = make(clock, blocks=12)
    systems = [[draw.randrange(256) for _ in range(9)] for _ in range(3)]
    histories = {(scope, n): list(draw.choice(systems)) for scope in ("a", "b") for n in range(6)}
    for _ in range(300):
        clock.tick()
        key = draw.choice(list(histories))
        scope, history = key[0], histories[key]
        history += [draw.randrange(256) for _ in range(draw.randrange(1, 7))]
        hit = cache.longest(scope, history)
        assert hit.tokens <= len(history)
        assert rows_used(hit) == (list(range(hit.tokens)), history[: hit.tokens])
        assert len(hit.blocks) == -(-hit.tokens // BLOCK)
        gap = cache.missing(scope, history)
        insert(cache, scope, history, start=gap.start)
        assert cache.stats.bytes <= cache.capacity_bytes
        assert cache.stats.bytes == cache.stats.blocks * BLOCK_BYTES
        if len(history) > 40:
            histories[key] = list(draw.choice(systems))
    assert cache.stats.evicted_blocks > 0
    assert cache.stats.hits > 0
