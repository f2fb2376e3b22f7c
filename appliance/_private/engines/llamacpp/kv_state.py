"""llama.cpp's sequence state format: the KV rows of one stream, split per token and put back.

`llama_state_seq_get_data_ext(ctx, buf, size, seq_id, 0)` writes, for the llama.cpp vendored
in llama-cpp-python 0.3.36 (`llama_context::state_seq_get_data` and
`llama_kv_cache::state_write`):

    u32 magic (0xaf143cd8), i32 seq_id, u32 n_stream, then per stream:
      u32 cell_count, and when non-zero:
        per cell: i32 pos, u32 n_seq_id (1), i32 seq_id
        u32 v_trans, u32 n_layer
        per layer: i32 k_type, u64 k_row_bytes, cell_count x k_row_bytes
        per layer: i32 v_type, u64 v_row_bytes, cell_count x v_row_bytes   (v_trans = 0)

With `kv_unified = false` a sequence lives in one stream, so exactly one stream is non-empty.
A KV row is one token's keys (or values) in one layer, so the rows of any run of tokens can
be cut out of a saved stream and put back at the same positions: `KvLayout.view` reads a
saved stream as arrays without copying, `KvRows.take` copies the rows of some tokens, and
`KvLayout.assemble` builds from such rows the state of a stream holding positions 0..n-1 in
cell order (as reading the prompt afresh leaves it), which `llama_state_seq_set_data_ext`
restores into any sequence id (it empties the target sequence first and ignores the seq ids
written in the state).

Layouts that cannot be cut per token are refused when the model loads (`KvLayout.read`):
transposed values (no flash attention), cells carrying extra data (M-RoPE models), several
KV caches in one state (sliding-window or recurrent models), per-layer row sizes that differ.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance._private.errors import ModelLoadError

STATE_MAGIC = 0xAF143CD8
_HEAD = struct.Struct("<IiI")  # magic, seq_id, n_stream
_COUNT = struct.Struct("<I")  # a stream's cell_count
_DATA_HEAD = struct.Struct("<II")  # v_trans, n_layer
_ROW_HEAD = struct.Struct("<iQ")  # a layer's type and row bytes
_CELL_FIELDS = 3  # pos, n_seq_id, seq_id: i32 each, once per cell

Bytes = npt.NDArray[np.uint8]
Buffer = bytes | bytearray | memoryview


class KvStateError(RuntimeError):
    """A saved or assembled sequence state does not have the layout this engine expects, or
    llama.cpp refused to read or write it. The engine reads the prompt instead."""


@dataclass(frozen=True, slots=True, eq=False)
class KvRows:
    """The K and V rows of some consecutive tokens: `k` and `v` shaped
    (n_layer, tokens, row_bytes), uint8."""

    k: Bytes
    v: Bytes

    @property
    def tokens(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def take(self, start: int, end: int) -> KvRows:
        """The rows of tokens [start, end), in arrays of their own (not views of a state)."""
        if not 0 <= start < end <= self.tokens:
            raise ValueError(f"rows [{start}, {end}) are not within {self.tokens} tokens")
        return KvRows(self.k[:, start:end].copy(), self.v[:, start:end].copy())


class Scratch:
    """One buffer reused from save to save (or restore to restore): a state in fresh memory
    costs its page faults every time (about a quarter of a save). What is read or assembled
    into it is valid until its next use."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def take(self, size: int) -> bytearray:
        if len(self._buffer) < size:
            self._buffer = bytearray(size)  # replaced, not resized: old views stay valid
        return self._buffer


@dataclass(frozen=True, slots=True)
class _Stream:
    """Where the one non-empty stream of a state is."""

    cells: int
    meta: int  # offset of its first cell
    keys: int  # offset of its first layer's K header


