"""One module per `vdiskfs` command; see vdiskfs/cli.py for the contract."""
