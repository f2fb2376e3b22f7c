#!/bin/bash
# Boot the appliance disk under QEMU: GRUB (grub.lnx via -kernel) reads the boot state and
# boots slot A or B; the serial console is this terminal (or -serial's file). The only
# network is the appliance's port forwarded to 127.0.0.1:$PORT (restrict=on).
# Usage: boot-qemu.sh DISK GRUB_LNX [PORT [INBOX_DISK [SERIAL_LOG]]]
# KVM here does not boot a stock Debian kernel; QEMU_ACCEL=kvm where it does.
set -euo pipefail
disk=$1 grub=$2 port=${3:-8400} inbox=${4:-} serial=${5:-}
args=(
    -accel "${QEMU_ACCEL:-tcg,thread=multi}" -cpu max -smp 2 -m "${QEMU_MEMORY:-2048}"
    -kernel "$grub" -display none -no-user-config -nodefaults
    -drive "file=$disk,format=raw,if=virtio,cache=writeback"
    -nic "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:$port-:8400"
)
if [ -n "$inbox" ]; then
    args+=(-drive "file=$inbox,format=raw,if=virtio,readonly=on")
fi
if [ -n "$serial" ]; then
    args+=(-serial "file:$serial")
else
    args+=(-serial mon:stdio)
fi
exec qemu-system-x86_64 "${args[@]}"
