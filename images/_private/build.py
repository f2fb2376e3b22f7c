"""`palisade image build`: an image config in, one signed deterministic bundle out.

The rootfs is a squashfs of the base OS tree (if any) overlaid with the wheelhouse, its
lock, the systemd units, the node config template and `/etc/palisade/image.json`.
mksquashfs runs single-threaded with every owner, timestamp and xattr fixed, so the same
inputs and SOURCE_DATE_EPOCH give the same bytes whatever the files' mtimes, the umask or
the directory the build runs in. Models and the config template are payloads of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct

from federation import file_sha256
from images._private.bundle import (
    CHUNK,
    Signature,
    SignatureBlock,
    encode_block,
    header_bytes,
    header_length,
    payload_offsets,
    write_bundle,
)
from images._private.errors import ImageError
from images._private.hashtree import HashTreeBuilder
from images._private.keys import Record, SigningKey, TrustSet
from images._private.manifest import (
    HashTree,
    Label,
    Manifest,
    Payload,
    PayloadKind,
    Sha256Hex,
    check_version,
    decode_manifest,
    encode_manifest,
)

_MODEL_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UNITS = Path(__file__).resolve().parent.parent / "units"
_WHEEL = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.!+]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$"
)


class ImageSection(Struct, forbid_unknown_fields=True, kw_only=True):
    compatible: Label
    region: Label


class RootfsSection(Struct, forbid_unknown_fields=True, kw_only=True):
    wheels: str
    base: str | None = None
    units: str | None = None


class ModelEntry(Struct, forbid_unknown_fields=True, kw_only=True):
    path: str
    sha256: Sha256Hex | None = None


class NodeSection(Struct, forbid_unknown_fields=True, kw_only=True):
    template: str


class ImageConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The image config (`appliance.toml` of a release): what goes into the bundle."""

    image: ImageSection
    rootfs: RootfsSection
    models: list[ModelEntry] = msgspec.field(default_factory=list)
    node: NodeSection | None = None


@dataclass(frozen=True)
class _Part:
    """A payload before the layout gives it an offset."""

    name: str
    kind: PayloadKind
    source: Path
    size: int
    sha256: str
    extra: dict[str, Any]

    def payload(self, offset: int) -> Payload:
        return Payload(
            name=self.name,
            kind=self.kind,
            offset=offset,
            size=self.size,
            sha256=self.sha256,
            **self.extra,
        )


def build_bundle(
    config: Path,
    *,
    version: str,
    out: Path,
    signing_key: Path,
    source_date_epoch: int,
    min_version: str | None = None,
    records: Path | None = None,
) -> Manifest:
    """Build and sign the bundle described by the image config `config` into `out`.

    `records`: a trust file whose rotation and revocation records ship inside the bundle.
    Nothing is written to `out` unless the whole bundle is.
    """
    check_version(version)
    if min_version is not None:
        check_version(min_version)
    if source_date_epoch < 0:
        raise ImageError("SOURCE_DATE_EPOCH must be 0 or more.", code="image_config_invalid")
    image = _load_config(config)
    key = SigningKey.load(signing_key)
    shipped = TrustSet.load(records).records if records else ()
    base_dir = config.resolve().parent
    template = _template(image, base_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".palisade-build-", dir=out.parent) as work:
        scratch = Path(work)
        rootfs = _rootfs(
            image,
            base_dir=base_dir,
            template=template,
            version=version,
            scratch=scratch,
            epoch=source_date_epoch,
        )
        parts = [rootfs, *_models(image, base_dir)]
        if template is not None:
            parts.append(_config_part(template, scratch))

        def manifest_at(offsets: list[int]) -> Manifest:
            return Manifest(
                version=version,
                compatible=image.image.compatible,
                region=image.image.region,
                created=_created(source_date_epoch),
                min_version=min_version,
                payloads=[
                    part.payload(offset) for part, offset in zip(parts, offsets, strict=True)
                ],
            )

        manifest, header = _sign(manifest_at, [part.size for part in parts], key, list(shipped))
        payloads = [
            (payload, part.source) for payload, part in zip(manifest.payloads, parts, strict=True)
        ]
        write_bundle(out, header, payloads)
    return manifest


