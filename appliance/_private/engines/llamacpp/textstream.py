"""Turning a token stream into text: incremental UTF-8 decoding and stop sequences."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Decodes token bytes as they come, holding back a multi-byte character cut in two."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds the first stop sequence in streamed text.

    Text that could still turn out to be the start of a stop sequence is held back, so a
    client never sees any part of a stop sequence, unless `include` asks for the stop
    sequence that ended the text (vLLM's `include_stop_str_in_output`).
    """

    __slots__ = ("_held", "_include", "_stops")

    def __init__(self, stops: tuple[str, ...], *, include: bool = False) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self._include = include

    def feed(self, text: str) -> tuple[str, bool]:
        """Return the text that is safe to emit and whether a stop sequence was reached."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [(index, stop) for stop in self._stops if (index := buffer.find(stop)) >= 0]
        if hits:
            index, stop = min(hits, key=_position)
            self._held = ""
            return buffer[: index + len(stop) if self._include else index], True
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of generation, what was held back is plain text after all."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_stop(self, buffer: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def _position(hit: tuple[int, str]) -> int:
    return hit[0]
