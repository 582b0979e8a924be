"""Format drivers, each an implementation of vdiskfs.driver.Driver."""