def _load_config(path: Path) -> ImageConfig:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ImageError(
            f"Image config {path} cannot be read: {exc.strerror or exc}.",
            code="image_config_invalid",
        ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ImageError(
            f"Image config {path} is not valid TOML: {exc}.", code="image_config_invalid"
        ) from exc
    try:
        return msgspec.convert(data, ImageConfig)
    except msgspec.ValidationError as exc:
        raise ImageError(f"Image config {path}: {exc}.", code="image_config_invalid") from exc


def _template(image: ImageConfig, base_dir: Path) -> bytes | None:
    """The node config template, whose `region` must be the image's region."""
    if image.node is None:
        return None
    path = base_dir / image.node.template
    data = _read(path, "node config template")
    try:
        region = tomllib.loads(data.decode()).get("region")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ImageError(
            f"Node config template {path} is not valid TOML: {exc}.", code="image_config_invalid"
        ) from exc
    if region != image.image.region:
        raise ImageError(
            f"Node config template {path} pins region {region!r} but the image is for "
            f'{image.image.region!r}; set `region = "{image.image.region}"` in the template.',
            code="config_region_mismatch",
        )
    return data


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(
            f"The {what} {path} cannot be read: {exc.strerror or exc}.", code="image_config_invalid"
        ) from exc


def _rootfs(
    image: ImageConfig,
    *,
    base_dir: Path,
    template: bytes | None,
    version: str,
    scratch: Path,
    epoch: int,
) -> _Part:
    tree = scratch / "rootfs"
    if image.rootfs.base:
        base = base_dir / image.rootfs.base
        if not base.is_dir():
            raise ImageError(f"Rootfs base {base} is not a directory.", code="image_config_invalid")
        _copy_tree(base, tree)
    tree.mkdir(exist_ok=True)
    tree.chmod(0o755)
    wheels = _wheels(base_dir / image.rootfs.wheels)
    for wheel in wheels:
        _place(tree / "opt/palisade/wheels" / wheel.name, wheel.read_bytes())
    _place(tree / "opt/palisade/requirements.lock", _lock(wheels))
    for unit in _units(base_dir / image.rootfs.units if image.rootfs.units else UNITS):
        _place(tree / "etc/systemd/system" / unit.name, unit.read_bytes())
    if template is not None:
        _place(tree / "etc/palisade/appliance.toml.tmpl", template)
    facts = {"compatible": image.image.compatible, "region": image.image.region, "version": version}
    _place(tree / "etc/palisade/image.json", json.dumps(facts, sort_keys=True).encode() + b"\n")
    squashfs = scratch / "rootfs.squashfs"
    _mksquashfs(tree, squashfs, epoch)
    sha256 = file_sha256(squashfs)
    salt = hashlib.sha256(b"palisade-verity-salt\0" + bytes.fromhex(sha256)).hexdigest()
    tree_builder = HashTreeBuilder(bytes.fromhex(salt))
    with squashfs.open("rb") as file:
        while chunk := file.read(CHUNK):
            tree_builder.update(chunk)
    hash_tree = HashTree(salt=salt, root=tree_builder.root())
    return _Part(
        "rootfs", "rootfs", squashfs, squashfs.stat().st_size, sha256, {"hash_tree": hash_tree}
    )


def _copy_tree(base: Path, tree: Path) -> None:
    """Copy an OS tree as it is: device nodes, owners, modes, links (`cp -a`; Python's
    copytree would read `/dev/full` or `/dev/zero` as if they were files)."""
    tree.mkdir()
    command = [shutil.which("cp") or "/bin/cp", "-a", "--", f"{base}/.", str(tree)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise ImageError(
            f"The rootfs base {base} could not be copied: {done.stderr.strip()[-500:]}",
            code="build_failed",
        )


def _wheels(directory: Path) -> list[Path]:
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise ImageError(
            f"The wheelhouse {directory} holds no *.whl files.", code="image_config_invalid"
        )
    for wheel in wheels:
        if not _WHEEL.match(wheel.name):
            raise ImageError(f"{wheel.name} is not a wheel file name.", code="image_config_invalid")
    return wheels


def _units(directory: Path) -> list[Path]:
    units = sorted(directory.glob("palisade-*.service"))
    if not units:
        raise ImageError(
            f"{directory} holds no palisade-*.service units for the image.",
            code="image_config_invalid",
        )
    return units


def _lock(wheels: list[Path]) -> bytes:
    """`name==version` of every wheel, names normalized (PEP 503), sorted."""
    lines = set()
    for wheel in wheels:
        match = _WHEEL.match(wheel.name)
        assert match is not None  # _wheels checked the names
        name = re.sub(r"[-_.]+", "-", match["name"]).lower()
        lines.add(f"{name}=={match['version']}\n")
    return "".join(sorted(lines)).encode()


def _place(path: Path, data: bytes) -> None:
    """Write a file of the image with fixed modes (the build's umask must not show)."""
    for parent in reversed([each for each in path.parents if not each.exists()]):
        parent.mkdir()
        parent.chmod(0o755)
    path.write_bytes(data)
    path.chmod(0o644)


def _mksquashfs(tree: Path, out: Path, epoch: int) -> None:
    if shutil.which("mksquashfs") is None:
        raise ImageError(
            "mksquashfs is not installed; run `make system-deps` (Debian: squashfs-tools).",
            code="build_failed",
        )
    environment = {name: value for name, value in os.environ.items() if name != "SOURCE_DATE_EPOCH"}
    command = [
        "mksquashfs", str(tree), str(out), "-all-root", "-noappend", "-no-xattrs",
        "-mkfs-time", str(epoch), "-all-time", str(epoch), "-processors", "1",
        "-quiet", "-no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)  # noqa: S603
    if result.returncode != 0:
        raise ImageError(f"mksquashfs failed: {result.stderr.strip()[-500:]}", code="build_failed")


def _models(image: ImageConfig, base_dir: Path) -> list[_Part]:
    parts = []
    for entry in image.models:
        path = base_dir / entry.path
        if not path.is_file():
            raise ImageError(f"Model {path} does not exist.", code="image_config_invalid")
        if not _MODEL_FILE.match(path.name):
            raise ImageError(
                f"Model file name {path.name!r} cannot travel in a bundle: use letters, digits, "
                "'.', '_' and '-' (at most 128).",
                code="image_config_invalid",
            )
        sha256 = file_sha256(path)
        if entry.sha256 is not None and entry.sha256 != sha256:
            raise ImageError(
                f"Model {path} has SHA-256 {sha256}, not the {entry.sha256} the image config pins.",
                code="model_digest_mismatch",
            )
        extra = {"digest": f"sha256:{sha256}", "path": f"models/{path.name}"}
        parts.append(_Part(f"model-{path.name}", "model", path, path.stat().st_size, sha256, extra))
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ImageError("Two models share a file name.", code="image_config_invalid")
    return parts


def _config_part(template: bytes, scratch: Path) -> _Part:
    path = scratch / "appliance.toml.tmpl"
    path.write_bytes(template)
    return _Part("config", "config", path, len(template), hashlib.sha256(template).hexdigest(), {})


def _sign(
    manifest_at: Callable[[list[int]], Manifest],
    sizes: list[int],
    key: SigningKey,
    records: list[Record],
) -> tuple[Manifest, bytes]:
    """Lay the payloads out after a header that holds their offsets (a fixed point: the
    offsets' digits change the manifest's length), then sign the manifest bytes."""
    offsets = [0] * len(sizes)
    placeholder = [Signature(key_id=key.key_id, sig="0" * 128)]
    while True:
        manifest = manifest_at(offsets)
        data = encode_manifest(manifest)
        block = SignatureBlock(
            manifest_sha256=hashlib.sha256(data).hexdigest(),
            signatures=placeholder,
            records=records,
        )
        laid_out = payload_offsets(header_length(data, encode_block(block)), sizes)
        if laid_out == offsets:
            break
        offsets = laid_out
    _check_decodable(data)
    block.signatures = [Signature(key_id=key.key_id, sig=key.sign(data).hex())]
    return manifest, header_bytes(data, encode_block(block))


def _check_decodable(manifest: bytes) -> None:
    """Never sign a manifest a node would refuse (a model file name the format cannot carry)."""
    try:
        decode_manifest(manifest)
    except ImageError as exc:
        raise ImageError(
            f"The image config yields an invalid manifest: {exc.message}",
            code="image_config_invalid",
        ) from exc


def _created(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
