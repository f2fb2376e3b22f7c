#!/bin/bash
# Debian bookworm root tree for the Palisade appliance image (the `base` of the image config).
# Usage: mkrootfs.sh OUT_DIR    (runs as root; needs mmdebstrap and the Debian mirror)
set -euo pipefail
out=$1
packages=(
    systemd-sysv udev kmod linux-image-amd64 initramfs-tools
    python3 python3-venv libgomp1
    e2fsprogs fdisk squashfs-tools grub-common cryptsetup-bin
)
rm -rf "$out"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0} mmdebstrap --variant=minbase --mode=root \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$out" "${PALISADE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
