#!/bin/bash
# The appliance's root tree (the image config's `[rootfs] base`): the Debian tree of
# mkrootfs.sh plus Palisade installed from the wheelhouse into /opt/palisade/venv, the
# squashfs-root initramfs, fstab, the boot helpers and the enabled units, and the kernel and
# initrd at /boot/vmlinuz and /boot/initrd.img (read by GRUB from the squashfs slot).
# Usage: mkbase.sh DEBIAN_TREE WHEELHOUSE OUT_DIR      (root; chroot)
set -euo pipefail
debian=$(readlink -f "$1") wheels=$(readlink -f "$2") out=$3
here=$(dirname "$(readlink -f "$0")")
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}  # hash-checked .pyc: valid at any mtime

rm -rf "$out"
cp -a "$debian" "$out"
out=$(readlink -f "$out")
mounted=()
cleanup() { for m in "${mounted[@]}"; do umount -l "$m" || true; done; }
trap cleanup EXIT
for fs in proc sys dev; do
    mount --rbind "/$fs" "$out/$fs" && mounted=("$out/$fs" "${mounted[@]}")
done
in_root() { chroot "$out" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$@"; }

# What an appliance never loads: sound, graphics, radios, media, InfiniBand.
modules=$(echo "$out"/usr/lib/modules/*)
for dir in sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband \
    drivers/staging drivers/bluetooth net/wireless net/bluetooth drivers/iio; do
    rm -rf "${modules:?}/kernel/$dir"
done
in_root depmod -a "$(basename "$modules")"

cp -a "$here/rootfs/." "$out/"
printf '%s\n' squashfs overlay ext4 virtio_pci virtio_blk >> "$out/etc/initramfs-tools/modules"

mkdir -p "$out/tmp/wheels"
cp "$wheels"/*.whl "$out/tmp/wheels/"
in_root python3 -m venv /opt/palisade/venv
in_root /opt/palisade/venv/bin/pip install --quiet --no-index --no-cache-dir \
    --find-links /tmp/wheels palisade
rm -rf "$out/tmp/wheels"
in_root /opt/palisade/venv/bin/palisade --help > /dev/null

mkdir -p "$out/etc/systemd/system/multi-user.target.wants" "$out/var/lib/palisade"
for unit in "$here"/units/palisade-*.service; do
    ln -sf "/etc/systemd/system/$(basename "$unit")" \
        "$out/etc/systemd/system/multi-user.target.wants/$(basename "$unit")"
done
for unit in systemd-networkd.service systemd-networkd.socket; do
    ln -sf "/lib/systemd/system/$unit" "$out/etc/systemd/system/multi-user.target.wants/$unit"
done
# The console shows the boot; no login prompt is needed on it.
ln -sf /dev/null "$out/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$out/etc/systemd/system/getty@tty1.service"

in_root update-initramfs -u -k all > /dev/null
kernel=$(basename "$modules")
cp "$out/boot/vmlinuz-$kernel" "$out/boot/vmlinuz"
cp "$out/boot/initrd.img-$kernel" "$out/boot/initrd.img"
rm -f "$out"/var/cache/apt/archives/*.deb "$out"/var/lib/apt/lists/*_Packages
test -s "$out/boot/vmlinuz" && test -s "$out/boot/initrd.img"
# No device nodes in the image (the kernel mounts devtmpfs on /dev), nor anything a copy of
# the tree would read forever (/dev/zero).
cleanup
mounted=()
find "$out/dev" -mindepth 1 -delete
