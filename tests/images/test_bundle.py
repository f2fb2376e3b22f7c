"""Building bundles: byte-identical rebuilds, what the rootfs holds, a dm-verity root that
veritysetup agrees with, and refusals that write nothing."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from images import ImageError, TrustSet, build_bundle, verify_bundle
from images._private.bundle import MAGIC
from images._private.hashtree import HashTreeBuilder
from tests.images.bundles import EPOCH, MODEL_FILE, make_bundle, release_key
from tests.support import run_palisade


def image_source(tmp_path: Path, version: str = "1.0.0") -> Path:
    """The image config of a small bundle (made by make_bundle), to build again by hand."""
    make_bundle(tmp_path, version=version, rootfs_size=64 * 1024)
    return max(tmp_path.glob("image-src-*"), key=lambda path: path.stat().st_mtime_ns)


def build(config: Path, out: Path, key: Path, version: str = "1.0.0") -> Path:
    build_bundle(config, version=version, out=out, signing_key=key, source_date_epoch=EPOCH)
    return out


def retouch(tree: Path, mtime: int) -> None:
    """Give every file and directory of `tree` the mtime `mtime`."""
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (mtime, mtime))


def test_two_builds_of_the_same_inputs_are_byte_identical(tmp_path: Path) -> None:
    key, _ = release_key(tmp_path)
    source = image_source(tmp_path)
    elsewhere = Path(shutil.copytree(source, tmp_path / "elsewhere" / "deeper"))
    retouch(source, 1_000_000_000)
    retouch(elsewhere, 2_000_000_000)
    first = build(source / "image.toml", tmp_path / "out-1" / "a.pimg", key)
    old_umask = os.umask(0o077)
    try:
        second = build(elsewhere / "image.toml", tmp_path / "out-2" / "b.pimg", key)
    finally:
        os.umask(old_umask)
    assert first.read_bytes() == second.read_bytes()
    other_version = build(source / "image.toml", tmp_path / "out-3" / "c.pimg", key, "1.0.1")
    assert other_version.read_bytes() != first.read_bytes()


def test_the_rootfs_holds_wheels_lock_units_template_and_image_facts(tmp_path: Path) -> None:
    bundle, trust = make_bundle(tmp_path, version="1.3.0", rootfs_size=4096)
    verified = verify_bundle(bundle, TrustSet.load(trust))
    squashfs = tmp_path / "rootfs.squashfs"
    squashfs.write_bytes(b"".join(verified.iter_payload("rootfs")))
    tree = tmp_path / "unpacked"
    subprocess.run(
        ["unsquashfs", "-no-xattrs", "-d", str(tree), str(squashfs)],
        check=True,
        capture_output=True,
    )
    assert (tree / "opt/palisade/requirements.lock").read_text() == "palisade-fixture==0.1.0\n"
    assert [wheel.name for wheel in (tree / "opt/palisade/wheels").iterdir()] == [
        "palisade_fixture-0.1.0-py3-none-any.whl"
    ]
    units = sorted(unit.name for unit in (tree / "etc/systemd/system").iterdir())
    assert units == ["palisade-appliance.service", "palisade-image-agent.service"]
    assert (tree / "etc/palisade/appliance.toml.tmpl").read_text() == 'region = "eu-west"\n'
    assert (tree / "etc/palisade/image.json").read_text() == (
        '{"compatible": "x86_64-pc", "region": "eu-west", "version": "1.3.0"}\n'
    )
    model = verified.models[0]
    assert model.path == f"models/{MODEL_FILE}"
    assert model.digest == f"sha256:{model.sha256}"
    assert not list(tree.rglob(MODEL_FILE))  # models travel beside the rootfs, not in it


def test_veritysetup_computes_the_same_hash_tree_root(tmp_path: Path) -> None:
    bundle, trust = make_bundle(tmp_path, rootfs_size=700 * 1024)  # > 128 blocks: two levels
    verified = verify_bundle(bundle, TrustSet.load(trust))
    hash_tree = verified.rootfs.hash_tree
    assert hash_tree is not None
    data = tmp_path / "rootfs.img"
    data.write_bytes(b"".join(verified.iter_payload("rootfs")))
    hashes = tmp_path / "rootfs.verity"
    formatted = subprocess.run(
        ["veritysetup", "format", "--data-block-size", "4096", "--hash-block-size", "4096",
         "--salt", hash_tree.salt, "--no-superblock", str(data), str(hashes)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    root = next(
        line.split(":", 1)[1].strip()
        for line in formatted.stdout.splitlines()
        if line.startswith("Root hash:")
    )
    assert root == hash_tree.root
    # Our own tree, laid out as dm-verity expects, passes `veritysetup verify` ...
    builder = HashTreeBuilder(bytes.fromhex(hash_tree.salt))
    builder.update(data.read_bytes())
    ours = tmp_path / "ours.verity"
    ours.write_bytes(builder.tree())
    assert _verity_verify(data, ours, hash_tree.salt, hash_tree.root)
    # ... and stops passing when one byte of the data changes.
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 3] ^= 0x01
    data.write_bytes(bytes(damaged))
    assert not _verity_verify(data, ours, hash_tree.salt, hash_tree.root)


def _verity_verify(data: Path, hashes: Path, salt: str, root: str) -> bool:
    result = subprocess.run(
        ["veritysetup", "verify", "--no-superblock", "--data-block-size", "4096",
         "--hash-block-size", "4096", "--salt", salt, str(data), str(hashes), root],
        capture_output=True, check=False,
    )  # fmt: skip
    return result.returncode == 0


def test_the_template_region_must_be_the_image_region(tmp_path: Path) -> None:
    out = tmp_path / "bad.pimg"
    with pytest.raises(ImageError) as caught:
        make_bundle(tmp_path, region="eu-west", config_template='region = "us-east"\n', out=out)
    assert caught.value.code == "config_region_mismatch"
    assert not out.exists()
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]


def test_a_model_that_does_not_match_its_pinned_digest_is_refused(tmp_path: Path) -> None:
    key, _ = release_key(tmp_path)
    source = image_source(tmp_path)
    config = source / "image.toml"
    config.write_text(
        config.read_text().replace(
            f'path = "{MODEL_FILE}"', f'path = "{MODEL_FILE}"\nsha256 = "{"0" * 64}"'
        )
    )
    out = tmp_path / "out" / "x.pimg"
    with pytest.raises(ImageError) as caught:
        build(config, out, key)
    assert caught.value.code == "model_digest_mismatch"
    assert not out.exists()


def test_cli_build_writes_a_verifiable_bundle_and_refuses_with_the_code(tmp_path: Path) -> None:
    key, trust = release_key(tmp_path)
    config = image_source(tmp_path) / "image.toml"
    out = tmp_path / "cli.pimg"
    built = run_palisade(
        "image", "build", str(config), "--version", "2.1.0", "--out", str(out), "--key", str(key),
        env={"SOURCE_DATE_EPOCH": str(EPOCH)},
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "version 2.1.0" in built.stdout
    assert out.read_bytes().startswith(MAGIC)
    same = tmp_path / "api.pimg"
    assert build(config, same, key, "2.1.0").read_bytes() == out.read_bytes()
    assert verify_bundle(out, TrustSet.load(trust)).manifest.created == "2026-01-01T00:00:00Z"

    refused_out = tmp_path / "refused.pimg"
    refused = run_palisade(
        "image", "build", str(config), "--version", "2.1", "--out", str(refused_out),
        "--key", str(key),
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.rstrip().endswith("(invalid_version)")
    assert not refused_out.exists()


def test_a_model_name_the_format_cannot_carry_is_refused_at_build(tmp_path: Path) -> None:
    key, _ = release_key(tmp_path)
    source = image_source(tmp_path)
    (source / MODEL_FILE).rename(source / "my model.gguf")
    config = source / "image.toml"
    config.write_text(config.read_text().replace(MODEL_FILE, "my model.gguf"))
    out = tmp_path / "out" / "x.pimg"
    with pytest.raises(ImageError) as caught:
        build(config, out, key)
    assert caught.value.code == "image_config_invalid"
    assert "'my model.gguf'" in caught.value.message
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_base_tree_keeps_its_device_nodes_and_links_as_they_are(tmp_path: Path) -> None:
    """An OS tree carries /dev/null-like nodes: they go into the squashfs as nodes, never
    read as files (reading /dev/zero as a file would fill the disk)."""
    source = image_source(tmp_path)
    dev = source / "base" / "dev"
    dev.mkdir()
    os.mknod(dev / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    (dev / "zero").chmod(0o666)  # mknod's mode passes through the umask
    (source / "base" / "usr/lib/link").symlink_to("palisade-fixture/filler.bin")
    key, trust = release_key(tmp_path)
    bundle = build(source / "image.toml", tmp_path / "dev.pimg", key)
    squashfs = tmp_path / "rootfs.squashfs"
    squashfs.write_bytes(
        b"".join(verify_bundle(bundle, TrustSet.load(trust)).iter_payload("rootfs"))
    )
    listing = subprocess.run(
        ["unsquashfs", "-lls", str(squashfs)], check=True, capture_output=True, text=True
    ).stdout
    assert any(
        line.startswith("crw-rw-rw-") and line.endswith("/dev/zero")
        for line in listing.splitlines()
    )
    assert any(
        line.startswith("lrwxrwxrwx") and "/usr/lib/link -> palisade-fixture" in line
        for line in listing.splitlines()
    )
