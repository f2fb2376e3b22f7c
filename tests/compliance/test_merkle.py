"""RFC 6962 Merkle trees: known answers, a recursive reference, and proof properties.

The reference functions below transcribe the RFC 6962 section 2.1 definitions as literally as
possible (recursion, slicing, a loop to find k) so that the fast code is checked against
something obviously right rather than against itself.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compliance._private.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleError,
    MerkleTree,
    consistency_proof,
    inclusion_proof,
    inclusion_proofs,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

# --- reference implementation, straight from RFC 6962 section 2.1 ---------------------------


def ref_k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = ref_k(len(d))
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    """PATH(m, D[n])."""
    if len(d) == 1:
        return []
    k = ref_k(len(d))
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) for 0 < m < n."""
    return ref_subproof(m, d, complete=True)


def ref_subproof(m: int, d: list[bytes], *, complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b)."""
    n = len(d)
    if m == n:
        return [] if complete else [ref_mth(d)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], complete=complete), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], complete=False), ref_mth(d[:k])]


def ref_shape(m: int, n: int) -> list[bool]:
    """For PATH(m, D[n]), leaf upwards: is each sibling on the left?"""
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_shape(m, k), False]
    return [*ref_shape(m - k, n - k), True]


def ref_consistency_shape(m: int, n: int, *, complete: bool = True) -> list[bool | None]:
    """For SUBPROOF(m, D[n], b): None for the old subtree's own hash, else is it a left sibling?"""
    if m == n:
        return [] if complete else [None]
    k = ref_k(n)
    if m <= k:
        return [*ref_consistency_shape(m, k, complete=complete), False]
    return [*ref_consistency_shape(m - k, n - k, complete=False), True]


def make_leaves(n: int, salt: bytes = b"") -> list[bytes]:
    """n distinct leaf hashes."""
    return [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


def flip(value: bytes, bit: int = 0) -> bytes:
    """`value` with one bit changed."""
    return bytes([value[0] ^ (1 << bit), *value[1:]])


# --- known answers: transparency-dev/merkle testonly/constants.go and proof/verify_test.go ---

LEAF_INPUTS = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
KNOWN_LEAVES = [leaf_hash(entry) for entry in LEAF_INPUTS]

LEAF_HASHES_HEX = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
    "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
]

# Roots of the trees of the first 1..8 leaves.
ROOTS_HEX = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
KNOWN_ROOTS = [bytes.fromhex(value) for value in ROOTS_HEX]

# (index, size, proof); the Go file numbers leaves from 1, these are 0-based.
KNOWN_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

# (old_size, new_size, proof)
KNOWN_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def test_empty_root() -> None:
    expected = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert expected == EMPTY_ROOT
    assert root([]) == EMPTY_ROOT
    assert CompactRange().root() == EMPTY_ROOT
    assert MerkleTree([]).root() == EMPTY_ROOT


def test_root_of_one_leaf_is_the_leaf_hash() -> None:
    assert leaf_hash(b"") == bytes.fromhex(LEAF_HASHES_HEX[0])
    assert root([leaf_hash(b"")]) == bytes.fromhex(ROOTS_HEX[0])


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = leaf_hash(b"l"), leaf_hash(b"r")
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert [h.hex() for h in KNOWN_LEAVES] == LEAF_HASHES_HEX


@pytest.mark.parametrize("size", range(1, 9))
def test_known_roots(size: int) -> None:
    expected = KNOWN_ROOTS[size - 1]
    assert root(KNOWN_LEAVES[:size]) == expected
    assert ref_mth(KNOWN_LEAVES[:size]) == expected
    assert MerkleTree(KNOWN_LEAVES[:size]).root() == expected
    compact = CompactRange()
    for leaf in KNOWN_LEAVES[:size]:
        compact.append(leaf)
    assert compact.root() == expected


@pytest.mark.parametrize(("index", "size", "proof_hex"), KNOWN_INCLUSION)
def test_known_inclusion_proofs(index: int, size: int, proof_hex: list[str]) -> None:
    expected = [bytes.fromhex(value) for value in proof_hex]
    leaves = KNOWN_LEAVES[:size]
    assert inclusion_proof(index, leaves) == expected
    assert MerkleTree(leaves).inclusion_proof(index) == expected
    assert verify_inclusion(KNOWN_LEAVES[index], index, size, expected, KNOWN_ROOTS[size - 1])


