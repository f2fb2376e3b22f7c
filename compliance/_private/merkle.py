"""RFC 6962 Merkle trees (the Certificate Transparency scheme, RFC 9162 section 2.1).

The audit log is a list of entries, d[0] ... d[n-1]. Each entry is hashed once into a *leaf
hash*, and the log is summarised by the Merkle Tree Hash (MTH) of those leaf hashes::

    leaf_hash(d)      = SHA-256(0x00 || d)
    node_hash(l, r)   = SHA-256(0x01 || l || r)
    MTH({})           = SHA-256("")                      (EMPTY_ROOT)
    MTH({h})          = h                                (h is already a leaf hash)
    MTH(h[0:n])       = node_hash(MTH(h[0:k]), MTH(h[k:n]))
                        where k is the largest power of two smaller than n

The 0x00 / 0x01 prefixes keep leaves and interior nodes apart, so no entry can pose as a node.
Because of the split rule the left subtree is always perfect and a lone right-edge node is
carried up a level unchanged; the last node is never duplicated (duplication, as in Bitcoin's
tree, lets two different lists share a root). All functions here take *leaf hashes*, never raw
entries: hash entries with `leaf_hash` first.

What this module offers:

- `root` -- the MTH of a list of leaf hashes, computed level by level without recursion.
- `CompactRange` -- an append-only builder holding O(log n) hashes (the roots of the perfect
  subtrees that make up the tree), so a log writer can keep the root current without keeping
  every leaf hash.
- `inclusion_proof` / `verify_inclusion` -- the audit path PATH(m, D[n]) of RFC 6962 and the
  verification algorithm of RFC 9162 section 2.1.3.2: proves that one leaf is in a tree.
- `consistency_proof` / `verify_consistency` -- PROOF(m, D[n]) of RFC 6962 and the algorithm of
  RFC 9162 section 2.1.4.2: proves that a tree of m leaves is a prefix of a tree of n leaves.
- `MerkleTree` / `inclusion_proofs` -- keep every level of one tree so that many proofs can be
  cut from it without rehashing.

Invalid arguments (an index outside the tree, an old size larger than the tree, a leaf hash that
is not 32 bytes) raise `MerkleError`, a `ValueError`. The verifiers never raise on a malformed
proof: they return False.

A root hash does not commit to the tree size on its own: a proof for leaf 0 of a 4-leaf tree
also verifies as a proof for leaf 0 of a "3-leaf tree" whose third leaf hash is the node over
leaves 2 and 3. Always verify against a (size, root) pair taken together from a trusted,
signed checkpoint, never against a size supplied alongside the proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "MerkleError",
    "MerkleTree",
    "consistency_proof",
    "inclusion_proof",
    "inclusion_proofs",
    "leaf_hash",
    "node_hash",
    "root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Bytes in every hash: leaf hashes, node hashes, roots and proof elements (SHA-256)."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree: SHA-256 of the empty string."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256

_Range = tuple[int, int]


class MerkleError(ValueError):
    """An argument to a Merkle tree function is invalid; the message says which and why."""


def leaf_hash(entry: bytes) -> bytes:
    """Hash one log entry into a leaf: SHA-256(0x00 || entry)."""
    return _sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two child hashes into their parent: SHA-256(0x01 || left || right)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


# --- roots -------------------------------------------------------------------------------


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH of `leaves`, a sequence of 32-byte leaf hashes (not entries).

    Pairs neighbours level by level; an odd node at the end of a level moves up unchanged,
    which yields exactly the RFC 6962 split tree. n - 1 hashes for n leaves.
    """
    level = _checked_leaves(leaves)
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        level = _parent_level(level)
    return level[0]


def _parent_level(level: list[bytes]) -> list[bytes]:
    """The level above `level`: hashes of neighbouring pairs, a trailing odd node carried up."""
    parents = [
        _sha256(_NODE_PREFIX + left + right).digest()
        for left, right in zip(level[0::2], level[1::2], strict=False)
    ]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def _checked_leaves(leaves: Sequence[bytes]) -> list[bytes]:
    """`leaves` as a list, after checking that each one is a 32-byte hash."""
    hashes = list(leaves)
    for position, value in enumerate(hashes):
        if len(value) != HASH_SIZE:
            raise MerkleError(
                f"leaf hash at position {position} is {len(value)} bytes, not {HASH_SIZE}: "
                "pass leaf hashes (leaf_hash(entry)), not the entries themselves"
            )
    return hashes


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise MerkleError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


