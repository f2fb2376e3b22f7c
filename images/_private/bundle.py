"""The `.pimg` container: a signed manifest followed by 4096-aligned payloads.

```
magic  b"PIMG\\x00\\x01\\n\\x00"                   8 bytes
u32 big-endian M, the manifest (canonical JSON)  M bytes
u32 big-endian S, the signature block            S bytes
payloads, each at a 4096-aligned offset, in manifest order, zero padding between
```
The signature block (canonical JSON) holds the manifest's SHA-256, the Ed25519
signatures over the exact manifest bytes, and the key records (rotations, revocations) a
node may need to trust the signer. Nothing after the last payload: the file's length is
part of what the manifest fixes, so any cut is detected.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from images._private.errors import ImageError
from images._private.keys import KeyId, Record, SignatureHex
from images._private.manifest import BLOCK_SIZE, Payload, Sha256Hex

MAGIC = b"PIMG\x00\x01\n\x00"
MAX_PART = 1 << 20  # no manifest or signature block comes near 1 MiB
CHUNK = 1 << 20
_LENGTH = struct.Struct(">I")


class Signature(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key_id: KeyId
    sig: SignatureHex


class SignatureBlock(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    manifest_sha256: Sha256Hex
    signatures: list[Signature]
    records: list[Record] = msgspec.field(default_factory=list)


_ENCODER = msgspec.json.Encoder(order="sorted")
_BLOCK_DECODER = msgspec.json.Decoder(SignatureBlock)


def encode_block(block: SignatureBlock) -> bytes:
    return _ENCODER.encode(block)


def align(offset: int) -> int:
    return -(-offset // BLOCK_SIZE) * BLOCK_SIZE


def header_bytes(manifest: bytes, block: bytes) -> bytes:
    return MAGIC + _LENGTH.pack(len(manifest)) + manifest + _LENGTH.pack(len(block)) + block


def header_length(manifest: bytes, block: bytes) -> int:
    return len(MAGIC) + 2 * _LENGTH.size + len(manifest) + len(block)


def payload_offsets(header_end: int, sizes: list[int]) -> list[int]:
    """Where each payload starts: the next 4096 boundary after the one before."""
    offsets = []
    position = header_end
    for size in sizes:
        position = align(position)
        offsets.append(position)
        position += size
    return offsets


@dataclass(frozen=True)
class Header:
    """The parsed head of a bundle; nothing in it is trusted yet."""

    manifest: bytes
    block: SignatureBlock
    end: int  # offset just after the signature block
    file_size: int


def read_header(file: BinaryIO) -> Header:
    """Parse magic, manifest and signature block: `bundle_truncated` / `bundle_malformed`."""
    file_size = os.fstat(file.fileno()).st_size
    magic = file.read(len(MAGIC))
    if magic != MAGIC:
        if MAGIC.startswith(magic):
            raise _truncated("in its header")
        raise ImageError("The file is not a Palisade bundle (bad magic).", code="bundle_malformed")
    manifest = _read_part(file, "manifest")
    raw_block = _read_part(file, "signature block")
    try:
        block = _BLOCK_DECODER.decode(raw_block)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ImageError(
            f"The bundle's signature block is not valid: {exc}.", code="bundle_malformed"
        ) from exc
    return Header(manifest=manifest, block=block, end=file.tell(), file_size=file_size)


def _read_part(file: BinaryIO, what: str) -> bytes:
    prefix = file.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        raise _truncated(f"before its {what}")
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_PART:
        raise ImageError(
            f"The bundle's {what} claims {length} bytes; the limit is {MAX_PART}.",
            code="bundle_malformed",
        )
    data = file.read(length)
    if len(data) < length:
        raise _truncated(f"in its {what}")
    return data


def _truncated(where: str) -> ImageError:
    return ImageError(
        f"The bundle ends early ({where}): it was cut short in transfer or on disk.",
        code="bundle_truncated",
    )


def write_bundle(out: Path, header: bytes, payloads: list[tuple[Payload, Path]]) -> None:
    """Write header and payload files at their offsets to `out`, atomically: a crash or a
    failure leaves no `out` (or the previous one), never a partial bundle."""
    temporary = out.with_name(f".{out.name}.partial")
    try:
        with temporary.open("wb") as sink:
            sink.write(header)
            for payload, source in payloads:
                sink.write(bytes(payload.offset - sink.tell()))
                with source.open("rb") as data:
                    copied = _copy(data, sink)
                if copied != payload.size:
                    raise ImageError(
                        f"{source} changed while the bundle was written.", code="build_failed"
                    )
            sink.flush()
            os.fsync(sink.fileno())
        temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)


def _copy(source: BinaryIO, sink: BinaryIO) -> int:
    total = 0
    while chunk := source.read(CHUNK):
        sink.write(chunk)
        total += len(chunk)
    return total


def iter_range(path: Path, offset: int, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The `size` bytes at `offset` of `path`, in chunks of at most `chunk` bytes."""
    with path.open("rb") as file:
        file.seek(offset)
        left = size
        while left:
            data = file.read(min(chunk, left))
            if not data:
                raise _truncated("in a payload")
            left -= len(data)
            yield data


class PayloadReader(io.RawIOBase):
    """A read-only file over one payload: position 0 is the payload's first byte, EOF its end."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._offset = offset
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        self._file.seek(self._offset + self._position)
        data = self._file.read(wanted)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()
