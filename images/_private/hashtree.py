"""The block hash tree of a rootfs, exactly as dm-verity builds it (format 1, SHA-256,
4096-byte data and hash blocks, no superblock).

Each data block is hashed as SHA-256(salt || block); the digests are packed 128 to a
zero-padded hash block, those blocks are hashed the same way, and so on until one digest
is left: the root. `veritysetup format --no-superblock --salt S` computes the same root
(tests/images check it), so a booted image can mount its slot through dm-verity with the
root from the signed manifest. A payload whose size is not a multiple of the block size
is hashed as if zero-padded (squashfs images are padded to 4 KiB already).
"""

from __future__ import annotations

import hashlib

from images._private.manifest import BLOCK_SIZE

DIGEST_SIZE = 32
_PER_BLOCK = BLOCK_SIZE // DIGEST_SIZE


class HashTreeBuilder:
    """Feed the payload in chunks of any size; `root()` and `tree()` at the end."""

    def __init__(self, salt: bytes) -> None:
        self._salt = salt
        self._pending = b""
        self._leaves: list[bytes] = []

    def update(self, data: bytes) -> None:
        buffer = self._pending + data if self._pending else data
        whole = len(buffer) - len(buffer) % BLOCK_SIZE
        view = memoryview(buffer)
        self._leaves.extend(
            self._hash(view[start : start + BLOCK_SIZE]) for start in range(0, whole, BLOCK_SIZE)
        )
        self._pending = bytes(view[whole:])

    def _hash(self, block: bytes | memoryview) -> bytes:
        return hashlib.sha256(self._salt + block).digest()

    def _levels(self) -> list[list[bytes]]:
        """The hash blocks of each level, bottom first; empty for a one-block payload."""
        digests = list(self._leaves)
        if self._pending:
            digests.append(self._hash(self._pending.ljust(BLOCK_SIZE, b"\0")))
        if not digests:
            digests.append(self._hash(bytes(BLOCK_SIZE)))
        levels: list[list[bytes]] = []
        while len(digests) > 1:
            blocks = [
                b"".join(digests[start : start + _PER_BLOCK]).ljust(BLOCK_SIZE, b"\0")
                for start in range(0, len(digests), _PER_BLOCK)
            ]
            levels.append(blocks)
            digests = [self._hash(block) for block in blocks]
        levels.append([digests[0]])  # the root, kept as the last "level"
        return levels

    def root(self) -> str:
        return self._levels()[-1][0].hex()

    def tree(self) -> bytes:
        """The hash area as dm-verity lays it out: the top level first."""
        return b"".join(b"".join(level) for level in reversed(self._levels()[:-1]))


def hash_tree_root(data: bytes, salt: bytes) -> str:
    builder = HashTreeBuilder(salt)
    builder.update(data)
    return builder.root()
