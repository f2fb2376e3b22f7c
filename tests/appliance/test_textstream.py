"""Stop sequences and UTF-8 reassembly over a token stream."""

from __future__ import annotations

from appliance._private.engines.llamacpp.textstream import StopMatcher, Utf8Stream


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_split_across_tokens_is_never_emitted() -> None:
    matcher = StopMatcher(("END",))
    emitted = [matcher.feed(piece) for piece in ["hello E", "N", "D tail"]]
    assert emitted == [("hello ", False), ("", False), ("", True)]


def test_partial_match_that_breaks_is_released() -> None:
    assert feed_all(StopMatcher(("END",)), ["a E", "Nx", " b"]) == ("a ENx b", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(("world", "lo")), ["hello world"]) == ("hel", True)


def test_held_text_is_flushed_at_the_end() -> None:
    assert feed_all(StopMatcher(("STOP",)), ["abc ST"]) == ("abc ST", False)


def test_no_stops_passes_text_through() -> None:
    assert StopMatcher(()).feed("anything") == ("anything", False)


def test_utf8_character_split_across_tokens() -> None:
    stream = Utf8Stream()
    encoded = "é€".encode()
    assert stream.feed(encoded[:1]) == ""
    assert stream.feed(encoded[1:3]) == "é"
    assert stream.feed(encoded[3:]) == "€"
    assert stream.flush() == ""


def test_invalid_bytes_are_replaced_not_raised() -> None:
    stream = Utf8Stream()
    assert stream.feed(b"\xff") == "\ufffd"
    assert stream.feed(b"\xe2\x82") == ""
    assert stream.flush() == "\ufffd"
