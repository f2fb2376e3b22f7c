"""llama.cpp's sequence state, cut per token and put back, on the default GGUF: a prompt's KV
saved from one stream, split into blocks and a prefix of it restored into another stream
(ending at a block boundary and inside a block) continues greedily exactly as the original;
layouts that cannot be cut per token are refused when the model loads."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import llama_cpp as lib
import numpy as np
import pytest

from appliance._private.engines.llamacpp.kv_state import (
    KvLayout,
    KvRows,
    KvStateError,
    Scratch,
    probe_layout,
    read_state,
    write_state,
)
from appliance._private.errors import ModelLoadError
from tests.support import default_model_path

STREAMS = 3
CELLS_PER_STREAM = 256
BLOCK = 8
CONTINUATION = 12
SCRATCH = Scratch()  # reused (dirty) by every restore below, as the engine reuses one
PROMPT = (
    "<|im_start|>system\nYou are a careful assistant who answers in one short paragraph."
    "<|im_end|>\n<|im_start|>user\nWhy do lighthouses have different light patterns, and "
    "how do sailors tell them apart at night?<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass
class Context:
    """A llama.cpp context with one KV stream per sequence, set up as the batching engine
    sets up its own (BatchScheduler._context)."""

    lib: Any
    llm: Any
    ctx: Any
    batch: Any
    n_vocab: int

    def decode(self, seq_id: int, tokens: list[int], start: int) -> int:
        """Read `tokens` at positions start.. into `seq_id`; the greedy next token."""
        batch = self.batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert self.lib.llama_decode(self.ctx, batch) == 0
        logits = self.lib.llama_get_logits_ith(self.ctx, len(tokens) - 1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def continue_greedily(self, seq_id: int, first: int, position: int) -> list[int]:
        out = [first]
        while len(out) < CONTINUATION:
            out.append(self.decode(seq_id, [out[-1]], position + len(out) - 1))
        return out

    def clear(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq_id, -1, -1)


def open_context(llm: Any, *, flash_attention: bool = True) -> Any:
    params = lib.llama_context_default_params()
    params.n_ctx = STREAMS * CELLS_PER_STREAM
    params.n_batch = params.n_ubatch = CELLS_PER_STREAM
    params.n_seq_max = STREAMS
    params.n_threads = params.n_threads_batch = 1
    params.kv_unified = False
    params.type_k = lib.GGML_TYPE_Q8_0 if flash_attention else lib.GGML_TYPE_F16
    params.type_v = lib.GGML_TYPE_F16
    params.flash_attn_type = (
        lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.no_perf = True
    ctx = lib.llama_init_from_model(llm.model, params)
    assert ctx
    return ctx


@pytest.fixture(scope="module")
def model() -> Iterator[Context]:
    llm = lib.Llama(model_path=str(default_model_path()), n_ctx=64, n_threads=1, verbose=False)
    ctx = open_context(llm)
    batch = lib.llama_batch_init(CELLS_PER_STREAM, 0, 1)
    yield Context(lib, llm, ctx, batch, int(llm.n_vocab()))
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    llm.close()


@pytest.fixture(scope="module")
def layout(model: Context) -> KvLayout:
    return probe_layout(model.lib, model.ctx, 2, model.llm.token_bos(), "smollm2")


@pytest.fixture(scope="module")
def prompt(model: Context) -> list[int]:
    tokens: list[int] = model.llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    assert len(tokens) > 4 * BLOCK
    return tokens


@pytest.fixture(scope="module")
def original(model: Context, prompt: list[int]) -> tuple[memoryview, list[int]]:
    """Stream 0 after reading the prompt (its saved state), and its greedy continuation."""
    model.clear(0)
    first = model.decode(0, prompt, 0)
    state = read_state(model.lib, model.ctx, 0)
    return state, model.continue_greedily(0, first, len(prompt))


def test_the_layout_of_the_default_model(model: Context, layout: KvLayout) -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads x 64; keys q8_0 (34 bytes per 32), values f16.
    assert (layout.n_stream, layout.n_layer) == (STREAMS, 30)
    assert (layout.k_row_bytes, layout.v_row_bytes) == (192 // 32 * 34, 192 * 2)
    assert layout.token_bytes == 17_640
    memory = model.lib.llama_get_memory(model.ctx)
    assert model.lib.llama_memory_seq_pos_max(memory, 2) == -1  # the probe emptied its slot


# The longest first: the later, shorter states are read into the scratch it grew.
@pytest.mark.parametrize("reused", [-1, 2 * BLOCK, 2 * BLOCK + 5], ids=["all", "block", "mid"])
def test_a_restored_prefix_continues_as_the_original(
    model: Context,
    layout: KvLayout,
    prompt: list[int],
    original: tuple[memoryview, list[int]],
    reused: int,
) -> None:
    state, expected = original
    reused %= len(prompt)  # -1: every prompt token but the last, which is read for logits
    rows = layout.view(state)
    assert rows.tokens == len(prompt)
    blocks = [rows.take(a, min(a + BLOCK, len(prompt))) for a in range(0, len(prompt), BLOCK)]

    write_state(model.lib, model.ctx, 1, layout.assemble(blocks, reused, SCRATCH))
    restored = layout.view(read_state(model.lib, model.ctx, 1, SCRATCH))
    assert restored.tokens == reused
    assert np.array_equal(restored.k, rows.k[:, :reused])
    assert np.array_equal(restored.v, rows.v[:, :reused])

    first = model.decode(1, prompt[reused:], reused)
    assert model.continue_greedily(1, first, len(prompt)) == expected
    model.clear(1)


def test_split_copies_the_rows_of_a_range(
    layout: KvLayout, original: tuple[memoryview, list[int]]
) -> None:
    state, _ = original
    rows = layout.split(state, BLOCK, 2 * BLOCK)
    assert rows.tokens == BLOCK
    assert rows.nbytes == BLOCK * layout.token_bytes
    assert rows.k.base is None  # its own memory: the state may go
    assert np.array_equal(rows.k, layout.view(state).k[:, BLOCK : 2 * BLOCK])
    with pytest.raises(ValueError, match="not within"):
        layout.view(state).take(0, 10_000)


def test_assemble_refuses_more_tokens_than_the_rows(layout: KvLayout) -> None:
    empty = np.zeros((layout.n_layer, 2, layout.k_row_bytes), np.uint8)
    rows = KvRows(empty, np.zeros((layout.n_layer, 2, layout.v_row_bytes), np.uint8))
    with pytest.raises(ValueError, match="not within"):
        layout.assemble([rows], 3)


def test_cells_out_of_position_order_are_read_by_position(
    layout: KvLayout, original: tuple[memoryview, list[int]]
) -> None:
    state, _ = original
    expected = layout.view(state)
    swapped = bytearray(state)
    rows = layout.view(swapped)  # views into `swapped`: swap cells 0 and 1, rows and all
    rows.k[:, [0, 1]] = rows.k[:, [1, 0]]
    rows.v[:, [0, 1]] = rows.v[:, [1, 0]]
    struct.pack_into("<i", swapped, 16, 1)  # the first cell's position
    struct.pack_into("<i", swapped, 28, 0)  # the second's

    reordered = layout.view(swapped)
    assert np.array_equal(reordered.k, expected.k)
    assert np.array_equal(reordered.v, expected.v)
    assert not np.array_equal(rows.k, expected.k)


def test_a_state_that_is_not_one_stream_from_position_0_is_refused(
    layout: KvLayout, original: tuple[memoryview, list[int]]
) -> None:
    state, _ = original
    shuffled = bytearray(state)
    first_cell = 16  # magic, seq id, stream count, stream 0's cell count; then its cells
    struct.pack_into("<i", shuffled, first_cell, 5)
    with pytest.raises(KvStateError, match=r"each of positions 0\.\.n-1 once"):
        layout.view(shuffled)
    with pytest.raises(KvStateError, match="bytes"):
        layout.view(bytes(state) + b"\0\0\0\0")  # what another cache (sliding window) would add
    with pytest.raises(KvStateError, match=r"llama\.cpp's"):
        layout.view(b"\0" * 64)


def test_a_layout_that_cannot_be_cut_is_refused_at_load(model: Context) -> None:
    ctx = open_context(model.llm, flash_attention=False)  # values stored transposed
    try:
        with pytest.raises(ModelLoadError, match="transposed") as refused:
            probe_layout(model.lib, ctx, 0, model.llm.token_bos(), "smollm2")
        assert "prefix_cache_mib = 0" in str(refused.value)
    finally:
        model.lib.llama_free(ctx)
    with pytest.raises(ModelLoadError, match="holds no cells"):
        KvLayout.read(struct.pack("<IiIIII", 0xAF143CD8, 0, 3, 0, 0, 0))