@pytest.mark.parametrize(("old_size", "new_size", "proof_hex"), KNOWN_CONSISTENCY)
def test_known_consistency_proofs(old_size: int, new_size: int, proof_hex: list[str]) -> None:
    expected = [bytes.fromhex(value) for value in proof_hex]
    leaves = KNOWN_LEAVES[:new_size]
    old_root, new_root = KNOWN_ROOTS[old_size - 1], KNOWN_ROOTS[new_size - 1]
    assert consistency_proof(old_size, leaves) == expected
    assert MerkleTree(leaves).consistency_proof(old_size) == expected
    assert verify_consistency(old_size, new_size, old_root, new_root, expected)


# --- the fast code against the reference, exhaustively for small trees ------------------------


def test_root_and_compact_range_match_reference_at_every_size() -> None:
    leaves = make_leaves(530)
    compact = CompactRange()
    for size in range(len(leaves) + 1):
        expected = ref_mth(leaves[:size])
        assert root(leaves[:size]) == expected, size
        assert compact.root() == expected, size
        assert compact.size == size
        if size < len(leaves):
            compact.append(leaves[size])


def test_every_proof_of_small_trees_matches_reference() -> None:
    for size in range(1, 40):
        leaves = make_leaves(size)
        tree = MerkleTree(leaves)
        for index in range(size):
            expected = ref_path(index, leaves)
            assert inclusion_proof(index, leaves) == expected, (index, size)
            assert tree.inclusion_proof(index) == expected, (index, size)
        for old_size in range(1, size):
            expected = ref_proof(old_size, leaves)
            assert consistency_proof(old_size, leaves) == expected, (old_size, size)
            assert tree.consistency_proof(old_size) == expected, (old_size, size)


# --- properties --------------------------------------------------------------------------------

salts = st.binary(max_size=8)


@given(st.integers(0, 300), salts)
def test_fast_root_matches_reference(size: int, salt: bytes) -> None:
    leaves = make_leaves(size, salt)
    assert root(leaves) == ref_mth(leaves)
    assert MerkleTree(leaves).root() == ref_mth(leaves)


@settings(max_examples=30)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=300))
def test_compact_range_matches_root_at_every_size(leaves: list[bytes]) -> None:
    compact = CompactRange()
    assert compact.root() == root([])
    for size, leaf in enumerate(leaves, start=1):
        compact.append(leaf)
        assert compact.root() == root(leaves[:size])
        resumed = CompactRange.from_state(compact.size, compact.hashes)
        assert resumed.root() == compact.root()


@given(st.data(), st.integers(1, 300), salts)
def test_inclusion_proofs_verify_and_reject_tampering(
    data: st.DataObject, size: int, salt: bytes
) -> None:
    leaves = make_leaves(size, salt)
    tree_root = root(leaves)
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, leaves)
    leaf = leaves[index]
    assert proof == ref_path(index, leaves)
    assert verify_inclusion(leaf, index, size, proof, tree_root)

    assert not verify_inclusion(flip(leaf), index, size, proof, tree_root)
    assert not verify_inclusion(leaf, index, size, proof, flip(tree_root))
    if size > 1:
        other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index), label="other")
        assert not verify_inclusion(leaf, other, size, proof, tree_root)
    for position in range(len(proof)):
        tampered = [*proof[:position], flip(proof[position], 3), *proof[position + 1 :]]
        assert not verify_inclusion(leaf, index, size, tampered, tree_root)
        assert not verify_inclusion(leaf, index, size, proof[:position], tree_root)
    assert not verify_inclusion(leaf, index, size, [*proof, tree_root], tree_root)
    assert not verify_inclusion(leaf, index, size, [tree_root, *proof], tree_root)

    # The root does not bind the size: a wrong size is rejected exactly when it changes the
    # shape of the path (see the module docstring). Sizes with the same shape are tested too.
    other_size = data.draw(st.integers(index + 1, 2 * size + 1), label="other_size")
    same_shape = ref_shape(index, other_size) == ref_shape(index, size)
    assert verify_inclusion(leaf, index, other_size, proof, tree_root) == same_shape


