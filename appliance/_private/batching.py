"""Continuous batching over llama.cpp's batch API.

Every running request is a sequence in one `llama_batch`: each step decodes one token for
every sequence that is generating, plus prompt chunks of sequences still being prefilled,
up to a per-step token budget, so a long prompt never stalls the streams already flowing.
New requests join at the next step; finished and cancelled ones leave at once.

Each sequence has its own KV stream (`kv_unified = false`), and prompts are prefilled in
chunks whose boundaries are fixed multiples of `prefill_chunk` from the start of the
prompt, whatever else is running. Together these make a sequence's arithmetic independent
of its neighbours: at temperature 0 a request produces exactly the text it produces alone
(with one shared KV buffer, attention sums over cells interleaved with other sequences and
the last bits differ).

A slot keeps the KV of its last prompt after the request ends; a new request whose prompt
shares a prefix with a free slot's cached prompt (the same system prompt, say) starts from
there, and one that shares a long prefix with a running sequence copies that stream. Reuse
stops at a chunk boundary, so the remaining chunks are the ones a fresh prefill would run.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance._private.engine import EngineLoad, Finish, FinishReason, Generation
from appliance._private.errors import ModelLoadError, ModelNotReadyError, QueueFullError
from appliance._private.textstream import StopMatcher, Utf8Stream

log = logging.getLogger("palisade.appliance.batching")

FinishFn = Callable[[Generation, Finish], None]
# With a single stream, wait at most this long after its first token for the loop to send
# it before the next step takes both cores (see Generation.wait_delivered).
_FIRST_DELIVERY_WAIT = 0.005
# Frequency and presence penalties look at this many of the latest generated tokens.
_PENALTY_WINDOW = 64
# Copying another running sequence's stream costs a full-buffer copy: only worth it for a
# shared prefix of at least this many chunks.
_MIN_COPY_CHUNKS = 2


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_sequences: int
    kv_cache_tokens: int
    step_tokens: int
    prefill_chunk: int
    max_queue: int
    threads: int

    @property
    def cells_per_sequence(self) -> int:
        return self.kv_cache_tokens // self.max_sequences


@dataclass(slots=True)
class StepStats:
    """What one decode step did (handed to the observer, e.g. Prometheus metrics)."""

    sequences: int
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    kv_cells_in_use: int
    kv_cells_cached: int
    reused_tokens: int = 0


class _Sequence:
    __slots__ = (
        "generation",
        "logits_at",
        "next_token",
        "pos",
        "prefilled",
        "produced",
        "prompt",
        "sampler",
        "slot",
        "stops",
        "utf8",
    )

    def __init__(self, generation: Generation, slot: _Slot, sampler: Any) -> None:
        tokens = generation.prompt.tokens
        assert tokens is not None, "llama.cpp decodes token ids: use prepare_chat/prepare_text"
        self.generation = generation
        self.prompt = tokens
        self.slot = slot
        self.sampler = sampler
        self.prefilled = 0
        self.pos = 0
        self.produced = 0
        self.next_token = -1
        self.logits_at = -1
        self.utf8 = Utf8Stream()
        self.stops = StopMatcher(generation.params.stop)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


@dataclass(slots=True)
class _Slot:
    """One KV stream (llama.cpp sequence id) and the prompt whose KV it still holds."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    busy: bool = False


