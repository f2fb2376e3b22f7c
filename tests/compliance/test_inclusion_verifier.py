"""The caching inclusion verifier agrees with the plain RFC 9162 check on what is included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from compliance._private.merkle import (
    InclusionVerifier,
    MerkleTree,
    leaf_hash,
    shared_proofs,
    verify_inclusion,
)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=200),
    picks=st.lists(
        st.tuples(st.integers(min_value=0), st.booleans(), st.integers(min_value=0)),
        min_size=1,
        max_size=40,
    ),
)
def test_cached_answers_equal_plain_answers(size: int, picks: list[tuple[int, bool, int]]) -> None:
    leaves = [leaf_hash(f"entry-{i}".encode()) for i in range(size)]
    tree = MerkleTree(leaves)
    root = tree.root()
    verifier = InclusionVerifier(size, root)
    for seed, corrupt, where in picks:
        index = seed % size
        leaf, proof = leaves[index], tree.inclusion_proof(index)
        if corrupt:
            if proof and where % 2:
                position = where % len(proof)
                proof = [*proof[:position], leaf_hash(b"forged"), *proof[position + 1 :]]
            else:
                leaf = leaf_hash(b"forged")
        plain = verify_inclusion(leaf, index, size, proof, root)
        cached = verifier.verify(leaf, index, proof)
        if plain:
            assert cached
        if cached:
            assert leaf == leaves[index]  # it never accepts a leaf that is not there
        if leaf != leaves[index]:
            assert not cached


def test_a_wrong_leaf_next_to_proven_ones_is_refused() -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(64)]
    tree = MerkleTree(leaves)
    verifier = InclusionVerifier(64, tree.root())
    assert all(verifier.verify(leaves[i], i, tree.inclusion_proof(i)) for i in range(0, 64, 3))
    assert not verifier.verify(leaf_hash(b"x"), 4, tree.inclusion_proof(4))
    assert not verifier.verify(leaves[5], 4, tree.inclusion_proof(4))
    assert verifier.verify(leaves[4], 4, tree.inclusion_proof(4))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(min_value=1, max_value=150), data=st.data())
def test_shared_proofs_prove_every_entry_and_catch_a_forged_one(
    size: int, data: st.DataObject
) -> None:
    leaves = [leaf_hash(f"entry-{i}".encode()) for i in range(size)]
    root = MerkleTree(leaves).root()
    indices = sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1)))
    proofs = shared_proofs(indices, leaves)
    verifier = InclusionVerifier(size, root)
    assert all(verifier.verify(leaves[i], i, p) for i, p in zip(indices, proofs, strict=True))
    forged = data.draw(st.integers(0, len(indices) - 1))
    fresh = InclusionVerifier(size, root)
    results = [
        fresh.verify(leaf_hash(b"forged") if n == forged else leaves[i], i, p)
        for n, (i, p) in enumerate(zip(indices, proofs, strict=True))
    ]
    assert results[forged] is False
    assert all(results[:forged])
