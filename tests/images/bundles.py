"""Small real bundles for tests: a real squashfs rootfs, a tiny real wheel, a fake model,
a real Ed25519 release key and trust file. About 0.1-0.3 s per bundle.

    bundle, trust = make_bundle(tmp_path, version="1.0.0")
    verified = verify_bundle(bundle, TrustSet.load(trust), region="eu-west")

Every bundle made under one `tmp_path` is signed by the same release key (made on first
use under `tmp_path/release/`) unless `signing_key` says otherwise, so one trust file
accepts them all.
"""

from __future__ import annotations

import itertools
import random
import zipfile
from pathlib import Path

from images._private.build import build_bundle
from images._private.keys import SigningKey, TrustSet

REGION = "eu-west"
COMPATIBLE = "x86_64-pc"
EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z
MODEL_FILE = "tiny.gguf"
_DEFAULT = object()
_counter = itertools.count()


def release_key(tmp_path: Path, name: str = "release") -> tuple[Path, Path]:
    """(private key, trust file pinning it) under `tmp_path/name/`, made on first use."""
    directory = tmp_path / name
    key_path, trust_path = directory / "release.key", directory / "trust.json"
    if not key_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        key.save(key_path)
        TrustSet.of([key.public]).save(trust_path)
    return key_path, trust_path


def tiny_wheel(directory: Path, version: str = "0.1.0") -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD), byte-identical on every call."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"palisade_fixture-{version}-py3-none-any.whl"
    info = f"palisade_fixture-{version}.dist-info"
    files = {
        "palisade_fixture/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: palisade-fixture\nVersion: {version}\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), text)
    return path


def make_bundle(
    tmp_path: Path,
    *,
    version: str = "1.0.0",
    region: str = REGION,
    compatible: str = COMPATIBLE,
    rootfs_size: int = 1 << 20,
    config_template: str | object | None = _DEFAULT,
    signing_key: Path | None = None,
    min_version: str | None = None,
    records: Path | None = None,
    model_size: int = 4096,
    out: Path | None = None,
) -> tuple[Path, Path]:
    """Build a real signed bundle; returns (bundle path, trust file path).

    `rootfs_size`: bytes of incompressible filler in the rootfs (seeded by the version, so
    two versions have different rootfs digests). `config_template`: the node config
    template's text (default: one line pinning `region`); None ships no config payload.
    With `signing_key` given, the trust file returned is the default one of `tmp_path`
    (which may not trust that key: that is for the test to decide).
    """
    key_path, trust_path = release_key(tmp_path)
    source = tmp_path / f"image-src-{next(_counter)}"
    config = _image_config(
        source,
        version=version,
        region=region,
        compatible=compatible,
        rootfs_size=rootfs_size,
        config_template=config_template,
        model_size=model_size,
    )
    bundle = out or tmp_path / "bundles" / f"palisade-{version}-{source.name}.pimg"
    build_bundle(
        config,
        version=version,
        out=bundle,
        signing_key=signing_key or key_path,
        source_date_epoch=EPOCH,
        min_version=min_version,
        records=records,
    )
    return bundle, trust_path


def _image_config(
    source: Path,
    *,
    version: str,
    region: str,
    compatible: str,
    rootfs_size: int,
    config_template: str | object | None,
    model_size: int,
) -> Path:
    tiny_wheel(source / "wheels")
    base = source / "base"
    (base / "usr/lib/palisade-fixture").mkdir(parents=True)
    filler = random.Random(version).randbytes(rootfs_size)
    (base / "usr/lib/palisade-fixture/filler.bin").write_bytes(filler)
    (source / MODEL_FILE).write_bytes(random.Random(f"model-{version}").randbytes(model_size))
    lines = [
        "[image]",
        f'compatible = "{compatible}"',
        f'region = "{region}"',
        "[rootfs]",
        'wheels = "wheels"',
        'base = "base"',
        "[[models]]",
        f'path = "{MODEL_FILE}"',
    ]
    template = f'region = "{region}"\n' if config_template is _DEFAULT else config_template
    if isinstance(template, str):
        (source / "appliance.toml.tmpl").write_text(template)
        lines += ["[node]", 'template = "appliance.toml.tmpl"']
    config = source / "image.toml"
    config.write_text("\n".join(lines) + "\n")
    return config
