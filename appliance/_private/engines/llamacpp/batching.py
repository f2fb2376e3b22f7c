"""Continuous batching over llama.cpp's batch API.

Every running request is a sequence in one `llama_batch`: each step decodes one token for
every sequence that is generating, plus prompt chunks of sequences still being prefilled,
up to a per-step token budget, so a long prompt never stalls the streams already flowing.
New requests join at the next step; finished and cancelled ones leave at once.

A decode that llama.cpp refuses is undone (the step's KV cells removed) and its sequences
are decoded again one at a time: only a sequence that fails alone ends with an error (and
the other choices of its request with it), and the others go on with exactly the text they
would have produced.

Each sequence has its own KV stream (`kv_unified = false`), and by default the keys are
stored in 8 bits (`cache_type_k = "q8_0"`, values f16). Then llama.cpp's CPU attention has
one code path, a query row at a time over the cells in order, so a sequence's arithmetic
depends neither on its neighbours nor on how its prompt is grouped into steps: at
temperature 0 a request produces exactly the text it produces alone, prompts are read in
any chunks and reused to the token. With f16 keys and values llama.cpp switches kernels for
64+ queries of one stream and for a lone sequence decoding over 512+ cells; chunks then
stay under 64 tokens, and past 256 tokens of context a lone sequence may decode slightly
differently from the same sequence in a batch.

Batches list their tokens in sequence-id order and a new request takes the lowest free
slot: llama.cpp splits a multi-stream batch into one forward pass per run of consecutive
sequence ids, so the same tokens in a shuffled order cost up to twice as much.

The prompt cache has two tiers, and a request reuses the longest prefix of its prompt
that either holds for its cache scope (its org, unless the appliance shares one cache:
another org's cached prompt would show through the time to first token):

- Resident: a slot keeps the KV of everything its last sequence decoded, prompt and
  generated tokens (the last token sampled is never decoded), and the scope it ran in. A
  new request takes the lowest free slot and starts after what that slot holds, or copies
  another stream of its scope holding more (a free slot's, or a running sequence's prompt
  read so far: the same system prompt, say; `llama_memory_seq_cp`, a whole-stream copy).
  So a conversation's next turn starts after its previous prompt and answer.
- Host pool (`prefix_cache.py`, `kv_state.py`): when a sequence ends (not on an error),
  the whole blocks of its stream that the pool lacks are copied to host RAM (one
  `llama_state_seq_get_data_ext`, cut per token), in a radix tree over token blocks per
  scope within a byte budget, least recently used leaves dropped first. A request whose
  prompt the pool holds further than any stream (by `_MIN_COPY_TOKENS`) has those rows
  put into its emptied slot (`llama_state_seq_set_data_ext`), a hit ending mid-block
  included. So the cache outlives the slots: more conversations than slots keep their
  history.

A request whose prompt shares at least `prefill_chunk` more tokens with a running
sequence's prompt still being read (a wave of conversations starting with one new system
prompt) does not read them too: it waits for that sequence to have read them, then copies
its stream (`_await_prefix`, `_join_prefixes`).

In every case the request then reads only the rest of its prompt (at least its last token,
for the logits), and `Finish.cached_tokens` counts what it did not read. llama.cpp copies
a stream's tensors only at the next decode, so a stream copied from or into since then is
neither saved nor restored into (`_settled`).

Prompts are read oldest first for one chunk per step, then fewest unread tokens first
(`_prompt_chunks`), and a rest that fits one step is read whole (`_chunk`). While others
generate, a step after a decode reads only such rests (`_rests_first`): a conversation's
next turn, mostly cached, gets its first token without waiting for a decode of every
other sequence, nor behind other requests' long cold prompts.

A request may hold several sequences: `n` choices of each of its prompts (a completion may
have several). A prompt's first choice reads it; the others wait, then copy its KV stream
(`llama_memory_seq_cp`) and sample from the same logits, so a prompt is read once however
many choices it has. A request starts when it has a slot for every sequence it holds.

Beyond plain sampling (see sampling.py): a structured-output grammar per sequence (a
llama.cpp grammar sampler), logit bias, log probabilities of each token and, for `echo`
with log probabilities, of every prompt token (its logits are kept for every position, so
such a prompt is read whole rather than reused from another stream).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance._private.engines.admission import AdmissionQueue
from appliance._private.engines.base import (
    EngineLoad,
    Finish,
    FinishReason,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
    StepStats,
    WakeBatch,
    engine_failure,
)
from appliance._private.engines.llamacpp import kv_state
from appliance._private.engines.llamacpp.config import F16_MAX_PREFILL_CHUNK, KvCacheType
from appliance._private.engines.llamacpp.output import ChoiceOutput
from appliance._private.engines.llamacpp.prefix_cache import (
    CachedPrefix,
    PrefixCache,
    PrefixCacheStats,
)
from appliance._private.engines.llamacpp.sampling import Row, Scored, TokenPicker, scored
from appliance._private.errors import ModelLoadError, ModelNotReadyError

if TYPE_CHECKING:
    from appliance._private.engines.structured import OutputPlan

log = logging.getLogger("palisade.appliance.batching")

FinishFn = Callable[[Generation, Finish], None]
# Test seam (see `BatchScheduler.poison`): which generations' tokens to corrupt.
PoisonFn = Callable[[Generation], bool]
# With a single stream, wait at most this long after its first token for the loop to send
# it before the next step takes both cores (see Generation.wait_delivered).
_FIRST_DELIVERY_WAIT = 0.005
# Frequency and presence penalties look at this many of the latest generated tokens.
_PENALTY_WINDOW = 64
# Copying another stream's prompt costs a whole-stream copy (~5 ms here, about one token
# of prompt reading for 16 sequences); taking the slot that holds it instead would split
# every later step into one more forward pass (~3.5 ms each). Copy for this many tokens.
_MIN_COPY_TOKENS = 4


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_sequences: int
    kv_cache_tokens: int
    step_tokens: int
    prefill_chunk: int
    cache_type_k: KvCacheType
    cache_type_v: KvCacheType
    max_queue: int
    threads: int
    prefix_cache_bytes: int = 0  # the host pool's budget (0: slots only)
    prefix_cache_block: int = 16  # tokens per host-pool block
    shared_cache: bool = False  # every request in one cache scope (else one per org)

    @property
    def cells_per_sequence(self) -> int:
        return self.kv_cache_tokens // self.max_sequences

    @property
    def max_chunk(self) -> int:
        """The most prompt tokens of one sequence a step may read: a rest of up to this
        many is read whole (`BatchScheduler._chunk`)."""
        if self.cache_type_k == self.cache_type_v == "f16":
            return max(self.prefill_chunk, F16_MAX_PREFILL_CHUNK)
        return max(2 * self.prefill_chunk, self.step_tokens)


class _Request:
    """One generation's sequences (n choices of each of its prompts) and how they ended."""

    __slots__ = (
        "cached",
        "failure",
        "generation",
        "open",
        "produced",
        "reason",
        "scope",
        "sequences",
        "started",
    )

    def __init__(self, generation: Generation, scope: str) -> None:
        self.generation = generation
        self.scope = scope  # whose cached prefixes it may reuse and fill
        self.cached = 0  # prompt tokens its leading sequences took from a cache
        self.sequences: list[_Sequence] = []
        self.open = 0  # sequences still running
        self.produced = 0  # completion tokens of every choice
        self.reason: FinishReason = "stop"  # choice 0's, unless one failed or was cancelled
        self.failure: str | None = None
        self.started = 0.0  # the admission queue's clock when its sequences took slots

    def ended(self, sequence: _Sequence, reason: FinishReason, error: str | None) -> None:
        self.open -= 1
        if reason == "error":
            self.reason, self.failure = "error", self.failure or error
        elif reason == "cancelled" and self.reason != "error":
            self.reason = "cancelled"
        elif sequence.index == 0 and self.reason not in ("error", "cancelled"):
            self.reason = reason

    def finish(self) -> Finish:
        # Every prompt token once, in full once read (a reused prefix included, as OpenAI
        # bills cached prompt tokens; choices copy their prompt's stream), and every
        # choice's completion tokens; a request cancelled part-way is billed what it read.
        read = sum(sequence.prefilled for sequence in self.sequences if sequence.leads)
        failure = engine_failure(self.failure or "no result") if self.reason == "error" else None
        return Finish(self.reason, read, self.produced, failure, cached_tokens=self.cached)


