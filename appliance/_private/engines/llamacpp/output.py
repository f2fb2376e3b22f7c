"""One choice's output: token bytes to text, stop sequences, structured output and log
probabilities, handed to the generation as plain text (`emit`, the hot path: one choice,
nothing else asked) or as `ChoiceDelta`s (any other choice, a structured-output reader,
log probabilities, echo), each choice then ending with its own finish reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance._private.engines.base import ChoiceDelta, Generation, WakeBatch
from appliance._private.engines.llamacpp.sampling import Scored
from appliance._private.engines.llamacpp.textstream import StopMatcher, Utf8Stream

if TYPE_CHECKING:
    from appliance._private.engines.structured import OutputReader

# A token id's bytes as log probabilities name it (control tokens written out).
Naming = Callable[[int], bytes]


class ChoiceOutput:
    __slots__ = (
        "_chat",
        "_generation",
        "_index",
        "_name",
        "_reader",
        "_stops",
        "_top",
        "_utf8",
        "offset",
        "rich",
    )

    def __init__(
        self,
        generation: Generation,
        index: int,
        *,
        rich: bool,
        reader: OutputReader | None,
        name: Naming,
    ) -> None:
        params, features = generation.params, generation.params.features
        self._generation = generation
        self._index = index
        self._reader = reader
        self._name = name
        self._stops = StopMatcher(params.stop, include=params.include_stop_str_in_output)
        self._utf8 = Utf8Stream()
        self._chat = features is None or features.endpoint == "chat"
        self._top = (features.top_logprobs or 0) if features is not None else 0
        self.rich = rich
        self.offset = 0  # characters of this choice's text so far (completions' text_offset)

    def token(
        self, piece: bytes, score: Scored | None, *, early: bool, wakes: WakeBatch, tokens: int
    ) -> tuple[bool, bool]:
        """Deliver one generated token: whether anything was handed over, and whether a
        stop sequence ended the text (stop sequences apply once `early` is over)."""
        text = self._utf8.feed(piece)
        offset = self.offset
        self.offset += len(text)
        text, stopped = (text, False) if early else self._stops.feed(text)
        if not self.rich:
            if text:
                self._generation.emit(text, wakes, tokens)
            return bool(text), stopped
        logprobs = None if score is None else self._logprobs([(score, piece)], [offset])
        self._deliver(text, logprobs, wakes, tokens)
        return True, stopped

    def echo(self, pieces: list[bytes], scores: list[Scored | None] | None, tokens: int) -> None:
        """The prompt first (completions' `echo`), with its log probabilities if asked for:
        None for the first token, which nothing predicts."""
        decoder, texts, offsets = Utf8Stream(), [], []
        for piece in pieces:
            offsets.append(self.offset)
            texts.append(decoder.feed(piece))
            self.offset += len(texts[-1])
        texts.append(decoder.flush())
        self.offset += len(texts[-1])
        text = "".join(texts)
        logprobs = None
        if scores is not None:
            logprobs = self._logprobs(list(zip(scores, pieces, strict=True)), offsets)
        self._generation.emit_delta(ChoiceDelta(self._index, text, logprobs=logprobs), None, tokens)

    def end(self, reason: str, *, flush: bool, tokens: int) -> None:
        """The choice ended well ("stop" or "length"): what was held back, then (rich) the
        choice's finish reason, "tool_calls" when the reader saw a call."""
        tail = ""
        if flush:
            tail, _ = self._stops.feed(self._utf8.flush())
            tail += self._stops.flush()
        if not self.rich:
            if tail:
                self._generation.emit(tail, tokens=tokens)
            return
        if self._reader is None:
            deltas = [ChoiceDelta(self._index, tail, finish_reason=reason)]
        else:
            deltas = (self._reader.feed(tail) if tail else []) + self._reader.end(reason)
            if not deltas or deltas[-1].finish_reason is None:
                deltas.append(ChoiceDelta(self._index, finish_reason=reason))
        for delta in deltas:
            self._generation.emit_delta(delta, tokens=tokens)

    def _deliver(
        self, text: str, logprobs: dict[str, Any] | None, wakes: WakeBatch, tokens: int
    ) -> None:
        if self._reader is not None:
            deltas = self._reader.feed(text) if text else []
        else:
            deltas = [ChoiceDelta(self._index, text)] if text else []
        if logprobs is not None:
            if deltas:
                deltas[0] = dataclasses.replace(deltas[0], logprobs=logprobs)
            else:
                deltas = [ChoiceDelta(self._index, logprobs=logprobs)]
        for delta in deltas:
            self._generation.emit_delta(delta, wakes, tokens)

    def _logprobs(
        self, tokens: list[tuple[Scored | None, bytes]], offsets: list[int]
    ) -> dict[str, Any]:
        """OpenAI's `logprobs` object for these tokens, in the endpoint's shape."""
        if self._chat:
            return {"content": [self._chat_entry(score, piece) for score, piece in tokens]}
        alternatives = [
            None if score is None else {_text(self._name(t)): lp for t, lp in score[2]}
            for score, _ in tokens
        ]
        return {
            "tokens": [_text(piece) for _, piece in tokens],
            "token_logprobs": [None if score is None else score[1] for score, _ in tokens],
            "top_logprobs": alternatives if self._top else None,
            "text_offset": offsets,
        }

    def _chat_entry(self, score: Scored | None, piece: bytes) -> dict[str, Any]:
        entry = _entry(piece, None if score is None else score[1])
        best = [] if score is None else score[2]
        entry["top_logprobs"] = [_entry(self._name(token), lp) for token, lp in best]
        return entry


def _entry(piece: bytes, logprob: float | None) -> dict[str, Any]:
    return {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")
