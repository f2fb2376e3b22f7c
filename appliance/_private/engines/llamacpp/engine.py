"""The llama.cpp engine (llama-cpp-python), continuously batched (see batching.py).

llama-cpp-python's ctypes calls release the GIL, so decoding on the worker thread leaves
the event loop free. The chat template comes from the GGUF's `tokenizer.chat_template`.

Tools and structured output: the request's tools shape the prompt (through the template
when it takes `tools`, else the generic format, see `structured.prompt_messages`), and its
output plan (a grammar and a reader per choice) is checked before admission, so a schema
outside the supported subset is a 400, never a failed generation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from appliance._private import inference
from appliance._private.engines import structured
from appliance._private.engines.admission import AdmissionQueue
from appliance._private.engines.base import (
    Capabilities,
    EngineContext,
    EngineLoad,
    Finish,
    Generation,
    Prompt,
    RequestFeatures,
    SamplingParams,
    StepStats,
)
from appliance._private.engines.llamacpp.batching import (
    BatchLimits,
    BatchScheduler,
    PoisonFn,
)
from appliance._private.engines.llamacpp.config import MIB, LlamaCppModel
from appliance._private.engines.llamacpp.gpu import accelerator, check_gpu_offload, gpu_kwargs
from appliance._private.errors import (
    ContextLengthExceededError,
    ModelLoadError,
    ModelNotReadyError,
)
from federation import InvalidRequestError

FinishFn = Callable[[Generation, Finish], None]
StepFn = Callable[[StepStats], None]
# The tokenizer/template context; generation runs in the scheduler's own context.
_TOKENIZER_CONTEXT = 64
# Prompts longer than this (characters) are templated and tokenized off the event loop.
_OFFLOAD_CHARS = 16_384
T = TypeVar("T")


class LlamaCppEngine:
    def __init__(
        self,
        config: LlamaCppModel,
        context: EngineContext,
        *,
        poison: PoisonFn | None = None,
    ) -> None:
        if context.path is None:
            raise ModelLoadError(f"`{config.id}` has no `path` (the GGUF file).")
        self._config = config
        self._path: Path = context.path
        self._on_finish = context.on_finish
        self._on_step = context.on_step
        self._poison = poison  # the scheduler's test seam (BatchScheduler.poison)
        self._threads = config.threads or os.cpu_count() or 1
        self._llm: Any = None
        self._embedder: Any = None
        self._formatter: Any = None
        self._template_tools = False  # the chat template renders `tools` itself
        self._eog: frozenset[int] = frozenset()
        self._vocabulary = 0
        self._textless: frozenset[int] = frozenset()
        self._scheduler: BatchScheduler | None = None
        self._embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._embeds = AdmissionQueue(f"{config.id} (embeddings)", 1, config.max_queue)
        # Only internal failures (500): commit the 200 at once, TTFT matters.
        self._capabilities = Capabilities(
            tokenizes_locally=True,
            early_errors=False,
            embeddings=config.embeddings,
            logprobs=True,
            n=True,
            tools=True,
            structured_output=True,
            logit_bias=True,
            echo=True,
            several_prompts=True,
            accelerator=accelerator(config),
        )

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def vocabulary_size(self) -> int:
        """Token ids are 0 to this minus one (`base.Vocabulary`: logit_bias keys)."""
        return self._vocabulary

    def load(self) -> None:
        if not self._path.is_file():
            raise ModelLoadError(
                f"Model file {self._path} for `{self._config.id}` does not exist. Run "
                "`palisade models fetch-default` for the default model, or fix `path` "
                "in the appliance config."
            )
        import llama_cpp  # heavy: imported on load only

        check_gpu_offload(self._config, llama_cpp)
        self._llm = self._open(embedding=False)
        self._formatter = self._chat_formatter()
        self._eog = self._end_of_generation_tokens()
        self._vocabulary = int(self._llm.n_vocab())
        self._textless = self._tokens_without_text()
        if self._config.embeddings:
            self._embedder = self._open(embedding=True)
        config = self._config
        limits = BatchLimits(
            max_sequences=config.max_sequences,
            kv_cache_tokens=config.kv_tokens(),
            step_tokens=config.step_tokens,
            prefill_chunk=config.prefill_chunk,
            cache_type_k=config.cache_type_k,
            cache_type_v=config.cache_type_v,
            max_queue=config.max_queue,
            threads=self._threads,
            prefix_cache_bytes=config.prefix_cache_mib * MIB,
            prefix_cache_block=config.prefix_cache_block,
            shared_cache=config.prefix_cache_sharing == "appliance",
        )
        self._scheduler = BatchScheduler(
            self._llm,
            limits,
            eog=self._eog,
            on_finish=self._on_finish,
            name=config.id,
            observer=self._on_step,
            poison=self._poison,
        )

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        self._embed_pool.shutdown(wait=True, cancel_futures=True)
        for llm in (self._llm, self._embedder):
            if llm is not None:
                llm.close()
        self._llm = self._embedder = None

    def _open(self, *, embedding: bool) -> Any:
        import llama_cpp
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        extra: dict[str, Any] = {"n_ctx": _TOKENIZER_CONTEXT}
        if embedding:
            ctx = self._config.context_length
            extra = {
                "n_ctx": ctx,
                "pooling_type": LLAMA_POOLING_TYPE_MEAN,
                "n_batch": ctx,
                "n_ubatch": ctx,
            }
        try:
            return Llama(
                model_path=str(self._path),
                n_threads=self._threads,
                n_threads_batch=self._threads,
                embedding=embedding,
                verbose=False,
                **gpu_kwargs(self._config, llama_cpp),
                **extra,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {self._path} for `{self._config.id}`: {exc}. "
                "Check that the file is a complete GGUF model."
            ) from exc

    def _chat_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError(
                f"{self._path} has no `tokenizer.chat_template` in its GGUF metadata, so chat "
                "completions cannot be formatted. Use a model converted with its template."
            )
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        self._template_tools = _takes_tools(template)
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos),
            bos_token=self._token_text(bos),
            add_generation_prompt=True,
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llm.detokenize([token], special=True)).decode("utf-8", "replace")

    def _end_of_generation_tokens(self) -> frozenset[int]:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        return frozenset(
            token
            for token in range(self._llm.n_vocab())
            if llama_cpp.llama_vocab_is_eog(vocab, token)
        )

    def _tokens_without_text(self) -> frozenset[int]:
        """Ids that detokenize to nothing: control tokens (<|im_start|>) and a few others."""
        detokenize = self._llm.detokenize
        return frozenset(token for token in range(self._vocabulary) if not detokenize([token]))

    # --- tokenization (event loop thread; llama.cpp's tokenizer only reads the vocab) ---

    def tokenize_chat(
        self, messages: list[dict[str, Any]], extra: dict[str, Any] | None = None
    ) -> list[int]:
        """The templated messages' tokens; `extra` are further template variables (tools)."""
        import jinja2

        try:
            rendered = self._formatter(messages=messages, **(extra or {}))
        except (ValueError, jinja2.TemplateError) as exc:
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {exc}",
                code="invalid_messages",
                param="messages",
            ) from exc
        prompt: str = rendered.prompt
        return list(
            self._llm.tokenize(
                prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
        )

    def tokenize_text(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    async def prepare_chat(
        self, messages: list[dict[str, Any]], features: RequestFeatures | None = None
    ) -> Prompt:
        self._check_choices(features, 1)
        extra: dict[str, Any] = {}
        if features is not None or any(_about_tools(message) for message in messages):
            # A schema or tool definition it cannot enforce is a 400 here, before admission.
            structured.plan_output(features, template_tools=self._template_tools)
            messages, extra = structured.prompt_messages(
                messages, features, template_tools=self._template_tools
            )
        size = sum(len(str(message.get("content") or "")) for message in messages)
        tokens = await _maybe_offload(lambda chat: self.tokenize_chat(chat, extra), messages, size)
        return Prompt(len(tokens), tokens=tokens)

    async def prepare_text(self, source: str | list[int], param: str = "prompt") -> Prompt:
        if isinstance(source, str):
            tokens = await _maybe_offload(self.tokenize_text, source, len(source))
        else:
            # Any id in the vocabulary decodes, control tokens (BOS, EOS) included; one
            # outside it would make llama_decode refuse the whole step.
            inference.check_token_ids(source, param, self._vocabulary)
            tokens = source
        return Prompt(len(tokens), tokens=tokens)

    def detokenize(self, tokens: list[int], param: str = "input") -> str:
        # Outside the vocabulary, llama.cpp's detokenizer aborts the process.
        inference.check_token_ids(tokens, param, self._vocabulary)
        textless = next((i for i, token in enumerate(tokens) if token in self._textless), None)
        if textless is not None:
            token = tokens[textless]
            name = self._token_text(token)
            what = f"the control token {name!r}" if name else "a token"
            raise InvalidRequestError(
                f"`{param}[{textless}]` is {token}, {what} that has no text: embeddings are "
                "computed from the text of the ids given, so send the ids of text tokens "
                "(or the text itself).",
                code="invalid_value",
                param=f"{param}[{textless}]",
            )
        return bytes(self._llm.detokenize(tokens)).decode("utf-8", "replace")

    # --- generation ---------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_done: Callable[[Finish], None] | None = None,
    ) -> Generation:
        if self._scheduler is None:
            raise ModelNotReadyError(
                f"The model `{self._config.id}` is still loading; retry shortly.", retry_after=1
            )
        features = params.features
        self._check_choices(features, 1 + len(prompt.more))
        plan = None
        if features is not None and features.endpoint == "chat":
            plan = structured.plan_output(features, template_tools=self._template_tools)
        generation = Generation(prompt, params, asyncio.get_running_loop(), on_done)
        self._scheduler.submit(generation, plan)
        return generation

    def _check_choices(self, features: RequestFeatures | None, prompts: int) -> None:
        """Every choice of a request decodes at once: at most `max_sequences` in all."""
        n = features.n if features is not None else 1
        limit = self._config.max_sequences
        if n * prompts <= limit:
            return
        what = f"`n` = {n}" if prompts == 1 else f"`n` = {n} for each of {prompts} prompts"
        raise InvalidRequestError(
            f"{what} asks for {n * prompts} choices; `{self._config.id}` decodes at most "
            f"{limit} sequences at once (max_sequences), so ask for at most {limit}.",
            code="invalid_value",
            param="n" if n > 1 else "prompt",
        )

    def load_now(self) -> EngineLoad:
        if self._scheduler is None:
            return EngineLoad(running=0, waiting=0, slots=self._config.max_sequences)
        return self._scheduler.load()

    def metrics_text(self) -> str | None:
        return None  # everything it measures is in the appliance's own registry

    # --- embeddings -----------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings of each text, and the number of tokens read."""
        if self._embedder is None:
            raise InvalidRequestError(
                f"Embeddings are disabled for `{self._config.id}` (embeddings = false in the "
                "appliance config).",
                code="embeddings_disabled",
                param="model",
            )
        for index, text in enumerate(texts):
            count = len(self._embedder.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if count == 0:  # llama.cpp cannot pool nothing
                raise InvalidRequestError(
                    f"Input {index} has no tokens; send some text.",
                    code="invalid_value",
                    param="input",
                )
            if count > self._config.context_length:
                raise ContextLengthExceededError(
                    f"Input {index} has {count} tokens; `{self._config.id}` embeds at most "
                    f"{self._config.context_length}. Shorten or split the input.",
                    param="input",
                )
        self._embeds.admit()
        async with self._embeds.slot():  # one at a time, on the embedding context's thread
            loop = asyncio.get_running_loop()
            vectors, total = await loop.run_in_executor(self._embed_pool, self._embed_sync, texts)
        return vectors, total

    def _embed_sync(self, texts: list[str]) -> tuple[list[list[float]], int]:
        vectors, total = self._embedder.embed(texts, normalize=True, return_count=True)
        return [list(map(float, vector)) for vector in vectors], int(total)


def _takes_tools(template: str) -> bool:
    """Whether a Jinja chat template reads a `tools` variable (renders tool definitions)."""
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(
            jinja2.Environment(autoescape=True).parse(template)
        )
    except jinja2.TemplateError:
        return False


def _about_tools(message: dict[str, Any]) -> bool:
    return message.get("role") == "tool" or bool(message.get("tool_calls"))


async def _maybe_offload(function: Callable[[T], list[int]], argument: T, size: int) -> list[int]:
    if size < _OFFLOAD_CHARS:
        return function(argument)
    return await asyncio.to_thread(function, argument)