def test_tree_size_is_bound_by_the_checkpoint_not_the_root() -> None:
    """Known RFC 6962 property: leaf 0 of 4 also "verifies" as leaf 0 of 3 under the same root."""
    leaves = make_leaves(4)
    proof = inclusion_proof(0, leaves)
    assert verify_inclusion(leaves[0], 0, 3, proof, root(leaves))


@given(st.data(), st.integers(1, 300), salts)
def test_many_proofs_from_one_tree_match_single_proofs(
    data: st.DataObject, size: int, salt: bytes
) -> None:
    leaves = make_leaves(size, salt)
    indices = data.draw(st.lists(st.integers(0, size - 1), max_size=20), label="indices")
    assert inclusion_proofs(indices, leaves) == [inclusion_proof(i, leaves) for i in indices]


@given(st.data(), st.integers(1, 300), salts)
def test_consistency_proofs_verify_and_reject_tampering(
    data: st.DataObject, new_size: int, salt: bytes
) -> None:
    leaves = make_leaves(new_size, salt)
    old_size = data.draw(st.integers(1, new_size), label="old_size")
    old_root, new_root = root(leaves[:old_size]), root(leaves)
    proof = consistency_proof(old_size, leaves)
    assert proof == MerkleTree(leaves).consistency_proof(old_size)
    if old_size < new_size:
        assert proof == ref_proof(old_size, leaves)
    assert verify_consistency(old_size, new_size, old_root, new_root, proof)

    assert not verify_consistency(old_size, new_size, flip(old_root), new_root, proof)
    assert not verify_consistency(old_size, new_size, old_root, flip(new_root), proof)
    for position in range(len(proof)):
        tampered = [*proof[:position], flip(proof[position], 4), *proof[position + 1 :]]
        assert not verify_consistency(old_size, new_size, old_root, new_root, tampered)
        assert not verify_consistency(old_size, new_size, old_root, new_root, proof[:position])
    assert not verify_consistency(old_size, new_size, old_root, new_root, [*proof, new_root])
    assert not verify_consistency(old_size, new_size, old_root, new_root, [old_root, *proof])

    # As for inclusion, a wrong new size is rejected exactly when it changes the proof's shape.
    other_size = data.draw(st.integers(old_size, 2 * new_size + 1), label="other_size")
    same_shape = ref_consistency_shape(old_size, other_size) == ref_consistency_shape(
        old_size, new_size
    )
    assert verify_consistency(old_size, other_size, old_root, new_root, proof) == same_shape


@given(st.integers(0, 50), salts)
def test_consistency_from_the_empty_tree(new_size: int, salt: bytes) -> None:
    leaves = make_leaves(new_size, salt)
    assert consistency_proof(0, leaves) == []
    assert verify_consistency(0, new_size, EMPTY_ROOT, root(leaves), [])
    assert not verify_consistency(0, new_size, flip(EMPTY_ROOT), root(leaves), [])
    assert not verify_consistency(0, new_size, EMPTY_ROOT, root(leaves), [EMPTY_ROOT])


# --- errors --------------------------------------------------------------------------------------


def test_merkle_error_is_a_value_error() -> None:
    assert issubclass(MerkleError, ValueError)


@pytest.mark.parametrize("index", [-1, 5, 6])
def test_inclusion_index_out_of_range(index: int) -> None:
    leaves = make_leaves(5)
    with pytest.raises(MerkleError, match=rf"leaf index {index} .* valid indices are 0\.\.4"):
        inclusion_proof(index, leaves)
    with pytest.raises(MerkleError, match=rf"leaf index {index}"):
        MerkleTree(leaves).inclusion_proof(index)
    with pytest.raises(MerkleError, match=rf"leaf index {index}"):
        inclusion_proofs([0, index], leaves)


def test_inclusion_proof_of_empty_tree() -> None:
    with pytest.raises(MerkleError, match="tree is empty"):
        inclusion_proof(0, [])


