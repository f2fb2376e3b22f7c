"""`verify_bundle`: everything a node checks before a bundle's bytes go anywhere.

Order: the header parses; the manifest is the one the signature block was made for; a
trusted, unrevoked key signed it; its constraints fit this node (hardware class, region,
minimum version); the payload table describes this very file (aligned, contiguous, ending
exactly at the end of the file); then every payload is re-hashed (SHA-256, and the rootfs's
dm-verity root) and the padding between payloads is zeros. Nothing is written, and no
clock is consulted.

A verified bundle is a statement about the file at the time it was read: whoever then
copies a payload (flash) re-checks the bytes it wrote against the manifest's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from federation import signature_valid
from images._private.bundle import (
    CHUNK,
    Header,
    PayloadReader,
    SignatureBlock,
    align,
    iter_range,
    read_header,
)
from images._private.errors import ImageError
from images._private.hashtree import HashTreeBuilder
from images._private.keys import Record, TrustSet
from images._private.manifest import Manifest, Payload, compare_versions, decode_manifest

_ZERO = bytes(CHUNK)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, constraints and payloads all checked out."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signed_by: str  # the key id whose signature was accepted
    records: tuple[Record, ...]  # the key records the bundle carries

    @property
    def rootfs(self) -> Payload:
        return self.manifest.rootfs

    @property
    def models(self) -> list[Payload]:
        return self.manifest.models

    @property
    def config(self) -> Payload | None:
        return self.manifest.config

    def payload(self, name: str) -> Payload:
        try:
            return self.manifest.payload(name)
        except KeyError:
            raise ImageError(
                f"The bundle has no payload {name!r}.", code="no_such_payload"
            ) from None

    def iter_payload(self, name: str, chunk: int = CHUNK) -> Iterator[bytes]:
        payload = self.payload(name)
        return iter_range(self.path, payload.offset, payload.size, chunk)

    def open_payload(self, name: str) -> BinaryIO:
        """A read-only file whose contents are exactly the payload `name`."""
        payload = self.payload(name)
        return cast(
            BinaryIO, io.BufferedReader(PayloadReader(self.path, payload.offset, payload.size))
        )


def verify_bundle(
    path: Path,
    trust: TrustSet,
    *,
    compatible: str | None = None,
    region: str | None = None,
    min_version: str | None = None,
) -> VerifiedBundle:
    """Check the bundle at `path` against `trust` and the node's constraints; ImageError
    with its own `code` for each way it can fail (docs/images.md lists them)."""
    try:
        with path.open("rb") as file:
            header = read_header(file)
    except OSError as exc:
        raise ImageError(
            f"Bundle {path} cannot be read: {exc.strerror or exc}.", code="bundle_unreadable"
        ) from exc
    signed_by = _check_signature(header.manifest, header.block, trust)
    manifest = decode_manifest(header.manifest)
    _check_constraints(manifest, compatible=compatible, region=region, min_version=min_version)
    _check_layout(manifest, header)
    _check_payloads(path, manifest, header.end)
    return VerifiedBundle(
        path=path,
        manifest=manifest,
        manifest_bytes=header.manifest,
        signed_by=signed_by,
        records=tuple(header.block.records),
    )


def _check_signature(manifest: bytes, block: SignatureBlock, trust: TrustSet) -> str:
    """The id of a trusted key with a valid signature over `manifest`, else the reason."""
    if hashlib.sha256(manifest).hexdigest() != block.manifest_sha256:
        raise ImageError(
            "The bundle's manifest is not the one that was signed: it was edited after signing.",
            code="manifest_edited",
        )
    status = trust.with_records(block.records).status()
    bad = None
    for signature in block.signatures:
        key = status.trusted.get(signature.key_id)
        if key is not None:
            if signature_valid(key, bytes.fromhex(signature.sig), manifest):
                return signature.key_id
            bad = signature.key_id
    ids = ", ".join(signature.key_id for signature in block.signatures) or "none"
    if bad is not None:
        raise ImageError(
            f"The signature of release key {bad} does not match the bundle's manifest.",
            code="bad_signature",
        )
    if any(signature.key_id in status.revoked for signature in block.signatures):
        raise ImageError(
            f"The bundle is signed by a revoked release key ({ids}).", code="revoked_key"
        )
    raise ImageError(
        f"The bundle is signed by a key this node does not trust ({ids}); pin it in the trust "
        "file or ship a rotation record from a trusted key.",
        code="untrusted_key",
    )


def _check_constraints(
    manifest: Manifest, *, compatible: str | None, region: str | None, min_version: str | None
) -> None:
    if compatible is not None and manifest.compatible != compatible:
        raise ImageError(
            f"The bundle is for hardware {manifest.compatible!r}; this node is {compatible!r}.",
            code="incompatible_hardware",
        )
    if region is not None and manifest.region != region:
        raise ImageError(
            f"The bundle is pinned to region {manifest.region!r}; this node is enrolled in "
            f"{region!r}.",
            code="wrong_region",
        )
    if min_version is not None and compare_versions(manifest.version, min_version) < 0:
        raise ImageError(
            f"The bundle's version {manifest.version} is below this node's minimum "
            f"{min_version}: downgrades past a committed release are refused.",
            code="version_below_minimum",
        )


def _check_layout(manifest: Manifest, header: Header) -> None:
    """The signed payload table must describe this file exactly."""
    position = header.end
    names: set[str] = set()
    for payload in manifest.payloads:
        problem = _payload_problem(payload, position, names)
        if problem:
            raise ImageError(
                f"The bundle's payload table is inconsistent: {problem}.", code="manifest_edited"
            )
        names.add(payload.name)
        position = payload.end
    if header.file_size < position:
        raise ImageError(
            f"The bundle ends early: {header.file_size} bytes of the {position} its manifest "
            "describes; it was cut short in transfer or on disk.",
            code="bundle_truncated",
        )
    if header.file_size > position:
        raise ImageError(
            f"The bundle has {header.file_size - position} bytes after its last payload.",
            code="bundle_malformed",
        )


def _payload_problem(payload: Payload, position: int, names: set[str]) -> str | None:
    if payload.name in names:
        return f"payload {payload.name!r} appears twice"
    if payload.offset != align(position):
        return f"payload {payload.name!r} starts at {payload.offset}, not at {align(position)}"
    if (payload.kind == "rootfs") != (payload.hash_tree is not None):
        return f"payload {payload.name!r}: only the rootfs has a hash tree"
    if (payload.kind == "model") != (payload.path is not None and payload.digest is not None):
        return f"payload {payload.name!r}: a model (and only a model) has a path and a digest"
    if payload.digest is not None and payload.digest != f"sha256:{payload.sha256}":
        return f"payload {payload.name!r}: its digest is not its SHA-256"
    return None


def _check_payloads(path: Path, manifest: Manifest, header_end: int) -> None:
    position = header_end
    for payload in manifest.payloads:
        _check_padding(path, position, payload.offset)
        digest = hashlib.sha256()
        tree = HashTreeBuilder(bytes.fromhex(payload.hash_tree.salt)) if payload.hash_tree else None
        for chunk in iter_range(path, payload.offset, payload.size):
            digest.update(chunk)
            if tree is not None:
                tree.update(chunk)
        if digest.hexdigest() != payload.sha256:
            raise ImageError(
                f"Payload {payload.name!r} does not match its SHA-256 in the signed manifest: "
                "the bundle's bytes were changed or damaged.",
                code="payload_hash_mismatch",
            )
        if (
            tree is not None
            and payload.hash_tree is not None
            and tree.root() != payload.hash_tree.root
        ):
            raise ImageError(
                f"Payload {payload.name!r} does not match its hash tree root in the manifest.",
                code="payload_hash_mismatch",
            )
        position = payload.end


def _check_padding(path: Path, start: int, end: int) -> None:
    if any(chunk != _ZERO[: len(chunk)] for chunk in iter_range(path, start, end - start)):
        raise ImageError(
            "The padding between the bundle's payloads is not zeros.", code="bundle_malformed"
        )
