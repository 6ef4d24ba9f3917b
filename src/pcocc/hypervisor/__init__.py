"""The qemu hypervisor: accelerator probe, command line, topology, seed, VM lifecycle."""
