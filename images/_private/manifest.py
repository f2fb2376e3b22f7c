"""A bundle's manifest: what it holds, for which hardware and region, signed as exact bytes.

The manifest is canonical JSON (sorted keys, no whitespace, fields left at their default
omitted), so the bytes a release key signs are a function of the content alone. Versions
are semantic versions (2.0.0 precedence: pre-releases sort before the release, build
metadata is ignored); `compare_versions` is what the boot state's MIN_VERSION uses too.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from images._private.errors import ImageError

FORMAT: Final = 1
BLOCK_SIZE: Final = 4096
PayloadKind = Literal["rootfs", "model", "config"]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
HexBytes = Annotated[str, Meta(pattern=r"^([0-9a-f]{2}){1,256}$")]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Label = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]

_SEMVER = re.compile(
    r"^(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
Version = Annotated[str, Meta(pattern=_SEMVER.pattern, max_length=64)]


class HashTree(Struct, forbid_unknown_fields=True, kw_only=True):
    """The dm-verity (format 1, no superblock) hash tree of a rootfs payload: its root."""

    algorithm: Literal["sha256"] = "sha256"
    block_size: Literal[4096] = BLOCK_SIZE
    salt: HexBytes
    root: Sha256Hex


class Payload(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One payload: `size` bytes at `offset` (4096-aligned) of the bundle file."""

    name: Name
    kind: PayloadKind
    offset: Annotated[int, Meta(ge=0)]
    size: Annotated[int, Meta(ge=0)]
    sha256: Sha256Hex
    hash_tree: HashTree | None = None  # rootfs only
    digest: Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None  # model only
    path: Annotated[str, Meta(pattern=r"^models/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] | None = (
        None  # model only: where it goes under the node's data directory
    )

    @property
    def end(self) -> int:
        return self.offset + self.size


class Manifest(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What a bundle is: its version, the hardware class and region it is for, its payloads."""

    format: Literal[1] = FORMAT
    version: Version
    compatible: Label
    region: Label
    created: Annotated[str, Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")]
    min_version: Version | None = None
    payloads: Annotated[list[Payload], Meta(min_length=1, max_length=64)]

    @property
    def rootfs(self) -> Payload:
        return next(each for each in self.payloads if each.kind == "rootfs")

    @property
    def models(self) -> list[Payload]:
        return [each for each in self.payloads if each.kind == "model"]

    @property
    def config(self) -> Payload | None:
        return next((each for each in self.payloads if each.kind == "config"), None)

    def payload(self, name: str) -> Payload:
        for each in self.payloads:
            if each.name == name:
                return each
        raise KeyError(name)


_DECODER = msgspec.json.Decoder(Manifest)
_ENCODER = msgspec.json.Encoder(order="sorted")


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes of `manifest`: the bytes that are signed."""
    return _ENCODER.encode(manifest)


def decode_manifest(data: bytes) -> Manifest:
    """Parse manifest bytes; a manifest that is not exactly canonical is refused, so one
    manifest has one byte string."""
    try:
        manifest = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ImageError(
            f"The bundle's manifest is not valid: {exc}.", code="bundle_malformed"
        ) from exc
    if encode_manifest(manifest) != data:
        raise ImageError(
            "The bundle's manifest is not in canonical form (sorted keys, no spaces).",
            code="bundle_malformed",
        )
    if sum(each.kind == "rootfs" for each in manifest.payloads) != 1:
        raise ImageError("A bundle has exactly one rootfs payload.", code="bundle_malformed")
    return manifest


def check_version(version: str) -> str:
    """`version` if it is a semantic version, else ImageError `invalid_version`."""
    if not _SEMVER.match(version) or len(version) > 64:
        raise ImageError(
            f"Version {version!r} is not a semantic version such as 1.4.0 or 1.4.0-rc.1.",
            code="invalid_version",
        )
    return version


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as semantic version `a` is lower than, equal to or higher than `b`."""
    key_a, key_b = _precedence(a), _precedence(b)
    return (key_a > key_b) - (key_a < key_b)


PreKey = tuple[tuple[int, int, str], ...]


def _precedence(version: str) -> tuple[int, int, int, int, PreKey]:
    match = _SEMVER.match(check_version(version))
    assert match is not None  # check_version matched it
    core = (int(match["major"]), int(match["minor"]), int(match["patch"]))
    if match["pre"] is None:
        return (*core, 1, ())  # a release sorts after all of its pre-releases
    # Numeric identifiers sort numerically and before alphanumeric ones.
    parts = tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in match["pre"].split(".")
    )
    return (*core, 0, parts)
