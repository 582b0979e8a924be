#!/bin/sh
# Boot a bhyve guest from a qcow2 (or raw) image exposed by vdiskfs, and unmount afterwards.
#
# usage: run-vm.sh IMAGE VMNAME
# Environment: VDISKFS_OPTIONS (extra `vdiskfs mount` options), CPUS (default 2),
# MEMORY (default 2G), FIRMWARE (default: the UEFI firmware of the edk2-bhyve package).
set -eu

if [ $# -ne 2 ]; then
    echo "usage: $0 IMAGE VMNAME" >&2
    exit 2
fi
image=$1
name=$2
cpus=${CPUS:-2}
memory=${MEMORY:-2G}
firmware=${FIRMWARE:-/usr/local/share/uefi-firmware/BHYVE_UEFI.fd}
mountpoint=$(mktemp -d "/tmp/vdiskfs-$name.XXXXXX")

# shellcheck disable=SC2086  # VDISKFS_OPTIONS is meant to split into words
vdiskfs mount ${VDISKFS_OPTIONS:-} "$image" "$mountpoint"
cleanup() {
    bhyvectl --destroy --vm="$name" 2>/dev/null || true
    vdiskfs umount "$mountpoint" && rmdir "$mountpoint"
}
trap cleanup EXIT INT TERM

disk=$mountpoint/$(basename "${image%.*}").raw

# nodelete: vdiskfs does not pass TRIM to the image, so the guest should not offer it.
# A flush in the guest becomes fsync() on $disk, which vdiskfs turns into a flush of the image.
bhyve -c "$cpus" -m "$memory" -H -A -P \
    -s 0,hostbridge \
    -s 3,virtio-blk,"$disk",nodelete \
    -s 31,lpc -l com1,stdio \
    -l bootrom,"$firmware" \
    "$name"
