"""What an answer costs when part of its prompt came from a prompt cache (`Pricing.cost`),
the cached-input price on the wire, and reading another server's cached count (pure,
in-process)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from federation import Pricing, cached_count

PRICED = Pricing(
    input_per_million=2.0,
    output_per_million=8.0,
    cached_input_per_million=0.5,
    per_request=0.001,
)


def test_cached_tokens_cost_the_cached_price() -> None:
    # 1,000,000 input tokens of which 600,000 cached, 500,000 output, one request.
    cost = PRICED.cost(1_000_000, 500_000, cached=600_000)
    assert cost == pytest.approx(0.4 * 2.0 + 0.6 * 0.5 + 0.5 * 8.0 + 0.001)
    # Nothing cached: the input price for every input token, as before.
    assert PRICED.cost(1_000_000, 500_000) == pytest.approx(2.0 + 4.0 + 0.001)


def test_without_a_cached_price_cached_tokens_cost_the_input_price() -> None:
    plain = Pricing(input_per_million=2.0, output_per_million=8.0)
    assert plain.cached_input_per_million is None
    assert plain.cost(1000, 10, cached=900) == plain.cost(1000, 10)
    # A free cache (price 0) is a price, not "unset".
    free = msgspec.structs.replace(plain, cached_input_per_million=0.0)
    assert free.cost(1000, 10, cached=900) == pytest.approx((100 * 2.0 + 10 * 8.0) / 1e6)


def test_cached_tokens_are_bounded_by_the_input() -> None:
    # More cached than input (an upstream's bad count) is at most all of the input; a
    # negative count is none: the bill never goes below the all-cached price or above the
    # uncached one.
    assert PRICED.cost(100, 0, requests=0, cached=10_000) == PRICED.cost(
        100, 0, requests=0, cached=100
    )
    assert PRICED.cost(100, 0, requests=0, cached=100) == pytest.approx(100 * 0.5 / 1e6)
    assert PRICED.cost(100, 0, requests=0, cached=-5) == PRICED.cost(100, 0, requests=0)


def test_the_cached_price_is_a_pricing_field() -> None:
    decoded = msgspec.json.decode(
        b'{"input_per_million": 1.5, "cached_input_per_million": 0.25}', type=Pricing
    )
    assert decoded.cached_input_per_million == 0.25
    assert msgspec.json.decode(msgspec.json.encode(decoded), type=Pricing) == decoded
    # Old configurations (no cached price) still decode, with None.
    old = msgspec.json.decode(b'{"input_per_million": 1.5}', type=Pricing)
    assert old.cached_input_per_million is None
    with pytest.raises(msgspec.ValidationError, match="cached_input_per_million"):
        msgspec.json.decode(b'{"cached_input_per_million": -1}', type=Pricing)


@pytest.mark.parametrize(
    ("details", "cached"),
    [
        ({"cached_tokens": 3, "audio_tokens": 0}, 3),
        ({"cached_tokens": 50}, 10),  # more than the prompt: all of it
        ({"cached_tokens": -1}, 0),
        ({"cached_tokens": None}, 0),
        ({"cached_tokens": True}, 0),
        ({"cached_tokens": "3"}, 0),
        ({}, 0),
        (None, 0),
        ([3], 0),
    ],
)
def test_another_servers_cached_count_is_read_leniently(details: Any, cached: int) -> None:
    # An upstream's or a node's odd `prompt_tokens_details` never fails an answer.
    assert cached_count(details, 10) == cached
