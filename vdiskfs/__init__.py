"""vdiskfs: expose virtual-disk images (qcow2, raw) as flat raw files through FUSE."""

__version__ = "0.1.0"