# --- incremental builder -------------------------------------------------------------------


class CompactRange:
    """Append-only Merkle tree builder that keeps only O(log n) hashes.

    The tree of n leaves is a row of perfect subtrees, one per set bit of n, largest first
    (n = 13 = 8 + 4 + 1). The builder keeps the roots of those subtrees; appending a leaf merges
    equal-sized subtrees like a binary counter carrying, and `root()` folds the row from right
    to left. `root()` equals `root(leaves)` for every size.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_state(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """Resume from a saved (`size`, `hashes`) pair, as returned by `size` and `hashes`."""
        if size < 0:
            raise MerkleError(f"size must not be negative, got {size}")
        if len(hashes) != size.bit_count():
            raise MerkleError(
                f"a tree of {size} leaves has {size.bit_count()} perfect subtrees, "
                f"but {len(hashes)} hashes were given"
            )
        for position, value in enumerate(hashes):
            _check_hash(value, f"subtree hash at position {position}")
        compact = cls()
        compact._size = size
        compact._hashes = list(hashes)
        return compact

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """Roots of the perfect subtrees, largest (leftmost) first: the state to persist."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add one 32-byte leaf hash (not an entry) at the right edge of the tree."""
        _check_hash(leaf, "leaf hash")
        node, carry = leaf, self._size
        while carry & 1:
            node = node_hash(self._hashes.pop(), node)
            carry >>= 1
        self._hashes.append(node)
        self._size += 1

    def root(self) -> bytes:
        """MTH of every leaf appended so far (EMPTY_ROOT before the first append)."""
        if not self._hashes:
            return EMPTY_ROOT
        node = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            node = node_hash(left, node)
        return node


# --- proof shapes ----------------------------------------------------------------------------
#
# Both proofs are lists of MTHs of leaf ranges. The functions below walk the RFC 6962
# recursion iteratively and return those ranges, deepest first, which is the order of the
# proof. The ranges are always nodes of the tree, so callers can hash them however is cheapest.


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _inclusion_ranges(index: int, size: int) -> list[_Range]:
    """Leaf ranges whose MTHs form PATH(index, D[size]), in proof order."""
    ranges: list[_Range] = []
    low, high = 0, size
    while high - low > 1:
        middle = low + _split(high - low)
        if index < middle:
            ranges.append((middle, high))
            high = middle
        else:
            ranges.append((low, middle))
            low = middle
    ranges.reverse()
    return ranges


def _consistency_ranges(old_size: int, size: int) -> list[_Range]:
    """Leaf ranges whose MTHs form PROOF(old_size, D[size]), in proof order (0 < old < size)."""
    ranges: list[_Range] = []
    low, high, whole_old_tree = 0, size, True
    while high != old_size:  # SUBPROOF(m, D[low:high]) with m == high - low ends the walk
        middle = low + _split(high - low)
        if old_size <= middle:
            ranges.append((middle, high))
            high = middle
        else:
            ranges.append((low, middle))
            low, whole_old_tree = middle, False
    if not whole_old_tree:
        ranges.append((low, high))
    ranges.reverse()
    return ranges


def _check_index(index: int, size: int) -> None:
    if not 0 <= index < size:
        valid = f"valid indices are 0..{size - 1}" if size else "the tree is empty"
        raise MerkleError(
            f"leaf index {index} is out of range for a tree of {size} leaves: {valid}"
        )


def _check_old_size(old_size: int, size: int) -> None:
    if not 0 <= old_size <= size:
        raise MerkleError(
            f"old tree size {old_size} is out of range: it must be between 0 and "
            f"the current size {size}"
        )


