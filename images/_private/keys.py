"""Release keys: the Ed25519 keys that sign bundles, and the trust file a node pins.

A trust file (JSON) lists pinned public keys and signed records:

* a *rotation* record says "key N is a release key too", signed by a key the node trusts
  (usually the key it replaces), so a node pinned to the old key learns the new one from a
  record shipped inside a bundle;
* a *revocation* record says "never accept key R again", signed by any key the node trusts
  (through pins and rotations). A revoked key is refused even where it is pinned, and the
  rotations it signed stop counting, except those to the keys every revocation of it lists
  in `keeps` (the successors the operator rotated to before revoking).

Records carry no validity period and verification takes no clock: a device whose clock is
wrong (no RTC, no network yet) verifies exactly as one whose clock is right.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import replace_private, signature_valid, write_private
from images._private.errors import ImageError

KeyId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
PublicHex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
SignatureHex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{128}$")]
RECORD_CONTEXT = b"palisade-release-record\x00"  # records and manifests never share bytes


def key_id_of(public_key: bytes) -> str:
    """A key's id: the first 16 hex digits of the SHA-256 of its raw 32 bytes."""
    return hashlib.sha256(public_key).hexdigest()[:16]


class ReleaseKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A release public key and its id."""

    key_id: KeyId
    public_key: PublicHex

    def __post_init__(self) -> None:
        # Every key, wherever it was decoded from (a trust file, a bundle's records), is
        # named by its own hash: a record cannot pass a new key off under a pinned key's id.
        if key_id_of(self.raw) != self.key_id:
            raise ValueError(f"key id {self.key_id} is not the id of its public key")

    @classmethod
    def of(cls, public_key: bytes) -> ReleaseKey:
        return cls(key_id=key_id_of(public_key), public_key=public_key.hex())

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.public_key)


class Record(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A rotation or revocation of `subject`, signed by the key `signer`."""

    kind: Literal["rotation", "revocation"]
    subject: ReleaseKey
    signer: KeyId
    keeps: tuple[KeyId, ...] = ()  # revocation only: rotations of the subject still honoured
    sig: SignatureHex

    def signed_bytes(self) -> bytes:
        body = msgspec.to_builtins(self)
        del body["sig"]
        return RECORD_CONTEXT + _canonical(body)


class TrustFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: Literal[1] = 1
    keys: list[ReleaseKey] = msgspec.field(default_factory=list)
    records: list[Record] = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class KeyStatus:
    """What a trust set comes to: the keys whose signatures count, and the revoked ones."""

    trusted: dict[str, bytes]
    revoked: frozenset[str]


@dataclass(frozen=True)
class TrustSet:
    """The release keys a node pins, plus the rotation and revocation records it knows."""

    keys: tuple[ReleaseKey, ...]
    records: tuple[Record, ...] = field(default=())

    @classmethod
    def of(cls, keys: Iterable[ReleaseKey | bytes], records: Iterable[Record] = ()) -> TrustSet:
        pinned = tuple(key if isinstance(key, ReleaseKey) else ReleaseKey.of(key) for key in keys)
        return cls(keys=pinned, records=tuple(records))

    @classmethod
    def load(cls, path: Path) -> TrustSet:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(
                f"Trust file {path} cannot be read: {exc.strerror or exc}.",
                code="trust_file_invalid",
            ) from exc
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: bytes, *, source: str = "the trust file") -> TrustSet:
        try:
            parsed = msgspec.json.decode(data, type=TrustFile)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ImageError(
                f"{source} is not a trust file: {exc}.", code="trust_file_invalid"
            ) from exc
        return cls(keys=tuple(parsed.keys), records=tuple(parsed.records))

    def with_records(self, records: Iterable[Record]) -> TrustSet:
        """This trust set plus `records` (e.g. the ones a bundle carries), without repeats."""
        merged = dict.fromkeys((*self.records, *records))
        return TrustSet(keys=self.keys, records=tuple(merged))

    def with_key(self, key: ReleaseKey) -> TrustSet:
        if key in self.keys:
            return self
        return TrustSet(keys=(*self.keys, key), records=self.records)

    def dump(self) -> bytes:
        """The trust file: indented JSON, stable order, for people and `git diff`."""
        body = TrustFile(keys=list(self.keys), records=list(self.records))
        return json.dumps(msgspec.to_builtins(body), indent=2, sort_keys=True).encode() + b"\n"

    def save(self, path: Path) -> None:
        replace_private(path, self.dump())

    def status(self) -> KeyStatus:
        """Resolve pins and records (see the module docstring); no clock is involved."""
        known = {record.subject.key_id: record.subject for record in self.records}
        known.update({key.key_id: key for key in self.keys})
        genuine = [record for record in self.records if _record_valid(record, known)]
        rotations = [record for record in genuine if record.kind == "rotation"]
        # Who may sign a revocation: every key reachable by any rotation, revoked or not.
        reachable = _closure({key.key_id for key in self.keys}, rotations)
        revocations = [
            record
            for record in genuine
            if record.kind == "revocation" and record.signer in reachable
        ]
        revoked = frozenset(record.subject.key_id for record in revocations)
        keeps = _kept_successors(revocations)
        honoured = [
            record
            for record in rotations
            if record.signer not in revoked or record.subject.key_id in keeps[record.signer]
        ]
        trusted = _closure({key.key_id for key in self.keys}, honoured) - revoked
        return KeyStatus(trusted={kid: known[kid].raw for kid in sorted(trusted)}, revoked=revoked)


