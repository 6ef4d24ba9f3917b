"""Talking to the VMs: the guest agent client."""