# --- proofs from a list of leaf hashes ------------------------------------------------------


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]): the audit path proving leaf `index` is in the tree of `leaves`.

    Hashes every leaf once (O(n)); to cut many proofs from one tree use `MerkleTree`.
    """
    hashes = _checked_leaves(leaves)
    _check_index(index, len(hashes))
    return [root(hashes[low:high]) for low, high in _inclusion_ranges(index, len(hashes))]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, D[n]): proves the first `old_size` leaves are a prefix of `leaves`.

    Empty when old_size is 0 or n: those cases need no hashes (see `verify_consistency`).
    """
    hashes = _checked_leaves(leaves)
    _check_old_size(old_size, len(hashes))
    if old_size in (0, len(hashes)):
        return []
    return [root(hashes[low:high]) for low, high in _consistency_ranges(old_size, len(hashes))]


# --- proofs from a tree kept in memory --------------------------------------------------------


class MerkleTree:
    """A fixed tree with every level kept (about 2n hashes), to cut many proofs cheaply.

    Building costs n - 1 hashes; after that each proof is O(log n) lookups and no hashing.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes]) -> None:
        level = _checked_leaves(leaves)
        self._levels = [level]
        while len(level) > 1:
            level = _parent_level(level)
            self._levels.append(level)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._levels[0])

    def root(self) -> bytes:
        """MTH of the leaves."""
        return self._levels[-1][0] if self.size else EMPTY_ROOT

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[n]), as `inclusion_proof` computes it."""
        _check_index(index, self.size)
        return [self._node(low, high) for low, high in _inclusion_ranges(index, self.size)]

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """PROOF(old_size, D[n]), as `consistency_proof` computes it."""
        _check_old_size(old_size, self.size)
        if old_size in (0, self.size):
            return []
        return [self._node(low, high) for low, high in _consistency_ranges(old_size, self.size)]

    def _node(self, low: int, high: int) -> bytes:
        """MTH of leaves [low, high), which must be a node of the tree.

        A node of height h starts at a multiple of 2**h and spans up to 2**h leaves; on level h
        it sits at position low >> h (a right-edge node carried up is stored on every level it
        passes through).
        """
        height = (high - low - 1).bit_length()
        return self._levels[height][low >> height]


