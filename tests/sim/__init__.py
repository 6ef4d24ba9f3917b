"""Simulations of hardware this machine does not have (test code, not the product).

sysfs.SimulatedHost: a node's PCI/VFIO/mlx5 SR-IOV sysfs tree and the kernel's
reactions to writes. opensm: a stand-in for OpenSM that re-reads its partitions
file on SIGHUP and records what it read.
"""