class _Sequence:
    __slots__ = (
        "awaits",
        "echo",
        "followers",
        "generated",
        "generation",
        "grammar",
        "index",
        "leader",
        "leads",
        "logits_at",
        "next_token",
        "output",
        "pos",
        "prefilled",
        "produced",
        "prompt",
        "prompt_scores",
        "request",
        "rows",
        "sampler",
        "slot",
    )

    def __init__(self, request: _Request, index: int, prompt: list[int], slot: _Slot) -> None:
        self.request = request
        self.generation = request.generation
        self.index = index  # the choice: `p * n + i` for the i-th choice of prompt p
        self.prompt = prompt
        self.slot = slot
        self.sampler: Any = None  # a llama.cpp sampler chain; None: greedy, done here
        self.grammar: Any = None  # a llama.cpp grammar sampler, for structured output
        self.output: ChoiceOutput | None = None
        self.prefilled = 0
        self.pos = 0
        self.produced = 0
        self.generated: list[int] = []  # sampled tokens; each is decoded at the next step
        self.next_token = -1
        self.logits_at = -1
        self.leads = True  # reads its prompt (False: copies its leader's stream)
        self.leader: _Sequence | None = None  # set while waiting for the leader's prompt
        self.followers: list[_Sequence] = []  # choices waiting for this one's prompt
        # Another request's sequence reading the same prompt prefix, and how far: this one
        # waits to copy it rather than read it too (see `_await_prefix`).
        self.awaits: tuple[_Sequence, int] | None = None
        self.echo = False  # the prompt is still to be written first
        # Echo with log probabilities: each prompt token's (the first has none), and the
        # batch rows of this step whose logits score the prompt (position, row).
        self.prompt_scores: list[Scored | None] | None = None
        self.rows: list[tuple[int, int]] = []

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    def stream(self) -> list[int]:
        """The tokens whose KV its stream holds: the prompt read so far, then the generated
        tokens decoded (the last one sampled never is)."""
        if not self.generated:
            return self.prompt[: self.pos]
        return (self.prompt + self.generated)[: self.pos]


def _seq_id(sequence: _Sequence) -> int:
    return sequence.slot.seq_id


def _unread(sequence: _Sequence) -> int:
    return len(sequence.prompt) - sequence.prefilled


def _second(pair: tuple[int, int]) -> int:
    return pair[1]


# A sequence in a step, with its position and prompt progress before the step.
_Planned = tuple[_Sequence, int, int]


@dataclass(slots=True)
class _CacheCounts:
    """Prompt-cache use since the last report."""

    lookups: int = 0  # one per prompt a leading sequence reads
    hit_tokens: int = 0  # prompt tokens leading sequences did not read
    query_tokens: int = 0  # prompt tokens looked up
    copied_tokens: int = 0  # prompt tokens the other choices copied from their leader

    def hit(self, request: _Request, tokens: int) -> None:
        """`request` did not read `tokens` of its prompt (a cache served them)."""
        request.cached += tokens
        self.hit_tokens += tokens