def inclusion_proofs(indices: Iterable[int], leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Inclusion proofs for each of `indices` in the tree of `leaves`, hashing the tree once."""
    tree = MerkleTree(leaves)
    return [tree.inclusion_proof(index) for index in indices]


# --- verification ------------------------------------------------------------------------------


_BYTES = (bytes, bytearray)
_LEVEL_BITS = 7  # a node key is position << _LEVEL_BITS | level: levels stay below 2**7


def _is_hash(value: object) -> bool:
    return isinstance(value, _BYTES) and len(value) == HASH_SIZE


def _all_hashes(values: Iterable[object]) -> bool:
    return all(_is_hash(value) for value in values)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes
) -> bool:
    """True if `proof` shows leaf hash `leaf` at `index` in the tree of `size` with `root_hash`.

    RFC 9162 section 2.1.3.2. Returns False, never raises, for malformed input: an index
    outside the tree, a proof of the wrong length, or any hash that is not 32 bytes.
    """
    if not (_is_hash(leaf) and _is_hash(root_hash) and _all_hashes(proof)):
        return False
    if not 0 <= index < size:
        return False
    computed = _root_from_inclusion(leaf, index, size, proof)
    return computed is not None and computed == root_hash


def _root_from_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes | None:
    """The root implied by an inclusion proof, or None if the proof has the wrong length."""
    fn, sn, node = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = node_hash(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return node if sn == 0 else None


def inclusion_path(index: int, size: int, steps: int) -> list[tuple[int, int]]:
    """The (level, position) of the node each step of an inclusion proof computes.

    Mirrors the walk in `InclusionVerifier.verify`, so an exporter can cut a proof where it
    reaches a node that an earlier proof in the same file already established.
    """
    fn, sn, level = index, size - 1, 0
    keys = []
    for _ in range(steps):
        if (fn & 1 or fn == sn) and not fn & 1:
            while fn and not fn & 1:
                fn, sn, level = fn >> 1, sn >> 1, level + 1
        fn, sn, level = fn >> 1, sn >> 1, level + 1
        keys.append((level, fn))
    return keys


def shared_proofs(indices: Sequence[int], leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Inclusion proofs for `indices` (ascending), each cut where it joins an earlier one.

    Read in order by an `InclusionVerifier`, they prove exactly what the full proofs prove,
    at a fraction of the size: neighbouring entries share all but their lowest nodes.
    """
    full = inclusion_proofs(indices, leaves)
    covered: set[tuple[int, int]] = set()
    cut = []
    for index, proof in zip(indices, full, strict=True):
        keys = inclusion_path(index, len(leaves), len(proof))
        stop = next((step + 1 for step, key in enumerate(keys) if key in covered), len(proof))
        cut.append(proof[:stop])
        covered.update(keys[:stop])
    return cut


class InclusionVerifier:
    """Checks many inclusion proofs against one signed tree, remembering proven nodes.

    Once a proof has led to the signed root, every node hash on its path is proven. A later
    proof that reaches a proven node can stop there: equal means included, different means
    not. Neighbouring entries share most of their paths, so an org export's proofs cost a
    few hashes each instead of a full path.
    """

    def __init__(self, size: int, root_hash: bytes) -> None:
        self.size = size
        self.root = root_hash
        self._root_is_hash = _is_hash(root_hash)
        self._proven: dict[int, bytes] = {}  # node key -> hash, for nodes on a proven path

    def verify(self, leaf: bytes, index: int, proof: Sequence[bytes]) -> bool:
        """Whether `leaf` is at `index` in the signed tree.

        True whenever `verify_inclusion` is. It may also be True when the proof's upper
        elements are wrong but its lower part already reached a proven node: the leaf is
        then proven included all the same.
        """
        if not (self._root_is_hash and _is_hash(leaf)) or not 0 <= index < self.size:
            return False
        # The hot loop of org-export verification: hashing is inlined, a node is keyed by one
        # int rather than a (level, position) tuple, and the nodes it computes are recorded as
        # it goes (every one is new: the walk stops at the first known node) and withdrawn if
        # the proof fails.
        proven, sha256, prefix = self._proven, _sha256, _NODE_PREFIX
        fn, sn, level, node = index, self.size - 1, 0, leaf
        steps = 0
        for sibling in proof:  # each element is checked only if the walk reaches it
            if sn == 0 or not isinstance(sibling, _BYTES) or len(sibling) != HASH_SIZE:
                return self._withdraw(index, steps)
            if fn & 1 or fn == sn:
                node = sha256(prefix + sibling + node).digest()
                while fn and not fn & 1:
                    fn, sn, level = fn >> 1, sn >> 1, level + 1
            else:
                node = sha256(prefix + node + sibling).digest()
            fn, sn, level = fn >> 1, sn >> 1, level + 1
            key = fn << _LEVEL_BITS | level
            known = proven.get(key)
            if known is not None:
                return known == node or self._withdraw(index, steps)
            proven[key] = node
            steps += 1
        return (sn == 0 and node == self.root) or self._withdraw(index, steps)

    def _withdraw(self, index: int, steps: int) -> bool:
        """Forget the first `steps` nodes a failed walk from `index` recorded; returns False."""
        for level, position in inclusion_path(index, self.size, steps):
            del self._proven[position << _LEVEL_BITS | level]
        return False


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True if `proof` shows tree (`old_size`, `old_root`) is a prefix of (`new_size`, `new_root`).

    RFC 9162 section 2.1.4.2 for 0 < old_size < new_size. Equal sizes need an empty proof and
    equal roots. An old size of 0 needs an empty proof and `old_root` == EMPTY_ROOT (and,
    if new_size is 0 too, `new_root` == EMPTY_ROOT). Returns False, never raises, for
    malformed input.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and _all_hashes(proof)):
        return False
    if not 0 <= old_size <= new_size:
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT and (new_size > 0 or new_root == EMPTY_ROOT)
    if old_size == new_size:
        return not proof and old_root == new_root
    roots = _roots_from_consistency(old_size, new_size, old_root, proof)
    return roots is not None and roots == (old_root, new_root)


def _roots_from_consistency(
    old_size: int, new_size: int, old_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes] | None:
    """The (old, new) roots implied by a consistency proof, or None if its length is wrong."""
    path = list(proof)
    if not path:
        return None
    if old_size & (old_size - 1) == 0:  # a power of two: the old tree is a node of the new one
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    old_node = new_node = path[0]
    for sibling in path[1:]:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            old_node = node_hash(sibling, old_node)
            new_node = node_hash(sibling, new_node)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            new_node = node_hash(new_node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return (old_node, new_node) if sn == 0 else None