def _record_valid(record: Record, known: dict[str, ReleaseKey]) -> bool:
    signer = known.get(record.signer)
    if signer is None:
        return False
    return signature_valid(signer.raw, bytes.fromhex(record.sig), record.signed_bytes())


def _closure(roots: set[str], rotations: Sequence[Record]) -> set[str]:
    reached = set(roots)
    grew = True
    while grew:
        grew = False
        for record in rotations:
            if record.signer in reached and record.subject.key_id not in reached:
                reached.add(record.subject.key_id)
                grew = True
    return reached


def _kept_successors(revocations: Sequence[Record]) -> dict[str, frozenset[str]]:
    """Per revoked key, the successors that EVERY revocation of it keeps: a revocation made
    with a stolen key cannot add its own successor to the operator's list."""
    kept: dict[str, frozenset[str]] = {}
    for record in revocations:
        subject = record.subject.key_id
        own = frozenset(record.keeps)
        kept[subject] = kept[subject] & own if subject in kept else own
    return _DefaultEmpty(kept)


class _DefaultEmpty(dict[str, frozenset[str]]):
    def __missing__(self, key: str) -> frozenset[str]:
        return frozenset()


class SigningKey:
    """A release private key (PEM, PKCS#8, kept 0600); its public half goes in trust files."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = ReleaseKey.of(raw)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise ImageError(
                f"Signing key {path} cannot be read: {exc.strerror or exc}.",
                code="signing_key_invalid",
            ) from exc
        except (ValueError, TypeError) as exc:
            raise ImageError(
                f"Signing key {path} is not an unencrypted PEM private key.",
                code="signing_key_invalid",
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ImageError(
                f"Signing key {path} is a {type(key).__name__}; release keys are Ed25519.",
                code="signing_key_invalid",
            )
        return cls(key)

    def save(self, path: Path) -> None:
        if path.exists():
            raise ImageError(
                f"{path} already exists; a release key is never overwritten.", code="key_exists"
            )
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def endorse(self, successor: ReleaseKey) -> Record:
        """A rotation record: `successor` is a release key too."""
        return self._record("rotation", successor, ())

    def revoke(self, subject: ReleaseKey, keeps: Iterable[str] = ()) -> Record:
        """A revocation record for `subject`, keeping its rotations to `keeps`."""
        return self._record("revocation", subject, tuple(sorted(set(keeps))))

    def _record(
        self, kind: Literal["rotation", "revocation"], subject: ReleaseKey, keeps: tuple[str, ...]
    ) -> Record:
        unsigned = Record(
            kind=kind, subject=subject, signer=self.key_id, keeps=keeps, sig="0" * 128
        )
        return msgspec.structs.replace(unsigned, sig=self.sign(unsigned.signed_bytes()).hex())

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id})"


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def node_trust_file(home: Path) -> Path:
    """Where a node keeps the release keys it pins: `<PALISADE_HOME>/image/trust.json`."""
    return home / "image" / "trust.json"


def default_trust_file() -> Path:
    """The trust file of `$PALISADE_HOME` (the commands' default for `--trust`)."""
    return node_trust_file(Path(os.environ.get("PALISADE_HOME", "var")).resolve())