def common_prefix(left: list[int], right: list[int]) -> int:
    """How many leading tokens `left` and `right` share."""
    n = min(len(left), len(right))
    if n == 0 or left[0] != right[0]:
        return 0
    if left[:n] == right[:n]:
        return n
    differ = np.flatnonzero(np.asarray(left[:n]) != np.asarray(right[:n]))
    return int(differ[0])


@dataclass(slots=True)
class _Slot:
    """One KV stream (llama.cpp sequence id), the tokens whose KV it still holds, and the
    cache scope of the request that put them there."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    busy: bool = False
    scope: str = ""


class _HostPool:
    """The host-RAM tier of the prompt cache: the KV rows of finished sequences' streams,
    by blocks of tokens (`PrefixCache`), saved when a sequence ends and restored into a
    slot's emptied stream when a request's prompt starts with them."""

    def __init__(self, lib: Any, ctx: Any, layout: kv_state.KvLayout, limits: BatchLimits) -> None:
        self._lib, self._ctx, self._layout = lib, ctx, layout
        self._cache = PrefixCache(limits.prefix_cache_block, limits.prefix_cache_bytes)

    @property
    def stats(self) -> PrefixCacheStats:
        return self._cache.stats

    def longest(self, scope: str, prompt: list[int], limit: int) -> CachedPrefix:
        """The longest cached prefix of `prompt` in `scope`, at most `limit` tokens."""
        found = self._cache.longest(scope, prompt)
        return found if found.tokens <= limit else replace(found, tokens=limit)

    def restore(self, prefix: CachedPrefix, seq_id: int) -> bool:
        """Replace sequence `seq_id`'s stream by `prefix`; False (the stream then empty) when
        llama.cpp refuses it."""
        state = self._layout.assemble([block.payload for block in prefix.blocks], prefix.tokens)
        try:
            kv_state.write_state(self._lib, self._ctx, seq_id, state)
        except kv_state.KvStateError:
            log.exception("could not restore a cached prompt into sequence %d", seq_id)
            return False
        return True

    def save(self, scope: str, tokens: list[int], seq_id: int) -> None:
        """Add the whole blocks of `tokens` (what sequence `seq_id`'s stream holds) that the
        pool lacks, reading the stream once."""
        missing = self._cache.missing(scope, tokens)
        if not missing:
            return
        rows = self._layout.view(kv_state.read_state(self._lib, self._ctx, seq_id))
        self._cache.insert(scope, tokens, missing.start, rows.take)


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
        poison: PoisonFn | None = None,
    ) -> None:
        import llama_cpp  # heavy: imported when a model loads

        self._l = llama_cpp
        self._llm = llm
        self._limits = limits
        self._eog = eog
        self._on_finish = on_finish
        self._name = name
        self._observer = observer
        # Test seam: a generation for which `poison` is true has its tokens written into
        # the batch as an id outside the vocabulary, so that the real llama_decode refuses
        # the batch (-1) as it did unchecked token ids; this is how the tests prove that a
        # failed decode ends only the sequence it belongs to. None in production.
        self.poison = poison
        self._ctx = self._context()
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = int(llm.n_vocab())
        self._eog_ids = np.fromiter(sorted(eog), dtype=np.intp)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._picker = TokenPicker(llama_cpp, vocab, self._n_vocab)
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}
        self._wakes = WakeBatch()
        self._batch = llama_cpp.llama_batch_init(self._batch_capacity, 0, limits.max_sequences)
        self._slots = [_Slot(seq_id) for seq_id in range(limits.max_sequences)]
        self._active: list[_Sequence] = []
        self._waiting: deque[Generation] = deque()
        self._plans: dict[Generation, OutputPlan] = {}  # structured output, by request
        # Counted under `_cond`, like `_active` and `_waiting` themselves.
        self._admission = AdmissionQueue(
            name, limits.max_sequences, limits.max_queue, activity="decoding"
        )
        self._counts = _CacheCounts()  # since the last step's report
        self._rested = False  # the last step read only rests (`_rests_first`)
        self._evicted_reported = 0
        self._pool: _HostPool | None = None  # set by the worker thread, see `_work`
        # Streams copied from or into since the last decode (see `_copy_stream`).
        self._copying: set[int] = set()
        self._cond = threading.Condition()
        self._closed = False
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._work, args=(ready,), name=f"engine-{name}", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            self._l.llama_batch_free(self._batch)
            self._l.llama_free(self._ctx)
            raise

    @property
    def _batch_capacity(self) -> int:
        # The decode tokens, the first prompt's chunk, and the others' within step_tokens.
        return self._limits.step_tokens + self._limits.max_chunk + self._limits.max_sequences

    def _host_pool(self) -> _HostPool | None:
        """The host-RAM cache tier, when it has a budget; the model's KV layout is checked
        first (`ModelLoadError` when it cannot be cut per token)."""
        if self._limits.prefix_cache_bytes <= 0:
            return None
        token = max(int(self._llm.token_bos()), 0)
        layout = kv_state.probe_layout(self._l, self._ctx, 0, token, self._name)
        return _HostPool(self._l, self._ctx, layout, self._limits)

    def _context(self) -> Any:
        lib, limits = self._l, self._limits
        params = lib.llama_context_default_params()
        params.n_ctx = limits.kv_cache_tokens
        params.n_batch = params.n_ubatch = self._batch_capacity
        params.n_seq_max = limits.max_sequences
        params.n_threads = params.n_threads_batch = limits.threads
        params.kv_unified = False
        types = {"q8_0": lib.GGML_TYPE_Q8_0, "f16": lib.GGML_TYPE_F16}
        params.type_k = types[limits.cache_type_k]
        params.type_v = types[limits.cache_type_v]
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V needs it
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

    def submit(self, generation: Generation, plan: OutputPlan | None = None) -> None:
        """Queue `generation` (at most `max_sequences` choices in all, see `choices`)."""
        with self._cond:
            if self._closed:
                raise ModelNotReadyError(
                    f"The model `{self._name}` is shutting down; retry on another node.",
                    retry_after=1,
                )
            self._admission.admit()
            generation.on_cancel(self._withdraw)
            if plan is not None:
                self._plans[generation] = plan
            self._waiting.append(generation)
            self._cond.notify()

    def load(self) -> EngineLoad:
        with self._cond:
            return self._admission.load()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            abandoned = list(self._waiting)
            self._waiting.clear()
            self._plans.clear()
            for _ in abandoned:
                self._admission.withdraw()
            for sequence in self._active:
                sequence.generation.cancel()
            self._cond.notify_all()
        for generation in abandoned:
            shutdown = engine_failure("the appliance is shutting down")
            self._end(generation, Finish("error", 0, 0, shutdown))
        self._thread.join(timeout=60)
        self._l.llama_batch_free(self._batch)
        self._l.llama_free(self._ctx)

    def _withdraw(self, generation: Generation) -> None:
        with self._cond:
            try:
                self._waiting.remove(generation)
            except ValueError:
                return  # already running: the worker notices before its next step
            self._plans.pop(generation, None)
            self._admission.withdraw()
        self._end(generation, Finish("cancelled", 0, 0))  # never started: nothing to bill

    def _end(self, generation: Generation, finish: Finish) -> None:
        generation.close(finish)
        self._on_finish(generation, finish)

    # --- the worker thread ----------------------------------------------------------------

    def _work(self, ready: Future[None]) -> None:
        # llama.cpp's CPU threads are a team owned by the thread that decodes: after a
        # decode on another thread (the layout probe, when it ran at load) every step of
        # this one took about four times as long (measured: 22 ms a token instead of 6), so
        # the probe decodes here, before the first step.
        try:
            self._pool = self._host_pool()
        except Exception as exc:  # noqa: BLE001 - re-raised by the constructor
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while self._admit():
            try:
                self._step()
            except Exception as exc:
                log.exception("decode step failed on model %s", self._name)
                for sequence in list(self._active):
                    if sequence in self._active:  # a sibling's failure may have ended it
                        self._leave(sequence, "error", error=type(exc).__name__)

    def _admit(self) -> bool:
        """Move waiting requests into free slots; block while there is nothing to do."""
        withdrawn: list[tuple[Generation, Finish]] = []
        with self._cond:
            while not self._active and not self._waiting and not self._closed:
                self._wakes.flush()
                self._cond.wait()
            if self._closed and not self._active:
                self._wakes.flush()
                return False
            while self._waiting and self._fits(self._waiting[0]):
                generation = self._waiting.popleft()
                plan = self._plans.pop(generation, None)
                if generation.cancelled:
                    self._admission.withdraw()
                    withdrawn.append((generation, Finish("cancelled", 0, 0)))
                    continue
                try:
                    request = self._place(generation, plan)
                except Exception as exc:
                    log.exception("could not start a sequence on model %s", self._name)
                    self._admission.withdraw()
                    failed = Finish("error", 0, 0, engine_failure(type(exc).__name__))
                    withdrawn.append((generation, failed))
                    continue
                request.started = self._admission.start()
                generation.mark_started()
                self._active.extend(request.sequences)
        for generation, finish in withdrawn:
            self._end(generation, finish)
        return True

    def _fits(self, generation: Generation) -> bool:
        """Whether every sequence of `generation` has a free slot now."""
        return choices(generation) <= self._limits.max_sequences - len(self._active)

    def _place(self, generation: Generation, plan: OutputPlan | None) -> _Request:
        """Slots and samplers for every choice of every prompt of `generation`."""
        scope = "" if self._limits.shared_cache else generation.params.cache_scope
        request = _Request(generation, scope)
        prompts = [generation.prompt, *generation.prompt.more]
        features = generation.params.features or RequestFeatures()
        rich = plan is not None or len(prompts) * features.n > 1 or _rich(features)
        try:
            for number, prompt in enumerate(prompts):
                leader = self._lead(request, _tokens(prompt), number * features.n, features.echo)
                for index in range(number * features.n + 1, (number + 1) * features.n):
                    self._follow(request, leader, index)
            for sequence in request.sequences:
                self._equip(sequence, plan, rich=rich)
        except Exception:
            for sequence in request.sequences:
                self._release(sequence, keep=False)
            raise
        request.open = len(request.sequences)
        return request

    def _free_slot(self) -> _Slot:
        # The lowest free id keeps running sequences on consecutive ids: one forward pass.
        return min((s for s in self._slots if not s.busy), key=lambda s: s.seq_id)

    def _lead(self, request: _Request, prompt: list[int], index: int, echo: bool) -> _Sequence:
        """The sequence that reads `prompt`, starting after the longest prefix of it that
        the cache holds for its scope (unless every prompt position must be scored)."""
        slot = self._free_slot()
        features = request.generation.params.features
        scoring = echo and features is not None and features.logprobs
        reuse = 0 if scoring else self._fill(slot, prompt, request.scope)
        self._l.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1)
        slot.busy, slot.cached, slot.scope = True, [], request.scope
        sequence = _Sequence(request, index, prompt, slot)
        sequence.prefilled = sequence.pos = reuse
        sequence.echo = echo
        sequence.prompt_scores = [None] if scoring else None
        if not scoring:
            sequence.awaits = self._await_prefix(sequence)
        self._counts.lookups += 1
        self._counts.query_tokens += len(prompt)
        self._counts.hit(request, reuse)
        request.sequences.append(sequence)
        return sequence

    def _await_prefix(self, sequence: _Sequence) -> tuple[_Sequence, int] | None:
        """A running sequence of the same scope, still reading a prompt that shares at
        least `prefill_chunk` tokens more with `sequence`'s than it has already: reading
        them at once too would double the work (a wave of requests with one new system
        prompt), so `sequence` waits for it to read them, then copies its stream."""
        scope, prompt = sequence.request.scope, sequence.prompt
        best: tuple[_Sequence, int] | None = None
        for other in self._active:
            if other.decoding or other.awaits is not None or other.request.scope != scope:
                continue
            shared = self._reusable(other.prompt, prompt)
            if shared - sequence.prefilled >= self._limits.prefill_chunk and (
                best is None or shared > best[1]
            ):
                best = (other, shared)
        return best

    def _join_prefixes(self) -> None:
        """Sequences whose awaited sequence has read the shared prefix copy its stream
        (and start after it); those whose awaited one left read their prompt themselves."""
        for sequence in self._active:
            if sequence.awaits is None:
                continue
            other, shared = sequence.awaits
            if other in self._active and other.prefilled < shared:
                continue
            sequence.awaits = None
            if other in self._active and shared > sequence.prefilled:
                self._copy_stream(other.slot.seq_id, sequence.slot.seq_id)
                self._l.llama_memory_seq_rm(self._memory, sequence.slot.seq_id, shared, -1)
                gained = shared - sequence.prefilled
                sequence.prefilled = sequence.pos = shared
                self._counts.hit(sequence.request, gained)

    def _fill(self, slot: _Slot, prompt: list[int], scope: str) -> int:
        """Put the longest cached prefix of `prompt` (in `scope`) into `slot`'s stream: what
        the slot holds already, a copy of another stream, or blocks from the host pool,
        whichever serves the most tokens, copies and restores only when they serve at least
        `_MIN_COPY_TOKENS` more. Returns how many tokens the stream now serves."""
        own = self._reusable(slot.cached, prompt) if slot.scope == scope else 0
        source, shared = self._copy_source(prompt, slot, scope)
        pool = self._pool
        if pool is not None:
            pooled = pool.longest(scope, prompt, len(prompt) - 1)
            gain = pooled.tokens - max(own, shared)
            if gain >= _MIN_COPY_TOKENS and self._settled(slot.seq_id):
                if pool.restore(pooled, slot.seq_id):
                    return pooled.tokens
                own = 0  # a refused restore leaves the stream empty
        if shared - own >= _MIN_COPY_TOKENS:
            self._copy_stream(source, slot.seq_id)
            return shared
        return own

    def _follow(self, request: _Request, leader: _Sequence, index: int) -> None:
        """Another choice of `leader`'s prompt: it waits for the leader to read it."""
        slot = self._free_slot()
        slot.busy, slot.cached, slot.scope = True, [], request.scope
        sequence = _Sequence(request, index, leader.prompt, slot)
        sequence.leads, sequence.leader, sequence.echo = False, leader, leader.echo
        leader.followers.append(sequence)
        request.sequences.append(sequence)

    def _equip(self, sequence: _Sequence, plan: OutputPlan | None, *, rich: bool) -> None:
        """The sequence's samplers (chain, grammar) and its output."""
        generation = sequence.generation
        sequence.sampler = self._sampler(generation.params, sequence.prompt, sequence.index)
        if plan is not None and plan.grammar is not None:
            sequence.grammar = self._picker.grammar(plan.grammar)
        reader = plan.reader(sequence.index) if plan is not None else None
        sequence.output = ChoiceOutput(
            generation, sequence.index, rich=rich, reader=reader, name=self._named
        )

    def _named(self, token: int) -> bytes:
        return self._piece(token, special=True)

    def _release(self, sequence: _Sequence, keep: bool) -> None:
        """Free the sequence's samplers and slot; the slot keeps the KV of what the
        sequence decoded (prompt and generated tokens) for prefix reuse, unless not `keep`."""
        slot = sequence.slot
        kept = sequence.stream() if keep else []
        self._l.llama_memory_seq_rm(self._memory, slot.seq_id, len(kept), -1)
        slot.cached = kept
        for sampler in (sequence.sampler, sequence.grammar):
            if sampler is not None:
                self._l.llama_sampler_free(sampler)
        sequence.sampler = sequence.grammar = None
        with self._cond:
            slot.busy = False

    @staticmethod
    def _reusable(cached: list[int], prompt: list[int]) -> int:
        """How much of `prompt` a stream holding `cached` serves: never all of it."""
        # the last prompt token is decoded for logits
        return min(common_prefix(cached, prompt), len(prompt) - 1)

    def _copy_source(self, prompt: list[int], target: _Slot, scope: str) -> tuple[int, int]:
        """The stream of `scope` sharing the longest prefix with `prompt`, other than
        `target`'s own: another free slot's cached tokens or a running sequence's prompt
        read so far."""
        best = (-1, 0)
        for slot in self._slots:
            if slot is not target and not slot.busy and slot.scope == scope:
                best = max(best, (slot.seq_id, self._reusable(slot.cached, prompt)), key=_second)
        for other in self._active:
            if other.request.scope == scope:
                shared = self._reusable(other.prompt[: other.prefilled], prompt)
                best = max(best, (other.slot.seq_id, shared), key=_second)
        return best

    def _sampler(self, params: SamplingParams, prompt: list[int], index: int) -> Any:
        """A llama.cpp sampler chain; None for plain greedy, which `_sample` does itself.
        Choice `index` seeds its own draws (seed + index), so choices differ."""
        lib = self._l
        penalised = bool(
            params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1
        )
        if params.temperature <= 0.0 and not penalised and not params.logit_bias:
            return None
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.logit_bias:
            lib.llama_sampler_chain_add(chain, self._picker.logit_bias(params.logit_bias))
        if penalised:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    self._n_vocab,
                    _PENALTY_WINDOW,
                    params.repetition_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
            # As llama.cpp's server does, the prompt counts as text so far.
            for token in prompt[-_PENALTY_WINDOW:]:
                lib.llama_sampler_accept(chain, token)
        if params.temperature <= 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        seed = params.seed + index if params.seed is not None else random.getrandbits(32)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        started = time.perf_counter()
        for sequence in list(self._active):
            if sequence.generation.cancelled:
                self._leave(sequence, "cancelled")
        if not self._active:
            return
        self._join_prefixes()
        chunks, decode = self._prompt_chunks()
        self._batch.n_tokens = 0
        planned: list[_Planned] = []
        with_logits: list[_Sequence] = []
        decode_tokens = prefill_tokens = 0
        # In sequence-id order: llama.cpp runs one pass per run of consecutive ids.
        for sequence in sorted(self._active, key=_seq_id):
            if sequence not in chunks and not (decode and sequence.decoding):
                continue
            planned.append((sequence, sequence.pos, sequence.prefilled))
            if sequence.decoding:
                decode_tokens += 1
            else:
                prefill_tokens += chunks[sequence] - sequence.prefilled
            if self._add_step(sequence, chunks.get(sequence, 0)):
                with_logits.append(sequence)
        self._wakes.flush()  # readers run while the decode holds no interpreter lock
        status = self._decode()
        if status != 0:
            self._isolate(planned, chunks, status)
        else:
            self._decoded(planned, with_logits)
        self._report(started, decode_tokens + len(chunks), prefill_tokens, decode_tokens)

    def _decode(self) -> int:
        status: int = self._l.llama_decode(self._ctx, self._batch)
        if status == 0:
            self._copying.clear()  # a decode first carries out the pending stream copies
        return status

    def _decoded(self, planned: list[_Planned], with_logits: list[_Sequence]) -> None:
        """After a step's decode: score prompts (echo), then sample who has logits."""
        for sequence, _, _ in planned:
            self._score_prompt(sequence)
        for sequence in with_logits:
            if sequence in self._active:  # a sibling's failure may have ended it
                self._sample_or_fail(sequence)

    def _add_step(self, sequence: _Sequence, prompt_end: int) -> bool:
        """Put this step's tokens of `sequence` in the batch (its next token, or its prompt
        up to `prompt_end`); True when it is sampled after the decode."""
        poisoned = self.poison is not None and self.poison(sequence.generation)
        if sequence.decoding:
            token = self._n_vocab if poisoned else sequence.next_token
            sequence.logits_at = self._add(token, sequence.pos, sequence, True)
            sequence.pos += 1
            return True
        sampled = False
        scoring = sequence.prompt_scores is not None
        for position in range(sequence.prefilled, prompt_end):
            last = position == len(sequence.prompt) - 1
            token = self._n_vocab if poisoned else sequence.prompt[position]
            index = self._add(token, position, sequence, last or scoring)
            if last:
                sequence.logits_at, sampled = index, True
            elif scoring:
                sequence.rows.append((position, index))
        sequence.prefilled = sequence.pos = prompt_end
        return sampled

    def _isolate(self, planned: list[_Planned], chunks: dict[_Sequence, int], status: int) -> None:
        """llama.cpp refused the step: undo it, then decode each sequence alone, so that
        only a sequence that fails by itself ends (with an error) and the others get
        exactly the logits they would have had (a sequence's arithmetic does not depend on
        its neighbours, see the module docstring)."""
        log.warning(
            "llama_decode returned %s for a step of %d sequences on model %s; decoding "
            "them one at a time",
            status,
            len(planned),
            self._name,
        )
        for sequence, pos, prefilled in planned:
            self._rewind(sequence, pos, prefilled)
        for sequence, pos, prefilled in planned:
            if sequence not in self._active:
                continue  # a sibling's failure ended it
            self._batch.n_tokens = 0
            sampled = self._add_step(sequence, chunks.get(sequence, 0))
            alone = self._decode()
            if alone != 0:
                self._rewind(sequence, pos, prefilled)
                log.warning(
                    "llama_decode returned %s for one sequence on model %s; ending it",
                    alone,
                    self._name,
                )
                reason = f"llama.cpp could not decode this request (llama_decode returned {alone})"
                self._leave(sequence, "error", error=reason)
                continue
            self._score_prompt(sequence)
            if sampled:
                self._sample_or_fail(sequence)

    def _rewind(self, sequence: _Sequence, pos: int, prefilled: int) -> None:
        """Back to before a step: its KV cells removed (a failed decode may have kept the
        micro-batches it finished), its position and prompt progress restored."""
        self._l.llama_memory_seq_rm(self._memory, sequence.slot.seq_id, pos, -1)
        sequence.pos, sequence.prefilled = pos, prefilled
        sequence.rows.clear()

    def _sample_or_fail(self, sequence: _Sequence) -> None:
        """Sample `sequence` (and the choices waiting for its prompt, the first time); a
        failure while doing so ends that request only."""
        followers, sequence.followers = sequence.followers, []
        try:
            for follower in followers:
                self._copy_prompt(sequence, follower)
            self._sample(sequence)
        except Exception as exc:
            log.exception("sampling failed on model %s", self._name)
            if sequence in self._active:
                self._leave(sequence, "error", error=type(exc).__name__)
        for follower in followers:
            if follower in self._active:
                self._sample_or_fail(follower)

    def _copy_prompt(self, leader: _Sequence, follower: _Sequence) -> None:
        """`follower` takes the prompt `leader` has just read: its KV stream, its logits
        for the first token and, with echo, its prompt's log probabilities."""
        self._copy_stream(leader.slot.seq_id, follower.slot.seq_id)
        follower.prefilled = follower.pos = leader.prefilled
        follower.logits_at = leader.logits_at
        follower.prompt_scores = leader.prompt_scores
        follower.leader = None
        self._counts.copied_tokens += leader.prefilled

    def _copy_stream(self, source: int, target: int) -> None:
        """`target`'s stream becomes a copy of `source`'s. llama.cpp copies the tensors
        only at the next decode, so until then neither stream is read (saved) nor
        overwritten (restored) behind its back: see `_settled`."""
        self._l.llama_memory_seq_rm(self._memory, target, -1, -1)
        self._l.llama_memory_seq_cp(self._memory, source, target, -1, -1)
        self._copying.update((source, target))

    def _settled(self, seq_id: int) -> bool:
        """Whether the stream's tensors are what its cells say (no copy from or into it
        is waiting for the next decode)."""
        return seq_id not in self._copying

    def _score_prompt(self, sequence: _Sequence) -> None:
        """The log probabilities of the prompt tokens this step's logits predict (echo)."""
        scores, prompt = sequence.prompt_scores, sequence.prompt
        if scores is None or not sequence.rows:
            return
        top = _top_logprobs(sequence.generation.params.features)
        for position, row in sequence.rows:
            scores.append(scored(self._row(row), prompt[position + 1], top))
        sequence.rows.clear()

    def _prompt_chunks(self) -> tuple[dict[_Sequence, int], bool]:
        """Where each prefilling sequence's prompt reading ends this step, and whether the
        generating sequences decode in it too.

        A step after one that decoded reads only short rests (`_rests_first`) if any are
        waiting while others generate. Otherwise generating sequences get their token
        first; prompts share what is left of `step_tokens`, at most `prefill_chunk` tokens
        each. The oldest prompt always gets its chunk, so every prompt is read in turn; the
        others go fewest unread tokens first, so a request whose prompt was mostly cached
        (a conversation's next turn) gets its first token without waiting behind other
        requests' long cold prompts.
        """
        # Not generating, nor waiting to copy another's prompt; in admission order.
        reading = [
            s for s in self._active if not s.decoding and s.leader is None and s.awaits is None
        ]
        decoding = sum(s.decoding for s in self._active)
        rests = self._rests_first(reading) if decoding and not self._rested else {}
        self._rested = bool(rests)
        if rests:
            return rests, False
        budget = self._limits.step_tokens - decoding
        chunks: dict[_Sequence, int] = {}
        for sequence in reading[:1] + sorted(reading[1:], key=_unread):
            take = self._chunk(_unread(sequence))
            if chunks:
                take = min(take, budget)
            if take <= 0:
                break
            chunks[sequence] = sequence.prefilled + take
            budget -= take
        return chunks, True

    def _rests_first(self, reading: list[_Sequence]) -> dict[_Sequence, int]:
        """Prompts whose whole rest one step reads (at most `max_chunk` unread tokens: a
        mostly cached next turn, a short new prompt), fewest unread first, within
        `step_tokens`. Read in a step of their own, their first tokens do not wait for a
        decode of every generating sequence (each row of which, over a long cached
        history, costs about as much as a prompt token); the sequences generating then
        decode in the next step, so they wait at most one such step."""
        budget, limit = self._limits.step_tokens, self._limits.max_chunk
        chunks: dict[_Sequence, int] = {}
        for sequence in sorted(reading, key=_unread):
            unread = _unread(sequence)
            if unread > min(limit, budget):
                break
            chunks[sequence] = len(sequence.prompt)
            budget -= unread
        return chunks

    def _chunk(self, unread: int) -> int:
        """How much of a prompt with `unread` tokens left to read one step reads: all of a
        rest of at most `max_chunk` tokens (the end of a mostly cached prompt, a short
        prompt), saving steps before its first token, else `prefill_chunk`. `max_chunk`
        keeps the arithmetic independent of chunking (with f16 keys and values, under 64
        tokens)."""
        if unread <= self._limits.max_chunk:
            return unread
        return self._limits.prefill_chunk

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
        generation, params = sequence.generation, sequence.generation.params
        request = sequence.request
        if sequence.echo:
            self._echo(sequence)
        early = sequence.produced < params.min_tokens
        token = self._pick(sequence, early)
        if token is None:  # the grammar allows nothing more (and no end either)
            self._leave(sequence, "stop")
            return
        if token in self._eog and not params.ignore_eos:
            self._leave(sequence, "stop")
            return
        score = self._score(sequence, token)
        if sequence.grammar is not None:
            self._l.llama_sampler_accept(sequence.grammar, token)
        sequence.produced += 1
        request.produced += 1
        piece = self._piece(token, special=not params.skip_special_tokens)
        first = generation.first_token_at is None
        assert sequence.output is not None
        emitted, stopped = sequence.output.token(
            piece, score, early=early, wakes=self._wakes, tokens=request.produced
        )
        if emitted and first and len(self._active) == 1:
            self._wakes.flush()
            generation.wait_delivered(_FIRST_DELIVERY_WAIT)
        if stopped:
            self._leave(sequence, "stop", flush=False)
        elif sequence.produced >= params.max_tokens:
            self._leave(sequence, "length")
        else:
            sequence.next_token = token  # decoded at `pos` in the next step
            sequence.generated.append(token)

    def _pick(self, sequence: _Sequence, early: bool) -> int | None:
        """The next token from this step's logits: the hot path (greedy here, or the
        sampler chain on the context's logits) unless a grammar constrains it or end of
        generation is not allowed yet (`early`, before min_tokens). None: nothing allowed."""
        if sequence.grammar is None and not early:
            if sequence.sampler is None:
                return int(self._row(sequence.logits_at).argmax())
            token: int = self._l.llama_sampler_sample(
                sequence.sampler, self._ctx, sequence.logits_at
            )
            return token
        row = self._row(sequence.logits_at)
        if early:  # a copy: the raw logits stay for log probabilities and sibling choices
            row = row.copy()
            row[self._eog_ids] = -np.inf
        picked = self._picker.pick(row, sequence.sampler, sequence.grammar)
        if picked is not None and sequence.sampler is not None:
            self._l.llama_sampler_accept(sequence.sampler, picked)
        return picked

    def _score(self, sequence: _Sequence, token: int) -> Scored | None:
        features = sequence.generation.params.features
        if features is None or not features.logprobs:
            return None
        return scored(self._row(sequence.logits_at), token, _top_logprobs(features))

    def _echo(self, sequence: _Sequence) -> None:
        """The prompt, before the first generated token (completions' `echo`)."""
        sequence.echo = False
        pieces = [self._piece(token, special=True) for token in sequence.prompt]
        assert sequence.output is not None
        sequence.output.echo(pieces, sequence.prompt_scores, sequence.request.produced)

    def _row(self, index: int) -> Row:
        """The logits of batch row `index` (a view of llama.cpp's own buffer)."""
        logits = self._l.llama_get_logits_ith(self._ctx, index)
        row: Row = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        return row

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        """The token's bytes; control tokens are empty unless `special` writes them out."""
        pieces = self._special_pieces if special else self._pieces
        piece = pieces.get(token)
        if piece is None:
            piece = pieces[token] = self._llm.detokenize([token], special=special)
        return piece

    def _leave(
        self,
        sequence: _Sequence,
        reason: FinishReason,
        *,
        flush: bool = True,
        error: str | None = None,
    ) -> None:
        """The sequence ends now: what it decoded stays in its slot and is saved to the
        host pool, for prefix reuse (not after a failure). The request ends with its last
        sequence; a failure ends all of them."""
        request = sequence.request
        if reason in ("stop", "length") and sequence.output is not None:
            sequence.output.end(reason, flush=flush, tokens=request.produced)
        self._active.remove(sequence)
        if reason != "error" and self._pool is not None and self._settled(sequence.slot.seq_id):
            self._save(sequence)
        self._release(sequence, keep=reason != "error")
        request.ended(sequence, reason, error)
        if reason == "error":
            for sibling in request.sequences:
                if sibling in self._active:
                    self._leave(sibling, "error", error=error)
        if request.open:
            return
        admission = self._admission
        # Completed requests' running times set the typical duration behind Retry-After.
        ok = request.reason in ("stop", "length")
        duration = admission.clock() - request.started if ok else None
        with self._cond:
            admission.finish(duration)
        self._end(sequence.generation, request.finish())

    def _save(self, sequence: _Sequence) -> None:
        """Copy the blocks of the sequence's stream that the host pool lacks into it; a
        failure costs only the cache entry."""
        assert self._pool is not None
        try:
            self._pool.save(sequence.request.scope, sequence.stream(), sequence.slot.seq_id)
        except Exception:
            log.exception("could not save a prompt to the prefix cache of model %s", self._name)

    def _report(self, started: float, sequences: int, prefill: int, decode: int) -> None:
        if self._observer is None:
            return
        in_use = sum(s.pos for s in self._active)
        cached = sum(len(slot.cached) for slot in self._slots if not slot.busy)
        counts, self._counts = self._counts, _CacheCounts()
        pool = self._pool.stats if self._pool is not None else None
        evicted = pool.evicted_blocks if pool is not None else 0
        self._observer(
            StepStats(
                sequences=sequences,
                prefill_tokens=prefill,
                decode_tokens=decode,
                seconds=time.perf_counter() - started,
                kv_cells_in_use=in_use,
                kv_cells_cached=cached,
                reused_tokens=counts.hit_tokens + counts.copied_tokens,
                cache_lookups=counts.lookups,
                cache_hit_tokens=counts.hit_tokens,
                cache_query_tokens=counts.query_tokens,
                cache_evicted_blocks=evicted - self._evicted_reported,
                cache_bytes=pool.bytes if pool is not None else 0,
                cache_capacity_bytes=pool.capacity_bytes if pool is not None else 0,
            )
        )
        self._evicted_reported = evicted


def choices(generation: Generation) -> int:
    """How many sequences `generation` needs: `n` for each of its prompts."""
    features = generation.params.features
    return (features.n if features is not None else 1) * (1 + len(generation.prompt.more))


def _tokens(prompt: Prompt) -> list[int]:
    if not prompt.tokens:
        raise ValueError("an empty prompt has nothing to continue from")
    return prompt.tokens


def _rich(features: RequestFeatures) -> bool:
    """Output beyond plain text: log probabilities, or the prompt echoed first."""
    return features.logprobs or features.echo


def _top_logprobs(features: RequestFeatures | None) -> int:
    return (features.top_logprobs or 0) if features is not None else 0
