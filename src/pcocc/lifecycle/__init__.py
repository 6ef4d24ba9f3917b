"""A virtual cluster's life: node setup, the launcher, each VM's process, save,
checkpoint and instant restore, and the client side of ssh/scp/nc.

These modules sit above the drivers (hypervisor, networks, agent, images, store)
and below the CLI and the batch backends' callers.
"""
