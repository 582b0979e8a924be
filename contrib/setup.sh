#!/usr/bin/env bash
# Install what vdiskfs needs on Debian or Ubuntu and put vdiskfs into a virtualenv.
#
# Run as root, or as a user who may use sudo. The virtualenv goes to $VDISKFS_VENV
# (default: .venv in the checkout); the other scripts in contrib/ use the same one.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VDISKFS_VENV:-$repo/.venv}

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi

echo "vdiskfs setup: installing Debian packages" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q >/dev/null
"${as_root[@]}" apt-get install -y -q --no-install-recommends \
    fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
    qemu-utils qemu-system-x86 fdisk e2fsprogs man-db fio >/dev/null

# The kernel exposes /dev/fuse once its fuse module is loaded.
if [ ! -e /dev/fuse ] && command -v modprobe >/dev/null; then
    "${as_root[@]}" modprobe fuse || echo "vdiskfs setup: loading the fuse module failed" >&2
fi

echo "vdiskfs setup: installing vdiskfs into $venv" >&2
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
    # Keep the virtualenv out of git when it lives inside the checkout.
    echo '*' > "$venv/.gitignore"
fi
"$venv/bin/python" -m pip install -q -e "$repo[test]"

# mount(8) and umount(8) look for the helpers of type fuse.vdiskfs in /sbin only, so /etc/fstab
# lines need these links. They change the system, so they are made only on request.
if [ "${VDISKFS_MOUNT_HELPERS:-0}" = 1 ]; then
    for helper in mount.fuse.vdiskfs mount.vdiskfs umount.fuse.vdiskfs; do
        echo "vdiskfs setup: linking /sbin/$helper to $venv/bin/$helper" >&2
        "${as_root[@]}" ln -sf "$venv/bin/$helper" "/sbin/$helper"
    done
fi
