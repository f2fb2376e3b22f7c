"""The disk layout: made with sfdisk, read back with `sfdisk --json`, refused when foreign."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from images._private.bootstate import BootState
from images._private.disk import (
    PARTITION_NAMES,
    DiskLayout,
    init_disk,
    locked_disk,
    read_boot_state,
    write_boot_state,
)
from images._private.errors import ImageError

MIB = 1 << 20


def sfdisk_json(path: Path) -> dict[str, object]:
    result = subprocess.run(
        ["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True
    )
    table = json.loads(result.stdout)["partitiontable"]
    assert isinstance(table, dict)
    return table


def test_init_lays_out_the_four_partitions_and_an_empty_boot_state(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    layout = init_disk(disk, slot_size=8 * MIB, data_size=16 * MIB)
    table = sfdisk_json(disk)
    assert table["label"] == "gpt"
    partitions = table["partitions"]
    assert isinstance(partitions, list)
    assert [entry["name"] for entry in partitions] == list(PARTITION_NAMES)
    assert [entry["size"] * 512 for entry in partitions] == [MIB, 8 * MIB, 8 * MIB, 16 * MIB]
    assert [each.start for each in layout.partitions] == [
        entry["start"] * 512 for entry in partitions
    ]
    assert all(each.start % MIB == 0 for each in layout.partitions)
    assert layout.partitions[-1].end <= disk.stat().st_size
    assert DiskLayout.read(disk) == layout
    state = read_boot_state(disk)
    assert state.order == ("A", "B")
    assert not state.a.bootable
    assert not state.b.bootable


def test_a_disk_without_a_partition_table_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(4 * MIB))
    with pytest.raises(ImageError) as caught:
        DiskLayout.read(disk)
    assert caught.value.code == "disk_layout_unexpected"


@pytest.mark.parametrize(
    "script",
    [
        # three partitions
        'label: gpt\nsize=2048, name="palisade-state"\nsize=4096, name="palisade-root-a"\n'
        'name="palisade-root-b"\n',
        # the right count, another name
        'label: gpt\nsize=2048, name="palisade-state"\nsize=4096, name="palisade-root-a"\n'
        'size=4096, name="root-b"\nname="palisade-data"\n',
        # an MBR disk with the right number of partitions
        "label: dos\nsize=2048\nsize=4096\nsize=4096\nsize=4096\n",
    ],
)
def test_a_disk_with_another_layout_is_refused(tmp_path: Path, script: str) -> None:
    disk = tmp_path / "other.img"
    disk.write_bytes(bytes(16 * MIB))
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    with pytest.raises(ImageError) as caught:
        DiskLayout.read(disk)
    assert caught.value.code == "disk_layout_unexpected"
    with pytest.raises(ImageError):
        read_boot_state(disk)


def test_a_missing_disk_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        DiskLayout.read(tmp_path / "nope.img")
    assert caught.value.code == "disk_unreadable"


def test_a_locked_disk_is_busy(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    init_disk(disk, slot_size=MIB, data_size=MIB)
    with locked_disk(disk, timeout=0):
        with pytest.raises(ImageError) as caught, locked_disk(disk, timeout=0):
            pass
        assert caught.value.code == "disk_busy"
    written = write_boot_state(disk, BootState(order=("B", "A")))
    assert read_boot_state(disk) == written
