"""Listening TCP sockets on a port the kernel picks, kept out of the reverse-NAT ranges.

A node's reverse NAT (networks.yaml `reverse-nat`, `min-host-port`..`max-host-port`) DNATs
those ports on every local address: a listener that the kernel happens to give such a port
(the default ephemeral range, 32768-60999 in ip(7)'s net.ipv4.ip_local_port_range, often
holds them) would never see its connections once a job uses that port. The VMs' control
endpoints and remote-display relays therefore ask again, holding each refused port until a
good one comes, so that the kernel does not hand it out twice.
"""

import socket

from pcocc.errors import PcoccError

BIND_TRIES = 64  # ports the kernel may hand out inside the ranges before giving up


def reverse_nat_ranges(config):
    """[(min, max)] (inclusive) of the host ports that the configured networks reverse-NAT
    (any network: other jobs on the node may use any)."""
    ranges = []
    for network in config.networks.values():
        rnat = (network.settings or {}).get("reverse-nat")
        if isinstance(rnat, dict) and rnat.get("min-host-port") and rnat.get("max-host-port"):
            ranges.append((rnat["min-host-port"], rnat["max-host-port"]))
    return ranges


def listen_outside(host, avoid=(), port=0, backlog=128, what="listen"):
    """A listening TCP socket on (host, port); with port 0, a port the kernel picks outside
    the `avoid` ranges ([(min, max)], inclusive). Raises PcoccError naming `what` when it cannot
    bind, or when BIND_TRIES ports in a row fall in the ranges."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = []
    try:
        for _ in range(BIND_TRIES):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise PcoccError(f"cannot {what} on {host}: {exc.strerror}") from None
            if port or not any(low <= sock.getsockname()[1] <= high for low, high in avoid):
                sock.listen(backlog)
                return sock
            held.append(sock)
        raise PcoccError(f"cannot {what} on {host}: the kernel gave {BIND_TRIES} ports within the reverse-NAT ranges "
                         "of networks.yaml (keep them out of net.ipv4.ip_local_port_range)")
    finally:
        for s in held:
            s.close()