@dataclass(frozen=True, slots=True)
class KvLayout:
    """The shape of this context's sequence states, read once from a real one."""

    n_stream: int
    n_layer: int
    k_type: int
    k_row_bytes: int
    v_type: int
    v_row_bytes: int

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token (every layer's K and V row)."""
        return self.n_layer * (self.k_row_bytes + self.v_row_bytes)

    @classmethod
    def read(cls, state: Buffer, model: str = "this model") -> KvLayout:
        """The layout of `state` (a saved non-empty sequence); `ModelLoadError` when it
        cannot be cut per token."""
        try:
            return cls._parse(state)
        except KvStateError as exc:
            raise ModelLoadError(
                f"The prompt cache cannot store the KV cache of `{model}`: {exc}. Set "
                "prefix_cache_mib = 0 for this model to serve it without the host cache."
            ) from exc

    @classmethod
    def _parse(cls, state: Buffer) -> KvLayout:
        n_stream, stream = _find_stream(state)
        v_trans, n_layer = _unpack(_DATA_HEAD, state, stream.keys - _DATA_HEAD.size)
        if v_trans not in (0, 1) or not 0 < n_layer < 100_000:
            raise KvStateError("its cells carry data this engine does not know (M-RoPE?)")
        if v_trans:
            raise KvStateError("its values are stored transposed (flash attention is off)")
        k_type, k_row = _unpack(_ROW_HEAD, state, stream.keys)
        v_start = stream.keys + n_layer * (_ROW_HEAD.size + stream.cells * k_row)
        v_type, v_row = _unpack(_ROW_HEAD, state, v_start)
        layout = cls(n_stream, n_layer, k_type, k_row, v_type, v_row)
        layout._view(state, stream)  # checks every layer's header and the total size
        return layout

    def view(self, state: Buffer) -> KvRows:
        """The rows of every token of a saved stream in position order, as views of `state`
        (no copy, unless its cells are out of order). Its cells must hold each of positions
        0..n-1 once, as a stream filled by decoding from 0 does."""
        n_stream, stream = _find_stream(state)
        if n_stream != self.n_stream:
            raise KvStateError(f"the state has {n_stream} streams, not {self.n_stream}")
        return self._view(state, stream)

    def split(self, state: Buffer, start: int, end: int) -> KvRows:
        """The rows of tokens [start, end) of a saved stream, copied."""
        return self.view(state).take(start, end)

    def assemble(
        self, blocks: Sequence[KvRows], n_tokens: int, scratch: Scratch | None = None
    ) -> memoryview:
        """The state of one stream holding positions 0..n_tokens-1: the first `n_tokens`
        rows of `blocks` in order, in `scratch` if given (valid until its next use).
        `llama_state_seq_set_data_ext` takes it for any seq id."""
        if not 0 < n_tokens <= sum(block.tokens for block in blocks):
            raise ValueError(f"{n_tokens} tokens are not within the rows given")
        stream = self._stream_at(n_tokens)
        size = self._state_size(n_tokens)
        state = memoryview(scratch.take(size) if scratch is not None else bytearray(size))[:size]
        _HEAD.pack_into(state, 0, STATE_MAGIC, 0, self.n_stream)
        _COUNT.pack_into(state, stream.meta - _COUNT.size, n_tokens)
        cells = _array(state, np.int32, stream.meta, n_tokens * _CELL_FIELDS)
        cells = cells.reshape(n_tokens, _CELL_FIELDS)
        cells[:, 0] = np.arange(n_tokens, dtype=np.int32)
        cells[:, 1] = 1
        cells[:, 2] = 0
        _DATA_HEAD.pack_into(state, stream.keys - _DATA_HEAD.size, 0, self.n_layer)
        k, v = self._sections(state, stream, write_headers=True)
        _fill(k, [block.k for block in blocks])
        _fill(v, [block.v for block in blocks])
        empty_streams = (self.n_stream - 1) * _COUNT.size
        state[size - empty_streams :] = bytes(empty_streams)
        return state

    def _stream_at(self, n_tokens: int) -> _Stream:
        """Where `assemble` puts a stream of `n_tokens`: first (any stream restores into the
        target sequence's own)."""
        meta = _HEAD.size + _COUNT.size
        keys = meta + n_tokens * _CELL_FIELDS * 4 + _DATA_HEAD.size
        return _Stream(n_tokens, meta, keys)

    def _state_size(self, n_tokens: int) -> int:
        stream = self._stream_at(n_tokens)
        rows = self.n_layer * (
            2 * _ROW_HEAD.size + n_tokens * (self.k_row_bytes + self.v_row_bytes)
        )
        return stream.keys + rows + (self.n_stream - 1) * _COUNT.size

    def _view(self, state: Buffer, stream: _Stream) -> KvRows:
        cells = stream.cells
        expected = self._stream_end(stream) + self._trailing_streams(stream)
        if len(state) != expected:
            raise KvStateError(
                f"the state is {len(state)} bytes, not the {expected} of {cells} cells of "
                f"{self.n_layer} layers (a cache of another kind follows, or rows differ in size)"
            )
        meta = _array(state, np.int32, stream.meta, cells * _CELL_FIELDS)
        meta = meta.reshape(cells, _CELL_FIELDS)
        positions = meta[:, 0]
        if not np.all(meta[:, 1] == 1):
            raise KvStateError("the stream's cells belong to several sequences")
        k, v = self._sections(state, stream, write_headers=False)
        if np.array_equal(positions, np.arange(cells)):
            return KvRows(k, v)
        # Cells out of position order (the stream wrapped around its ring): rows by position.
        order = np.argsort(positions, kind="stable")
        if not np.array_equal(positions[order], np.arange(cells)):
            raise KvStateError("the stream's cells do not hold each of positions 0..n-1 once")
        return KvRows(k[:, order], v[:, order])

    def _stream_end(self, stream: _Stream) -> int:
        rows = self.k_row_bytes + self.v_row_bytes
        return stream.keys + self.n_layer * (2 * _ROW_HEAD.size + stream.cells * rows)

    def _trailing_streams(self, stream: _Stream) -> int:
        """The bytes of the empty streams after the non-empty one (a zero count each)."""
        before = (stream.meta - _HEAD.size - _COUNT.size) // _COUNT.size
        return (self.n_stream - 1 - before) * _COUNT.size

    def _sections(
        self, state: Buffer, stream: _Stream, *, write_headers: bool
    ) -> tuple[Bytes, Bytes]:
        """The K and V rows of `stream` in `state` as (n_layer, cells, row_bytes) views,
        after checking (or, to assemble, writing) every layer's row header."""
        k_at = stream.keys
        v_at = k_at + self.n_layer * (_ROW_HEAD.size + stream.cells * self.k_row_bytes)
        k_rows = (self.k_type, self.k_row_bytes)
        v_rows = (self.v_type, self.v_row_bytes)
        k = self._section(state, k_at, stream.cells, k_rows, write_headers=write_headers)
        v = self._section(state, v_at, stream.cells, v_rows, write_headers=write_headers)
        return k, v

    def _section(
        self, state: Buffer, at: int, cells: int, rows: tuple[int, int], *, write_headers: bool
    ) -> Bytes:
        """One of K or V: per layer a (type, row bytes) header, then `cells` rows."""
        row_bytes = rows[1]
        layer = _ROW_HEAD.size + cells * row_bytes
        section: Bytes = _array(state, np.uint8, at, self.n_layer * layer)
        section = section.reshape(self.n_layer, layer)
        headers = section[:, : _ROW_HEAD.size]
        header = np.frombuffer(_ROW_HEAD.pack(*rows), dtype=np.uint8)
        if write_headers:
            headers[:] = header
        elif not (headers == header).all():
            raise KvStateError("its layers do not all have the same row type and size")
        return section[:, _ROW_HEAD.size :].reshape(self.n_layer, cells, row_bytes)


def _find_stream(state: Buffer) -> tuple[int, _Stream]:
    """The stream count and the one non-empty stream of a saved sequence."""
    magic, _seq_id, n_stream = _unpack(_HEAD, state, 0)
    if magic != STATE_MAGIC:
        raise KvStateError(f"the state starts with {magic:#x}, not llama.cpp's {STATE_MAGIC:#x}")
    at = _HEAD.size
    for _ in range(n_stream):
        (cells,) = _unpack(_COUNT, state, at)
        at += _COUNT.size
        if cells:
            keys = at + cells * _CELL_FIELDS * 4 + _DATA_HEAD.size
            return n_stream, _Stream(cells, at, keys)
    raise KvStateError("the sequence holds no cells")


def _unpack(layout: struct.Struct, state: Buffer, at: int) -> tuple[Any, ...]:
    if at < 0 or at + layout.size > len(state):
        raise KvStateError(f"the state ends at {len(state)} bytes, before offset {at}")
    return layout.unpack_from(state, at)


def _array(state: Buffer, dtype: type[np.generic], at: int, count: int) -> Any:
    return np.frombuffer(state, dtype=dtype, count=count, offset=at)


def _fill(target: Bytes, sources: list[Bytes]) -> None:
    """Copy the first target.shape[1] token rows of `sources`, in order, into `target`."""
    start, want = 0, target.shape[1]
    for rows in sources:
        if start == want:
            break
        take = min(rows.shape[1], want - start)
        target[:, start : start + take] = rows[:, :take]
        start += take


# --- llama.cpp calls ---------------------------------------------------------------------


def read_state(lib: Any, ctx: Any, seq_id: int, scratch: Scratch | None = None) -> memoryview:
    """The saved state of sequence `seq_id` (one stream: its KV cells), in `scratch` if
    given (valid until its next use), else in memory of its own."""
    size = int(lib.llama_state_seq_get_size_ext(ctx, seq_id, 0))
    buffer = scratch.take(size) if scratch is not None else bytearray(size)
    written = lib.llama_state_seq_get_data_ext(ctx, _pointer(buffer, size), size, seq_id, 0)
    if size == 0 or written != size:
        raise KvStateError(f"llama.cpp saved {written} of {size} bytes of sequence {seq_id}")
    return memoryview(buffer)[:size]


def write_state(lib: Any, ctx: Any, seq_id: int, state: bytearray | memoryview) -> None:
    """Restore `state` into sequence `seq_id` (llama.cpp empties it first; on failure it is
    left empty)."""
    read = lib.llama_state_seq_set_data_ext(ctx, _pointer(state, len(state)), len(state), seq_id, 0)
    if read != len(state):
        raise KvStateError(
            f"llama.cpp restored {read} of {len(state)} bytes into sequence {seq_id}"
        )


def probe_layout(lib: Any, ctx: Any, seq_id: int, token: int, model: str) -> KvLayout:
    """Decode `token` alone in the empty sequence `seq_id`, read the layout of its state and
    empty the sequence again (`ModelLoadError` when the layout cannot be cut per token)."""
    batch = lib.llama_batch_init(1, 0, 1)
    try:
        batch.n_tokens = 1
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, 0, 1, 0
        batch.seq_id[0][0] = seq_id
        status = lib.llama_decode(ctx, batch)
        if status != 0:
            raise ModelLoadError(f"llama.cpp could not decode a token of `{model}` ({status})")
        return KvLayout.read(read_state(lib, ctx, seq_id), model)
    finally:
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), seq_id, -1, -1)
        lib.llama_batch_free(batch)


def _pointer(buffer: bytearray | memoryview, size: int) -> Any:
    return (ctypes.c_uint8 * size).from_buffer(buffer)
