"""Picking one sequence's next token beyond plain sampling: a grammar that constrains it,
logits changed before sampling (no end of generation yet), and the log probabilities of
what was picked.

A grammar is llama.cpp's grammar sampler, one per sequence. Checking the whole vocabulary
against a grammar costs milliseconds (~5 ms for a 49k vocabulary here), checking one token
microseconds, so, as llama.cpp's common sampler does, the token is first picked without the
grammar and the grammar only asked whether it allows it; only when it does not is the pick
made again among the tokens it allows. At temperature 0 the second pick looks at the best
candidates first (in logit order, the first one allowed is the answer) before it falls back
to the whole vocabulary, so greedy output is exactly the best allowed token either way.

Log probabilities are the model's log-softmax over the raw logits (before penalties, bias
and grammar), as vLLM reports them by default.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from numpy.typing import NDArray

_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
# Greedy re-picks check the best candidates in one call before the whole vocabulary.
_BEST_CANDIDATES = 64
# -100 bans the token, as OpenAI documents; other values are added to its logit.
_BAN = -100.0

Row = NDArray[np.float32]
# A token's log probability and the best alternatives (id, log probability), best first.
Scored = tuple[int, float, list[tuple[int, float]]]


class GrammarError(ValueError):
    """llama.cpp could not parse a grammar (its own parser logs why)."""


class TokenPicker:
    """Token data arrays reused from step to step, on the scheduler's thread only."""

    def __init__(self, lib: Any, vocab: Any, n_vocab: int) -> None:
        self._l = lib
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._all = _Candidates(lib, n_vocab)
        self._one = _Candidates(lib, 1)
        self._best = _Candidates(lib, _BEST_CANDIDATES)

    def grammar(self, gbnf: str) -> Any:
        """A grammar sampler for `gbnf` (root rule `root`)."""
        sampler = self._l.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise GrammarError("llama.cpp could not parse the output grammar")
        return sampler

    def logit_bias(self, bias: tuple[tuple[int, float], ...]) -> Any:
        """A sampler adding `bias` to the logits (-100: the token can never be picked)."""
        entries = (self._l.llama_logit_bias * len(bias))()
        for entry, (token, value) in zip(entries, bias, strict=True):
            entry.token = token
            entry.bias = -np.inf if value <= _BAN else value
        return self._l.llama_sampler_init_logit_bias(self._n_vocab, len(bias), entries)

    def allows(self, grammar: Any, token: int) -> bool:
        one = self._one
        one.fill(np.array([token], dtype=np.intc), np.zeros(1, dtype=np.single))
        one.apply(grammar)
        return bool(np.isfinite(one.logits()[0]))

    def pick(self, row: Row, chain: Any | None, grammar: Any | None) -> int | None:
        """The next token from `row` (None: the grammar allows none). Nothing is accepted
        into `chain` or `grammar`: the caller does, for the token it keeps."""
        token = int(row.argmax()) if chain is None else self._sampled(row, chain)
        if grammar is None or self.allows(grammar, token):
            return token
        if chain is None:
            best = self._best_allowed(row, grammar)
            if best is not None:
                return best
        candidates = self._all
        candidates.fill(self._ids, row)
        candidates.apply(grammar)
        if not np.isfinite(candidates.logits()).any():
            return None
        if chain is None:
            return int(candidates.logits().argmax())
        candidates.apply(chain)
        token = candidates.selected()
        # A bias may have banned every allowed token: never hand back one the grammar
        # refuses (accepting it would abort llama.cpp).
        return token if self.allows(grammar, token) else None

    def _sampled(self, row: Row, chain: Any) -> int:
        candidates = self._all
        candidates.fill(self._ids, row)
        candidates.apply(chain)
        return candidates.selected()

    def _best_allowed(self, row: Row, grammar: Any) -> int | None:
        """The best token the grammar allows among the best candidates, if any is."""
        top = np.argpartition(row, -_BEST_CANDIDATES)[-_BEST_CANDIDATES:]
        # Highest logit first; among equal logits the lowest id, as argmax picks.
        ordered = top[np.lexsort((top, -row[top]))].astype(np.intc)
        best = self._best
        best.fill(ordered, row[ordered])
        best.apply(grammar)
        allowed = np.flatnonzero(np.isfinite(best.logits()))
        return int(ordered[allowed[0]]) if allowed.size else None


def scored(row: Row, token: int, alternatives: int) -> Scored:
    """`token`'s log probability under `row` and the `alternatives` best tokens'."""
    peak = float(row.max())
    total = peak + float(np.log(np.exp(row - peak, dtype=np.float64).sum()))
    best: list[tuple[int, float]] = []
    if alternatives > 0:
        top = np.argpartition(row, -alternatives)[-alternatives:]
        ordered = top[np.lexsort((top, -row[top]))]
        best = [(int(t), float(row[t]) - total) for t in ordered]
    return token, float(row[token]) - total, best


class _Candidates:
    """A `llama_token_data_array` over a numpy buffer of up to `size` tokens."""

    def __init__(self, lib: Any, size: int) -> None:
        self._l = lib
        self.data = np.zeros(size, dtype=_TOKEN_DATA)
        pointer = self.data.ctypes.data_as(lib.llama_token_data_p)
        self.array = lib.llama_token_data_array(data=pointer, size=size, selected=-1, sorted=False)

    def fill(self, ids: NDArray[np.intc], logits: Row) -> None:
        count = len(ids)
        self.data["id"][:count] = ids
        self.data["logit"][:count] = logits
        self.data["p"][:count] = 0.0
        self.array.size = count
        self.array.selected = -1
        self.array.sorted = False

    def apply(self, sampler: Any) -> None:
        self._l.llama_sampler_apply(sampler, ctypes.byref(self.array))

    def logits(self) -> Row:
        logits: Row = self.data["logit"][: self.array.size]
        return logits

    def selected(self) -> int:
        return int(self.data["id"][self.array.selected])
