#!/usr/bin/env bash
# Set up vdiskfs (see setup.sh), then show its main job on a new qcow2 image:
# sfdisk writes a partition table through a mount, and fdisk reads it back from
# a read-only mount.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VDISKFS_VENV:-$repo/.venv}

"$repo/contrib/setup.sh"
vdiskfs=("$venv/bin/vdiskfs")

work=$(mktemp -d /tmp/vdiskfs-demo.XXXXXX)
mountpoint=$work/mnt
cleanup() {
    if mountpoint -q "$mountpoint"; then
        "${vdiskfs[@]}" umount "$mountpoint"
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== vdiskfs create -f qcow2 demo.qcow2 64M"
"${vdiskfs[@]}" create -f qcow2 "$work/demo.qcow2" 64M
mkdir "$mountpoint"

echo
echo "== vdiskfs mount demo.qcow2 mnt; sfdisk mnt/demo.raw"
"${vdiskfs[@]}" mount "$work/demo.qcow2" "$mountpoint"
printf 'label: gpt\nsize=24MiB, type=L, name=root\ntype=S, name=swap\n' \
    | sfdisk -q "$mountpoint/demo.raw"
"${vdiskfs[@]}" umount "$mountpoint"

echo
echo "== vdiskfs mount --read-only demo.qcow2 mnt; fdisk -l mnt/demo.raw"
"${vdiskfs[@]}" mount --read-only "$work/demo.qcow2" "$mountpoint"
ls -l "$mountpoint"
fdisk -l "$mountpoint/demo.raw"

echo
echo "== vdiskfs umount mnt; vdiskfs info demo.qcow2"
"${vdiskfs[@]}" umount "$mountpoint"
"${vdiskfs[@]}" info "$work/demo.qcow2"
