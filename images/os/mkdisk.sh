#!/bin/bash
# The appliance's disk image: GPT (state, slot A, slot B, data) from `palisade image flash
# --init`, the bundle in slot A on trial, and the data partition as ext4 holding what the
# flash put there (the model, slot A's node config) and the release trust file.
# Usage: mkdisk.sh BUNDLE TRUST_JSON OUT_DISK SLOT_SIZE DATA_SIZE
set -euo pipefail
bundle=$1 trust=$2 out=$3 slot_size=$4 data_size=$5
palisade=${PALISADE:-palisade}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data/image"
cp "$trust" "$work/data/image/trust.json"
rm -f "$out"
"$palisade" image flash "$bundle" --target "$out" --init --trust "$trust" --data "$work/data" \
    --slot-size "$slot_size" --data-size "$data_size" --slot A
read -r start size < <(sfdisk --json "$out" | python3 -c '
import json, sys
table = json.load(sys.stdin)["partitiontable"]
data = next(p for p in table["partitions"] if p["name"] == "palisade-data")
print(data["start"] * table.get("sectorsize", 512), data["size"] * table.get("sectorsize", 512))')
mkfs.ext4 -q -F -L palisade-data -d "$work/data" -E root_owner=0:0 "$work/data.ext4" "$((size / 1024))k"
dd if="$work/data.ext4" of="$out" bs=1M seek="$((start / 1048576))" conv=notrunc,fsync status=none
"$palisade" image status --disk "$out"