@pytest.mark.parametrize("old_size", [-1, 6])
def test_consistency_old_size_out_of_range(old_size: int) -> None:
    leaves = make_leaves(5)
    with pytest.raises(MerkleError, match=rf"old tree size {old_size} .* current size 5"):
        consistency_proof(old_size, leaves)
    with pytest.raises(MerkleError, match=rf"old tree size {old_size}"):
        MerkleTree(leaves).consistency_proof(old_size)


def test_leaves_must_be_leaf_hashes() -> None:
    leaves = [*make_leaves(3), b"raw entry"]
    with pytest.raises(MerkleError, match=r"position 3 is 9 bytes, not 32: pass leaf hashes"):
        root(leaves)
    with pytest.raises(MerkleError, match="position 3"):
        inclusion_proof(0, leaves)
    with pytest.raises(MerkleError, match="position 3"):
        consistency_proof(1, leaves)
    with pytest.raises(MerkleError, match="position 3"):
        MerkleTree(leaves)
    with pytest.raises(MerkleError, match="leaf hash is 9 bytes"):
        CompactRange().append(b"raw entry")


def test_compact_range_state_is_checked() -> None:
    with pytest.raises(MerkleError, match="3 leaves has 2 perfect subtrees, but 1 hashes"):
        CompactRange.from_state(3, make_leaves(1))
    with pytest.raises(MerkleError, match="must not be negative"):
        CompactRange.from_state(-1, [])
    with pytest.raises(MerkleError, match="subtree hash at position 1 is 3 bytes"):
        CompactRange.from_state(3, [make_leaves(1)[0], b"abc"])


# --- verifiers never raise ---------------------------------------------------------------------


def test_verify_inclusion_rejects_malformed_input() -> None:
    leaves = make_leaves(5)
    good_root, leaf = root(leaves), leaves[2]
    proof = inclusion_proof(2, leaves)
    assert verify_inclusion(leaf, 2, 5, proof, good_root)
    assert not verify_inclusion(leaf, 2, 5, [*proof[:-1], proof[-1][:31]], good_root)
    assert not verify_inclusion(leaf, 2, 5, [*proof[:-1], proof[-1] + b"\x00"], good_root)
    assert not verify_inclusion(leaf, 2, 5, [*proof, b""], good_root)
    assert not verify_inclusion(leaf[:16], 2, 5, proof, good_root)
    assert not verify_inclusion(leaf, 2, 5, proof, good_root[:16])
    assert not verify_inclusion(leaf, 2, 5, [], good_root)
    for index, size in [(-1, 5), (5, 5), (7, 5), (0, 0), (0, -1)]:
        assert not verify_inclusion(leaf, index, size, proof, good_root)
    single = make_leaves(1)[0]
    assert verify_inclusion(single, 0, 1, [], single)
    assert not verify_inclusion(single, 0, 1, [single], single)


def test_verify_consistency_rejects_malformed_input() -> None:
    leaves = make_leaves(7)
    old_root, new_root = root(leaves[:3]), root(leaves)
    proof = consistency_proof(3, leaves)
    assert verify_consistency(3, 7, old_root, new_root, proof)
    assert not verify_consistency(3, 7, old_root, new_root, [])
    assert not verify_consistency(3, 7, old_root, new_root, [*proof[:-1], proof[-1][:31]])
    assert not verify_consistency(3, 7, old_root, new_root, [*proof, b""])
    assert not verify_consistency(3, 7, old_root[:31], new_root, proof)
    assert not verify_consistency(3, 7, old_root, new_root + b"\x00", proof)
    assert not verify_consistency(7, 3, new_root, old_root, proof)
    assert not verify_consistency(-1, 7, old_root, new_root, proof)
    assert not verify_consistency(3, 7, new_root, old_root, proof)
    # Equal sizes: empty proof and equal roots, nothing else.
    assert verify_consistency(7, 7, new_root, new_root, [])
    assert not verify_consistency(7, 7, new_root, old_root, [])
    assert not verify_consistency(7, 7, new_root, new_root, [new_root])
    # Two empty trees.
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, new_root, [])
