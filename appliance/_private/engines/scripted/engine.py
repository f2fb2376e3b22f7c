"""The scripted engine: a real engine behind the seam, with output decided by its config.

Generations are asyncio tasks on the event loop, admitted by the shared `AdmissionQueue`
(`slots` at once, `max_queue` waiting) and paced by `ttft_ms`/`token_ms`: what the HTTP
layer, the ledger, metrics and the conformance suite see is exactly what they see from a
model, without loading one. Plain text goes out through `Generation.emit`; other choices,
tool calls, log probabilities and per-choice finish reasons through `emit_delta`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import zlib
from collections.abc import Callable
from typing import Any

from appliance._private import inference
from appliance._private.engines.admission import AdmissionQueue
from appliance._private.engines.base import (
    Capabilities,
    ChoiceDelta,
    EngineContext,
    EngineLoad,
    Finish,
    FinishReason,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
    engine_failure,
)
from appliance._private.engines.scripted import script
from appliance._private.engines.scripted.config import ScriptedModel
from appliance._private.errors import ModelNotReadyError, UnsupportedParameterError
from federation import APIError

log = logging.getLogger("palisade.appliance.scripted")
_DIMENSIONS = 8  # of the scripted embeddings


class ScriptedEngine:
    def __init__(self, config: ScriptedModel, context: EngineContext) -> None:
        self._config = config
        self._on_finish = context.on_finish
        self._admission = AdmissionQueue(config.id, config.slots, config.max_queue)
        self._replies = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = False
        self._capabilities = Capabilities(
            tokenizes_locally=False,
            early_errors=True,  # fail_after_tokens = 0 is an HTTP error, not a broken stream
            embeddings=config.embeddings,
            logprobs=config.logprobs,
            n=config.n,
            tools=config.tools,
            structured_output=config.structured_output,
            echo=config.echo,
            several_prompts=config.several_prompts,
        )

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def load(self) -> None:
        self._ready = True

    def close(self) -> None:
        """Cancel what is still running (each generation then ends as cancelled)."""
        self._ready = False
        for task in list(self._tasks):
            with contextlib.suppress(RuntimeError):  # its loop has already closed
                task.get_loop().call_soon_threadsafe(task.cancel)

    def metrics_text(self) -> str | None:
        return None

    # --- prompts: words are tokens ----------------------------------------------------------

    async def prepare_chat(
        self, messages: list[dict[str, Any]], features: RequestFeatures | None = None
    ) -> Prompt:
        del features  # the script decides the answer
        return Prompt(max(1, script.words(messages)), messages=messages)

    async def prepare_text(self, source: str | list[int], param: str = "prompt") -> Prompt:
        if isinstance(source, str):
            return Prompt(max(1, script.words(source)), text=source)
        inference.check_token_ids(source, param, None)
        return Prompt(len(source), text=source)

    def detokenize(self, tokens: list[int], param: str = "input") -> str:
        del tokens
        raise UnsupportedParameterError(
            param, f"`{self._config.id}` has no tokenizer to turn token ids into text."
        )

    # --- generation -----------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_done: Callable[[Finish], None] | None = None,
    ) -> Generation:
        if not self._ready:
            raise ModelNotReadyError(
                f"The model `{self._config.id}` is not loaded; retry shortly.", retry_after=1
            )
        self._admission.admit()
        loop = asyncio.get_running_loop()
        generation = Generation(prompt, params, loop, on_done)
        task = loop.create_task(self._run(generation, next(self._replies)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        generation.on_cancel(lambda _: _cancel(task))
        return generation

    def load_now(self) -> EngineLoad:
        return self._admission.load()

    async def _run(self, generation: Generation, turn: int) -> None:
        """One generation, start to end; always closes it and reports the finish."""
        player = _Player(generation, self._config)
        try:
            async with self._admission.slot():
                generation.mark_started()
                player.choices = self._choices(generation, turn)
                await player.play()
            finish = player.finish()
        except asyncio.CancelledError:
            finish = player.finish("cancelled")
        except APIError as exc:
            finish = player.finish("error", exc)
        except Exception as exc:  # a script it cannot follow ends it; never a hung stream
            log.exception("the scripted engine failed on model %s", self._config.id)
            finish = player.finish("error", engine_failure(type(exc).__name__))
        generation.close(finish)
        self._on_finish(generation, finish)

    def _choices(self, generation: Generation, turn: int) -> list[script.ChoiceScript]:
        """n choices for each prompt: choice `p * n + i` is the i-th of prompt p."""
        params = generation.params
        features = params.features or RequestFeatures()
        choices = []
        prompts = (generation.prompt, *generation.prompt.more)
        for index in range(features.n * len(prompts)):
            prompt = prompts[index // features.n]
            reply = self._reply(prompt, turn + index)
            call = None
            if not _answers_a_tool(prompt):
                call_id = f"call_{self._config.id}_{turn}_{index}"
                call = script.tool_call(features, call_id, params.max_tokens)
            text = script.json_reply(features.response_format, reply) or reply
            choice = call or script.text_choice(text, params)
            if features.echo:
                echo = script.echo_of(None, prompt.text)
                choice = dataclasses.replace(choice, echo=echo)
            choices.append(choice)
        return choices

    def _reply(self, prompt: Prompt, turn: int) -> str:
        replies = self._config.replies
        if replies:
            return replies[turn % len(replies)]
        return script.echo_of(prompt.messages, prompt.text)

    # --- embeddings -------------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        if not self._config.embeddings:
            raise UnsupportedParameterError(
                "model", f"`{self._config.id}` serves no embeddings (embeddings = false)."
            )
        self._admission.admit()
        async with self._admission.slot():
            vectors = [_vector(text) for text in texts]
        return vectors, sum(max(1, script.words(text)) for text in texts)


class _Player:
    """Paces the choices' tokens into a generation: all choices step together."""

    __slots__ = ("_chat", "_config", "_generation", "_offsets", "choices", "produced")

    def __init__(self, generation: Generation, config: ScriptedModel) -> None:
        self._generation = generation
        self._config = config
        self._chat = generation.prompt.messages is not None
        self.choices: list[script.ChoiceScript] = []
        self._offsets: list[int] = []  # each choice's text so far (completions' text_offset)
        self.produced = 0

    @property
    def _plain(self) -> bool:
        """One text choice without log probabilities: plain `emit`, the hot path."""
        features = self._generation.params.features
        rich = features is not None and features.logprobs
        return len(self.choices) == 1 and self.choices[0].call is None and not rich

    async def play(self) -> None:
        await asyncio.sleep(self._config.ttft_ms / 1000)
        self._offsets = [len(choice.echo) for choice in self.choices]
        for index, choice in enumerate(self.choices):
            if choice.echo:
                self._echo(index, choice.echo)
        longest = max((len(choice.pieces) for choice in self.choices), default=0)
        for step in range(longest):
            if step:
                await asyncio.sleep(self._config.token_ms / 1000)
            for index, choice in enumerate(self.choices):
                if step < len(choice.pieces):
                    self._fail_if_scripted()
                    self.produced += 1
                    self._emit(index, choice, step)
        self._fail_if_scripted()
        for index, choice in enumerate(self.choices):
            if index or choice.end == "tool_calls":  # choice 0's stop or length: the Finish
                self._generation.emit_delta(
                    ChoiceDelta(index, finish_reason=choice.end), tokens=self.produced
                )

    def _fail_if_scripted(self) -> None:
        limit = self._config.fail_after_tokens
        if limit is not None and self.produced >= limit:
            raise APIError(
                f"The engine failed while generating: the scripted engine `{self._config.id}` "
                f"fails after {limit} tokens (fail_after_tokens).",
                code=self._config.fail_code,
            )

    def _echo(self, index: int, echo: str) -> None:
        """The prompt a choice starts with (with its log probabilities if asked for)."""
        if self._plain:
            self._generation.emit(echo, tokens=self.produced)
            return
        features = self._generation.params.features
        logprobs = None
        if features is not None and features.logprobs:
            logprobs = script.echo_logprobs(echo, features.top_logprobs or 0)
        delta = ChoiceDelta(index, text=echo, logprobs=logprobs)
        self._generation.emit_delta(delta, tokens=self.produced)

    def _emit(self, index: int, choice: script.ChoiceScript, step: int) -> None:
        piece = choice.pieces[step]
        if self._plain:
            self._generation.emit(piece, tokens=self.produced)
            return
        if choice.call is not None:
            call_id, name = choice.call
            fragment: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
            if step == 0:
                fragment |= {"id": call_id, "type": "function"}
                fragment["function"] = {"name": name, "arguments": piece}
            delta = ChoiceDelta(index, tool_calls=[fragment])
        else:
            delta = ChoiceDelta(index, text=piece, logprobs=self._logprobs(index, piece, step))
            self._offsets[index] += len(piece)
        self._generation.emit_delta(delta, tokens=self.produced)

    def _logprobs(self, index: int, piece: str, step: int) -> dict[str, Any] | None:
        features = self._generation.params.features
        if features is None or not features.logprobs:
            return None
        top = features.top_logprobs or 0
        return script.logprobs_of(piece, step, self._offsets[index], top, chat=self._chat)

    def finish(self, reason: str | None = None, failure: APIError | None = None) -> Finish:
        prompt = self._generation.prompt.total_size
        cached = min(self._config.cached_tokens, prompt)
        if reason == "cancelled":
            return Finish("cancelled", prompt, self.produced, cached_tokens=cached)
        if failure is not None:
            return Finish("error", prompt, self.produced, failure, cached)
        first = self.choices[0].end if self.choices else "stop"
        ended: FinishReason = "length" if first == "length" else "stop"
        return Finish(ended, prompt, self.produced, cached_tokens=cached)


def _answers_a_tool(prompt: Prompt) -> bool:
    """The conversation ends with a tool's result: answer it in text, call nothing."""
    messages = prompt.messages or [{}]
    return bool(messages[-1].get("role") == "tool")


def _vector(text: str) -> list[float]:
    seed = zlib.crc32(text.encode())
    raw = [((seed >> (index * 4)) & 0xFF) / 255.0 - 0.5 for index in range(_DIMENSIONS)]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def _cancel(task: asyncio.Task[None]) -> None:
    # Cancelled before its first step, `_run` would never close the generation: the
    # cancel goes after that step, which was scheduled when the task was created.
    task.get_loop().call_soon(task.cancel)