class BatchScheduler:
    """Owns a llama.cpp context with one KV stream per slot, and the thread that steps it."""

    def __init__(
        self,
        llm: Any,
        limits: BatchLimits,
        *,
        eog: frozenset[int],
        on_finish: FinishFn,
        name: str,
        observer: Callable[[StepStats], None] | None = None,
    ) -> None:
        import llama_cpp  # heavy: imported when a model loads

        self._l = llama_cpp
        self._llm = llm
        self._limits = limits
        self._eog = eog
        self._on_finish = on_finish
        self._name = name
        self._observer = observer
        self._ctx = self._context()
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = int(llm.n_vocab())
        self._batch = llama_cpp.llama_batch_init(self._batch_capacity, 0, limits.max_sequences)
        self._slots = [_Slot(seq_id) for seq_id in range(limits.max_sequences)]
        self._active: list[_Sequence] = []
        self._waiting: deque[Generation] = deque()
        self._durations: deque[float] = deque(maxlen=64)
        self._reused = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def _batch_capacity(self) -> int:
        # One step never exceeds one ubatch: llama.cpp splitting it would make a
        # sequence's arithmetic depend on what else is in the step.
        return self._limits.step_tokens + self._limits.prefill_chunk + self._limits.max_sequences

    def _context(self) -> Any:
        lib, limits = self._l, self._limits
        params = lib.llama_context_default_params()
        params.n_ctx = limits.kv_cache_tokens
        params.n_batch = params.n_ubatch = self._batch_capacity
        params.n_seq_max = limits.max_sequences
        params.n_threads = params.n_threads_batch = limits.threads
        params.kv_unified = False
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._llm.model, params)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context for `{self._name}` with "
                f"{limits.kv_cache_tokens} KV cells for {limits.max_sequences} sequences; "
                "lower kv_cache_tokens or max_sequences in the appliance config."
            )
        return ctx

    # --- the event loop's side ----------------------------------------------------------

    def submit(self, generation: Generation) -> None:
        with self._cond:
            if self._closed:
                raise ModelNotReadyError(
                    f"The model `{self._name}` is shutting down; retry on another node.",
                    retry_after=1,
                )
            busy = len(self._active) + len(self._waiting)
            if busy >= self._limits.max_sequences + self._limits.max_queue:
                raise QueueFullError(
                    f"`{self._name}` is decoding {len(self._active)} sequences and "
                    f"{len(self._waiting)} requests are waiting (the queue is full). Retry "
                    "after the time in the Retry-After header.",
                    retry_after=self._retry_after(len(self._waiting) + 1),
                )
            generation.on_cancel(self._withdraw)
            self._waiting.append(generation)
            self._cond.notify()

    def load(self) -> EngineLoad:
        with self._cond:
            return EngineLoad(
                running=len(self._active),
                waiting=len(self._waiting),
                slots=self._limits.max_sequences,
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            abandoned = list(self._waiting)
            self._waiting.clear()
            for sequence in self._active:
                sequence.generation.cancel()
            self._cond.notify_all()
        for generation in abandoned:
            self._end(generation, Finish("error", 0, 0, error="the appliance is shutting down"))
        self._thread.join(timeout=60)
        self._l.llama_batch_free(self._batch)
        self._l.llama_free(self._ctx)

    def _retry_after(self, waiting: int) -> int:
        typical = statistics.median(self._durations) if self._durations else 1.0
        rounds = waiting / self._limits.max_sequences
        return max(1, min(60, round(typical * max(1.0, rounds))))

    def _withdraw(self, generation: Generation) -> None:
        with self._cond:
            try:
                self._waiting.remove(generation)
            except ValueError:
                return  # already running: the worker notices before its next step
        self._end(generation, Finish("cancelled", 0, 0))  # never started: nothing to bill

    def _end(self, generation: Generation, finish: Finish) -> None:
        generation.close(finish)
        self._on_finish(generation, finish)

    # --- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while self._admit():
            try:
                self._step()
            except Exception as exc:
                log.exception("decode step failed on model %s", self._name)
                for sequence in list(self._active):
                    self._leave(sequence, "error", error=type(exc).__name__)

    def _admit(self) -> bool:
        """Move waiting requests into free slots; block while there is nothing to do."""
        withdrawn: list[tuple[Generation, Finish]] = []
        with self._cond:
            while not self._active and not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed and not self._active:
                return False
            while self._waiting and len(self._active) < self._limits.max_sequences:
                generation = self._waiting.popleft()
                if generation.cancelled:
                    withdrawn.append((generation, Finish("cancelled", 0, 0)))
                    continue
                try:
                    self._active.append(self._place(generation))
                except Exception as exc:
                    log.exception("could not start a sequence on model %s", self._name)
                    withdrawn.append((generation, Finish("error", 0, 0, type(exc).__name__)))
        for generation, finish in withdrawn:
            self._end(generation, finish)
        return True

    def _place(self, generation: Generation) -> _Sequence:
        prompt = generation.prompt.tokens or []
        if not prompt:
            raise ValueError("an empty prompt has nothing to continue from")
        sampler = self._sampler(generation)
        free = [slot for slot in self._slots if not slot.busy]
        slot, reuse = max(
            ((s, self._reusable(s.cached, prompt)) for s in free), key=lambda pair: pair[1]
        )
        source, copied = self._copy_source(prompt, reuse)
        seq_id = slot.seq_id
        if source is not None:
            self._l.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._l.llama_memory_seq_cp(self._memory, source.slot.seq_id, seq_id, -1, -1)
            reuse = copied
        self._l.llama_memory_seq_rm(self._memory, seq_id, reuse, -1)
        slot.busy, slot.cached = True, []
        sequence = _Sequence(generation, slot, sampler)
        sequence.prefilled = sequence.pos = reuse
        self._reused += reuse
        return sequence

    def _reusable(self, cached: list[int], prompt: list[int]) -> int:
        """How much of `prompt` a stream holding `cached` serves: whole chunks, never all."""
        common = 0
        for have, want in zip(cached, prompt, strict=False):
            if have != want:
                break
            common += 1
        chunk = self._limits.prefill_chunk
        common = min(common, len(prompt) - 1)  # the last prompt token is decoded for logits
        return common - common % chunk

    def _copy_source(self, prompt: list[int], reuse: int) -> tuple[_Sequence | None, int]:
        """A running sequence worth copying from (a longer shared, already prefilled prefix)."""
        best: tuple[_Sequence | None, int] = (None, reuse)
        for other in self._active:
            shared = self._reusable(other.prompt[: other.prefilled], prompt)
            if shared - best[1] >= _MIN_COPY_CHUNKS * self._limits.prefill_chunk:
                best = (other, shared)
        return best

    def _sampler(self, generation: Generation) -> Any:
        lib, params = self._l, generation.params
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.presence_penalty or params.frequency_penalty:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    self._n_vocab,
                    _PENALTY_WINDOW,
                    1.0,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
            # As llama.cpp's server does, the prompt counts as text so far.
            for token in (generation.prompt.tokens or [])[-_PENALTY_WINDOW:]:
                lib.llama_sampler_accept(chain, token)
        if params.temperature <= 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        started = time.perf_counter()
        for sequence in list(self._active):
            if sequence.generation.cancelled:
                self._leave(sequence, "cancelled")
        if not self._active:
            return
        decode_tokens = prefill_tokens = stepped = 0
        batch = self._batch
        batch.n_tokens = 0
        with_logits: list[_Sequence] = []
        for sequence in self._active:
            if sequence.decoding:
                sequence.logits_at = self._add(sequence.next_token, sequence.pos, sequence, True)
                sequence.pos += 1
                with_logits.append(sequence)
                decode_tokens += 1
                stepped += 1
        budget = self._limits.step_tokens - decode_tokens
        for sequence in self._active:
            if sequence.decoding:
                continue
            start = sequence.prefilled
            end = min(len(sequence.prompt), start - start % self._limits.prefill_chunk
                      + self._limits.prefill_chunk)  # fmt: skip
            if end - start > budget and prefill_tokens:
                break  # the rest waits for the next step; at least one chunk always runs
            for position in range(start, end):
                last = position == len(sequence.prompt) - 1
                index = self._add(sequence.prompt[position], position, sequence, last)
                if last:
                    sequence.logits_at = index
                    with_logits.append(sequence)
            sequence.prefilled = sequence.pos = end
            prefill_tokens += end - start
            budget -= end - start
            stepped += 1
        status = self._l.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for sequence in with_logits:
            self._sample(sequence)
        self._report(started, stepped, prefill_tokens, decode_tokens)

    def _add(self, token: int, position: int, sequence: _Sequence, logits: bool) -> int:
        batch = self._batch
        index: int = batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence.slot.seq_id
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        return index

    def _sample(self, sequence: _Sequence) -> None:
        token = self._l.llama_sampler_sample(sequence.sampler, self._ctx, sequence.logits_at)
        generation, params = sequence.generation, sequence.generation.params
        if token in self._eog:
            self._leave(sequence, "stop")
            return
        sequence.produced += 1
        text, stopped = sequence.stops.feed(sequence.utf8.feed(self._llm.detokenize([token])))
        if text:
            first = generation.first_token_at is None
            generation.emit(text)
            if first and len(self._active) == 1:
                generation.wait_delivered(_FIRST_DELIVERY_WAIT)
        if stopped:
            self._leave(sequence, "stop", flush=False)
        elif sequence.produced >= params.max_tokens:
            self._leave(sequence, "length")
        else:
            sequence.next_token = token  # decoded at `pos` in the next step

    def _leave(
        self,
        sequence: _Sequence,
        reason: FinishReason,
        *,
        flush: bool = True,
        error: str | None = None,
    ) -> None:
        """The sequence ends now: its slot keeps only the prompt's KV, for prefix reuse."""
        generation = sequence.generation
        if flush and reason in ("stop", "length"):
            tail, _ = sequence.stops.feed(sequence.utf8.flush())
            tail += sequence.stops.flush()
            if tail:
                generation.emit(tail)
        self._active.remove(sequence)
        slot = sequence.slot
        kept = sequence.prefilled
        self._l.llama_memory_seq_rm(self._memory, slot.seq_id, kept, -1)
        slot.cached = sequence.prompt[:kept] if reason != "error" else []
        if reason == "error":
            self._l.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        with self._cond:
            slot.busy = False
        self._l.llama_sampler_free(sequence.sampler)
        # The prompt is billed in full once read (a reused prefix included, as OpenAI bills
        # cached prompt tokens); a request cancelled part-way is billed what it read.
        finish = Finish(reason, sequence.prefilled, sequence.produced, error=error)
        if generation.first_token_at is not None:
            self._durations.append(time.perf_counter() - generation.submitted_at)
        self._end(generation, finish)

    def _report(self, started: float, sequences: int, prefill: int, decode: int) -> None:
        if self._observer is None:
            return
        in_use = sum(s.pos for s in self._active)
        cached = sum(len(slot.cached) for slot in self._slots if not slot.busy)
        reused, self._reused = self._reused, 0
        self._observer(
            StepStats(
                sequences=sequences,
                prefill_tokens=prefill,
                decode_tokens=decode,
                seconds=time.perf_counter() - started,
                kv_cells_in_use=in_use,
                kv_cells_cached=cached,
                reused_tokens=reused,
            )
        )
