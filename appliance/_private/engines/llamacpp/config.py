"""`engine = "llamacpp"` (the default): a GGUF file run in-process by llama-cpp-python."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from appliance._private.engines.config import ModelConfigBase
from federation import ConfigError

KvCacheType = Literal["q8_0", "f16"]
SplitMode = Literal["none", "layer", "row"]
# Who shares cached prompt prefixes: each org its own (a shared cache would let one tenant
# time another's prompts), or the whole appliance (opt-in).
CacheSharing = Literal["org", "appliance"]
MIB = 1 << 20
# With f16 keys and values llama.cpp's CPU attention changes kernels at 64 queries of a stream.
F16_MAX_PREFILL_CHUNK = 63


class LlamaCppModel(ModelConfigBase, tag="llamacpp", forbid_unknown_fields=True, kw_only=True):
    """A GGUF at `path`, continuously batched (`max_sequences` decoded together in one
    llama.cpp batch, sharing `kv_cache_tokens` KV cells, default context_length each, with
    keys and values of `cache_type_k`/`cache_type_v`; `step_tokens` per step and at most
    `prefill_chunk` prompt tokens of one sequence per step, but a rest that fits a step
    at once). Finished sequences' KV is kept
    for prompt-prefix reuse in their slots and in a host-RAM pool of `prefix_cache_mib`,
    by blocks of `prefix_cache_block` tokens, shared per `prefix_cache_sharing`."""

    threads: Annotated[int, Meta(ge=1, le=512)] | None = None
    embeddings: bool = True
    max_sequences: Annotated[int, Meta(ge=1, le=256)] = 16
    kv_cache_tokens: Annotated[int, Meta(ge=64, le=16_777_216)] | None = None
    cache_type_k: KvCacheType = "q8_0"
    cache_type_v: KvCacheType = "f16"
    step_tokens: Annotated[int, Meta(ge=16, le=65_536)] = 256
    prefill_chunk: Annotated[int, Meta(ge=1, le=8192)] = 32
    # GPU offload (a CUDA/Metal/Vulkan build of llama.cpp): layers on the GPU (-1: all),
    # the main GPU, and how layers or rows are split across several. Off by default.
    n_gpu_layers: Annotated[int, Meta(ge=-1, le=100_000)] = 0
    main_gpu: Annotated[int, Meta(ge=0, le=63)] = 0
    split_mode: SplitMode = "layer"
    # The host-RAM prompt cache (0: off; the KV kept in slots still serves reuse). A hit
    # from it misses the stream's last partial block: small blocks lose little, and cost
    # only a little bookkeeping per block.
    prefix_cache_mib: Annotated[int, Meta(ge=0, le=1_048_576)] = 2048
    prefix_cache_block: Annotated[int, Meta(ge=16, le=1024)] = 16
    prefix_cache_sharing: CacheSharing = "org"

    def kv_tokens(self) -> int:
        return self.kv_cache_tokens or self.context_length * self.max_sequences

    @property
    def all_f16_cache(self) -> bool:
        return self.cache_type_k == self.cache_type_v == "f16"

    def check(self, where: str, source: str) -> None:
        self.requires_path(where, source, "the GGUF file")
        each = self.kv_tokens() // self.max_sequences
        if each < self.context_length:
            raise ConfigError(
                f"{source}: `{where}.kv_cache_tokens` = {self.kv_tokens()} gives each of "
                f"its {self.max_sequences} sequences {each} KV cells, fewer than "
                f"context_length = {self.context_length}; raise kv_cache_tokens, or lower "
                "max_sequences or context_length."
            )
        if self.all_f16_cache and self.prefill_chunk > F16_MAX_PREFILL_CHUNK:
            raise ConfigError(
                f"{source}: `{where}.prefill_chunk` = {self.prefill_chunk} is too large "
                'for cache_type_k = cache_type_v = "f16": llama.cpp computes 64 or more '
                "prompt tokens of one sequence with another kernel, and answers would "
                "depend on what else runs. Set prefill_chunk to at most "
                f'{F16_MAX_PREFILL_CHUNK}, or cache_type_k = "q8_0".'
            )
