"""The qcow2 format, split by concept as the specification is: header, cluster mapping,
table cache, compression and snapshots."""

from vdiskfs.formats.qcow2.driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
