"""verify_bundle's refusal matrix: every way a bundle can be wrong has its own code."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import msgspec
import pytest

from images import ImageError, SigningKey, TrustSet, compare_versions, verify_bundle
from images._private.bundle import Header, Signature, encode_block, header_bytes, read_header
from tests.images.bundles import COMPATIBLE, REGION, make_bundle, release_key
from tests.support import run_palisade


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle 1.2.0, its trust file, its signing key), built once for the module."""
    home = tmp_path_factory.mktemp("release")
    bundle, trust = make_bundle(home, version="1.2.0")
    return bundle, trust, release_key(home)[0]


@pytest.fixture
def bundle(release: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A private copy of the release bundle, for a test to damage."""
    return Path(shutil.copy(release[0], tmp_path / "copy.pimg"))


@pytest.fixture
def trust(release: tuple[Path, Path, Path]) -> TrustSet:
    return TrustSet.load(release[1])


def refusal(path: Path, trust: TrustSet, **constraints: str) -> str:
    """The code verify_bundle refuses `path` with; the directory is left as it was."""
    before = sorted(path.parent.iterdir())
    with pytest.raises(ImageError) as caught:
        verify_bundle(path, trust, **constraints)
    assert sorted(path.parent.iterdir()) == before
    return caught.value.code


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_good_bundle_verifies_with_every_constraint(bundle: Path, trust: TrustSet) -> None:
    verified = verify_bundle(
        bundle, trust, compatible=COMPATIBLE, region=REGION, min_version="1.2.0-rc.1"
    )
    assert verified.manifest.version == "1.2.0"
    assert verified.signed_by in trust.status().trusted
    assert [payload.kind for payload in verified.manifest.payloads] == ["rootfs", "model", "config"]
    rootfs = b"".join(verified.iter_payload("rootfs", chunk=100_000))
    assert hashlib.sha256(rootfs).hexdigest() == verified.rootfs.sha256
    assert rootfs[:4] == b"hsqs"  # a squashfs superblock
    config = verified.config
    assert config is not None
    with verified.open_payload("config") as file:
        assert file.read() == b'region = "eu-west"\n'
        assert file.read() == b""  # the reader stops at the payload's end


@pytest.mark.parametrize("payload", ["rootfs", "model-tiny.gguf", "config"])
def test_a_flipped_payload_byte_is_a_hash_mismatch(
    bundle: Path, trust: TrustSet, payload: str
) -> None:
    entry = verify_bundle(bundle, trust).manifest.payload(payload)
    flip(bundle, entry.offset + entry.size // 2)
    assert refusal(bundle, trust) == "payload_hash_mismatch"


def test_a_flipped_padding_byte_is_malformed(bundle: Path, trust: TrustSet) -> None:
    rootfs = verify_bundle(bundle, trust).rootfs
    flip(bundle, rootfs.offset - 1)  # between the header and the first payload
    assert refusal(bundle, trust) == "bundle_malformed"


def test_an_edited_manifest_is_detected_as_edited(bundle: Path, trust: TrustSet) -> None:
    data = bundle.read_bytes()
    edited = data.replace(b'"region":"eu-west"', b'"region":"us-east"', 1)
    assert edited != data
    bundle.write_bytes(edited)
    assert refusal(bundle, trust) == "manifest_edited"


def test_a_forged_signature_is_a_bad_signature(bundle: Path, trust: TrustSet) -> None:
    header = _header(bundle)
    forged = header.block.signatures[0].sig
    header.block.signatures = [
        Signature(key_id=header.block.signatures[0].key_id, sig=forged[::-1])
    ]
    _rewrite(bundle, header.manifest, encode_block(header.block))
    assert refusal(bundle, trust) == "bad_signature"


def test_a_signed_payload_table_that_lies_is_manifest_edited(
    bundle: Path, trust: TrustSet, release: tuple[Path, Path, Path]
) -> None:
    """Even correctly signed, a table that does not describe the file is refused."""
    header = _header(bundle)
    manifest = msgspec.json.decode(header.manifest)
    manifest["payloads"][1]["offset"] += 4096  # the model "starts" a block later
    _resign(bundle, msgspec.json.encode(manifest, order="sorted"), release[2])
    assert refusal(bundle, trust) == "manifest_edited"


def test_a_key_passed_off_under_a_pinned_keys_id_is_refused(bundle: Path, trust: TrustSet) -> None:
    """A record cannot bind a pinned key's id to another public key: ids are key hashes."""
    pinned_id = trust.keys[0].key_id
    thief = SigningKey.generate()
    header = _header(bundle)
    block = msgspec.to_builtins(header.block)
    impostor = {"key_id": pinned_id, "public_key": thief.public.public_key}
    block["records"] = [
        {
            "kind": "rotation",
            "subject": impostor,
            "signer": pinned_id,
            "keeps": [],
            "sig": "0" * 128,
        }
    ]
    block["signatures"] = [{"key_id": pinned_id, "sig": thief.sign(header.manifest).hex()}]
    _rewrite(bundle, header.manifest, msgspec.json.encode(block, order="sorted"))
    assert refusal(bundle, trust) == "bundle_malformed"


def test_a_bundle_signed_by_an_unknown_key_is_untrusted(tmp_path: Path, trust: TrustSet) -> None:
    stranger = tmp_path / "stranger.key"
    SigningKey.generate().save(stranger)
    bundle, _ = make_bundle(tmp_path, signing_key=stranger)
    assert refusal(bundle, trust) == "untrusted_key"


@pytest.mark.parametrize(
    ("constraints", "code"),
    [
        ({"compatible": "aarch64-rpi4"}, "incompatible_hardware"),
        ({"region": "us-east"}, "wrong_region"),
        ({"min_version": "1.2.1"}, "version_below_minimum"),
        ({"min_version": "1.10.0"}, "version_below_minimum"),  # numeric, not string, order
    ],
)
def test_constraints_refuse_with_their_own_code(
    bundle: Path, trust: TrustSet, constraints: dict[str, str], code: str
) -> None:
    assert refusal(bundle, trust, **constraints) == code


def test_cuts_anywhere_are_truncations(bundle: Path, trust: TrustSet) -> None:
    data = bundle.read_bytes()
    header = _header(bundle)
    rootfs = verify_bundle(bundle, trust).rootfs
    manifest_middle = 12 + len(header.manifest) // 2
    cuts = {
        "in the magic": 5,
        "in the manifest length": 10,
        "in the manifest": manifest_middle,
        "in the signature block": header.end - 3,
        "in the padding": header.end + 10,
        "in the rootfs": rootfs.offset + rootfs.size // 2,
        "the last byte": len(data) - 1,
    }
    for where, length in cuts.items():
        bundle.write_bytes(data[:length])
        assert refusal(bundle, trust) == "bundle_truncated", where


def test_bytes_after_the_last_payload_are_malformed(bundle: Path, trust: TrustSet) -> None:
    with bundle.open("ab") as file:
        file.write(b"\0")
    assert refusal(bundle, trust) == "bundle_malformed"


def test_a_file_that_is_not_a_bundle_is_malformed(tmp_path: Path, trust: TrustSet) -> None:
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF" + bytes(100))
    assert refusal(other, trust) == "bundle_malformed"


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("1.2.3", "1.2.4"),
        ("1.9.0", "1.10.0"),
        ("1.0.0-rc.1", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-alpha.2", "1.0.0-alpha.10"),
        ("1.0.0-2", "1.0.0-alpha"),  # numeric identifiers sort before alphanumeric ones
        ("0.9.9", "1.0.0-rc.1"),
    ],
)
def test_semver_precedence(low: str, high: str) -> None:
    assert compare_versions(low, high) == -1
    assert compare_versions(high, low) == 1
    assert compare_versions(high, high) == 0
    assert compare_versions("1.0.0+build.1", "1.0.0+build.2") == 0  # metadata is ignored


