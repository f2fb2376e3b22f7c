#!/bin/bash
# GRUB for the appliance disk: an i386-pc core image holding grub.cfg (the A/B boot model)
# in a memdisk, behind lnxboot.img so that QEMU's -kernel loads it (no grub-install, no
# boot sector: on real hardware grub-install would put the same core image on the disk).
# Usage: mkgrub.sh OUT.lnx
set -euo pipefail
out=$1
here=$(dirname "$(readlink -f "$0")")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/memdisk"
cp "$here/grub.cfg" "$work/memdisk/grub.cfg"
# The image's own config runs with GRUB's rescue parser: it only hands over to grub.cfg.
printf '%s\n' 'set root=(memdisk)' 'set prefix=(memdisk)' 'configfile (memdisk)/grub.cfg' \
    > "$work/early.cfg"
tar -C "$work/memdisk" --owner=0 --group=0 --mtime=@0 -cf "$work/memdisk.tar" grub.cfg
modules=(biosdisk part_gpt squash4 gzio xzio lzopio zstd loadenv test normal echo linux
    memdisk tar serial terminal configfile halt reboot sleep)
grub-mkimage -O i386-pc -p '(memdisk)' -m "$work/memdisk.tar" -c "$work/early.cfg" -o "$work/core.img" "${modules[@]}"
cat /usr/lib/grub/i386-pc/lnxboot.img "$work/core.img" > "$out"
