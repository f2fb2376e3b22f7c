"""Release keys: rotation records teach a node a new key, revocations take one away, and no
clock is involved in either."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import msgspec
import pytest

from images import ImageError, SigningKey, TrustSet, verify_bundle
from images._private.keys import Record, ReleaseKey, TrustFile
from tests.images.bundles import make_bundle, release_key
from tests.support import run_palisade


def new_key(directory: Path, name: str) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    path = directory / f"{name}.key"
    key.save(path)
    return key, path


def records_file(directory: Path, *records: Record) -> Path:
    """A trust file holding only `records`, for `make_bundle(records=…)` to ship."""
    path = directory / "records.json"
    TrustSet(keys=(), records=records).save(path)
    return path


def code_of(bundle: Path, trust: TrustSet) -> str:
    with pytest.raises(ImageError) as caught:
        verify_bundle(bundle, trust)
    return caught.value.code


def test_a_node_pinned_to_k1_learns_k2_from_a_record_inside_the_bundle(tmp_path: Path) -> None:
    k1, _ = new_key(tmp_path, "k1")
    k2, k2_path = new_key(tmp_path, "k2")
    node = TrustSet.of([k1.public])
    without_record, _ = make_bundle(tmp_path, version="2.0.0", signing_key=k2_path)
    assert code_of(without_record, node) == "untrusted_key"

    shipped = records_file(tmp_path, k1.endorse(k2.public))
    with_record, _ = make_bundle(tmp_path, version="2.0.0", signing_key=k2_path, records=shipped)
    verified = verify_bundle(with_record, node)
    assert verified.signed_by == k2.key_id
    assert verified.records == (k1.endorse(k2.public),)  # Ed25519 signing is deterministic


def test_a_record_beside_the_bundle_works_the_same(tmp_path: Path) -> None:
    k1, _ = new_key(tmp_path, "k1")
    k2, k2_path = new_key(tmp_path, "k2")
    bundle, _ = make_bundle(tmp_path, signing_key=k2_path)
    node = TrustSet.of([k1.public])
    assert code_of(bundle, node) == "untrusted_key"
    assert verify_bundle(bundle, node.with_records([k1.endorse(k2.public)])).signed_by == k2.key_id


def test_a_rotation_signed_by_an_untrusted_key_teaches_nothing(tmp_path: Path) -> None:
    k1, _ = new_key(tmp_path, "k1")
    k2, k2_path = new_key(tmp_path, "k2")
    stranger, _ = new_key(tmp_path, "stranger")
    bundle, _ = make_bundle(tmp_path, signing_key=k2_path)
    node = TrustSet.of([k1.public], [stranger.endorse(k2.public)])
    assert code_of(bundle, node) == "untrusted_key"


def test_a_record_with_a_forged_signature_is_ignored(tmp_path: Path) -> None:
    k1, _ = new_key(tmp_path, "k1")
    k2, k2_path = new_key(tmp_path, "k2")
    genuine = k1.endorse(k2.public)
    forged = msgspec.structs.replace(genuine, sig=genuine.sig[::-1])
    bundle, _ = make_bundle(tmp_path, signing_key=k2_path)
    assert code_of(bundle, TrustSet.of([k1.public], [forged])) == "untrusted_key"


def test_a_revoked_key_is_refused_even_where_pinned(tmp_path: Path) -> None:
    k1_path, trust_path = release_key(tmp_path)
    k1 = SigningKey.load(k1_path)
    k2, k2_path = new_key(tmp_path, "k2")
    old_bundle, _ = make_bundle(tmp_path, version="1.0.0")
    new_bundle, _ = make_bundle(tmp_path, version="2.0.0", signing_key=k2_path)
    node = TrustSet.load(trust_path)
    assert verify_bundle(old_bundle, node).signed_by == k1.key_id

    rotated_then_revoked = node.with_records(
        [k1.endorse(k2.public), k2.revoke(k1.public, keeps=[k2.key_id])]
    )
    assert code_of(old_bundle, rotated_then_revoked) == "revoked_key"
    # The successor the revocation keeps is still learnt through the revoked key.
    assert verify_bundle(new_bundle, rotated_then_revoked).signed_by == k2.key_id
    assert rotated_then_revoked.status().revoked == {k1.key_id}


def test_a_stolen_key_cannot_endorse_a_key_of_its_own_after_revocation(tmp_path: Path) -> None:
    k1, _ = new_key(tmp_path, "k1")
    k2, _ = new_key(tmp_path, "k2")
    evil, evil_path = new_key(tmp_path, "evil")
    operator = [k1.endorse(k2.public), k2.revoke(k1.public, keeps=[k2.key_id])]
    # The thief signs a rotation to their key and a revocation that "keeps" it.
    thief = [k1.endorse(evil.public), k1.revoke(k1.public, keeps=[evil.key_id])]
    node = TrustSet.of([k1.public], [*operator, *thief])
    evil_bundle, _ = make_bundle(tmp_path, signing_key=evil_path)
    assert code_of(evil_bundle, node) == "untrusted_key"
    assert evil.key_id not in node.status().trusted


def test_records_carry_no_validity_period_and_verification_takes_no_clock() -> None:
    """RAUC #781: a device clock far off must not fail verification, so none is read."""
    assert set(Record.__struct_fields__) == {"kind", "subject", "signer", "keeps", "sig"}
    assert set(TrustFile.__struct_fields__) == {"format", "keys", "records"}
    assert set(ReleaseKey.__struct_fields__) == {"key_id", "public_key"}
    assert list(inspect.signature(verify_bundle).parameters) == [
        "path",
        "trust",
        "compatible",
        "region",
        "min_version",
    ]


def test_a_trust_file_whose_key_id_lies_is_refused(tmp_path: Path) -> None:
    key = SigningKey.generate()
    data = json.loads(TrustSet.of([key.public]).dump())
    data["keys"][0]["key_id"] = "0" * 16
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ImageError) as caught:
        TrustSet.load(path)
    assert caught.value.code == "trust_file_invalid"


def test_cli_create_rotate_revoke_show(tmp_path: Path) -> None:
    trust = tmp_path / "trust.json"
    k1, k2 = tmp_path / "k1.key", tmp_path / "k2.key"
    assert (
        run_palisade("image", "keys", "create", "--out", str(k1), "--trust", str(trust)).returncode
        == 0
    )
    assert run_palisade("image", "keys", "create", "--out", str(k2)).returncode == 0
    assert k1.stat().st_mode & 0o777 == 0o600
    rotate = run_palisade(
        "image", "keys", "rotate", "--key", str(k1), "--to", str(k2), "--trust", str(trust)
    )
    assert rotate.returncode == 0, rotate.stderr
    k1_id, k2_id = SigningKey.load(k1).key_id, SigningKey.load(k2).key_id
    revoke = run_palisade("image", "keys", "revoke", k1_id, "--key", str(k2), "--trust", str(trust))
    assert revoke.returncode == 0, revoke.stderr
    assert f"successors kept: {k2_id}" in revoke.stdout
    show = run_palisade("image", "keys", "show", "--trust", str(trust), "--json")
    statuses = {row["key_id"]: row["status"] for row in json.loads(show.stdout)["keys"]}
    assert statuses == {k1_id: "revoked", k2_id: "trusted"}

    again = run_palisade("image", "keys", "create", "--out", str(k1))
    assert again.returncode == 1
    assert again.stderr.rstrip().endswith("(key_exists)")