def test_a_non_semver_version_is_refused() -> None:
    with pytest.raises(ImageError) as caught:
        compare_versions("1.2", "1.2.0")
    assert caught.value.code == "invalid_version"


def test_cli_verify_prints_the_version_and_refuses_with_the_code(
    bundle: Path, release: tuple[Path, Path, Path]
) -> None:
    good = run_palisade("image", "verify", str(bundle), "--trust", str(release[1]))
    assert good.returncode == 0, good.stderr
    assert "ok: version 1.2.0" in good.stdout
    wrong = run_palisade(
        "image", "verify", str(bundle), "--trust", str(release[1]), "--region", "us-east"
    )
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("error: ")
    assert wrong.stderr.rstrip().endswith("(wrong_region)")


# --- rewriting a bundle's header ----------------------------------------------------------


def _header(path: Path) -> Header:
    with path.open("rb") as file:
        return read_header(file)


def _rewrite(path: Path, manifest: bytes, block: bytes) -> None:
    """Swap the header, keeping every payload byte where it was (the header fits in 4 KiB)."""
    data = path.read_bytes()
    head = header_bytes(manifest, block)
    first_payload = 4096
    assert len(head) <= first_payload
    path.write_bytes(head + bytes(first_payload - len(head)) + data[first_payload:])


def _resign(path: Path, manifest: bytes, key_path: Path) -> None:
    key = SigningKey.load(key_path)
    block = _header(path).block
    block.manifest_sha256 = hashlib.sha256(manifest).hexdigest()
    block.signatures = [Signature(key_id=key.key_id, sig=key.sign(manifest).hex())]
    _rewrite(path, manifest, encode_block(block))
