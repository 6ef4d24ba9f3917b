"""One Open vSwitch (ovsdb-server + ovs-vswitchd) per node netns, each with its own rundir.

The kernel here has no openvswitch module, so pcocc uses the userspace
datapath (datapath_type=netdev) on these instances.
"""

import os
import time
from pathlib import Path

from pcocc.errors import TimeoutExpired
from pcocc.runner import run
from pcocc.testcluster import proc

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def rundir(base, node):
    return Path(base) / "ovs" / node


def environ(base, node):
    d = str(rundir(base, node))
    return dict(os.environ, OVS_RUNDIR=d, OVS_LOGDIR=d, OVS_DBDIR=d)


def _in_netns(ns, argv):
    # `ip netns exec` (unlike nsenter) remounts /sys, so OVS sees the namespace's own interfaces
    return ["ip", "netns", "exec", ns, *argv]


def start_db(state, base, layout, node):
    d = rundir(base, node)
    d.mkdir(parents=True, exist_ok=True)
    run(["ovsdb-tool", "create", d / "conf.db", SCHEMA])
    return proc.spawn(
        state, f"ovsdb-server:{node}",
        _in_netns(layout.netns(node), [
            "ovsdb-server", d / "conf.db", f"--remote=punix:{d / 'db.sock'}", f"--unixctl={d / 'ovsdb-server.ctl'}",
            f"--pidfile={d / 'ovsdb-server.pid'}", f"--log-file={d / 'ovsdb-server.log'}", "-vconsole:off"]),
        d / "ovsdb-server.out", pidfile=d / "ovsdb-server.pid", env=environ(base, node),
    )


def start_switch(state, base, layout, node, db):
    d = rundir(base, node)
    _wait_path(d / "db.sock", db, d / "ovsdb-server.out")
    run(["ovs-vsctl", f"--db=unix:{d / 'db.sock'}", "--no-wait", "init"])
    return proc.spawn(
        state, f"ovs-vswitchd:{node}",
        _in_netns(layout.netns(node), [
            "ovs-vswitchd", f"unix:{d / 'db.sock'}", f"--unixctl={d / 'ovs-vswitchd.ctl'}",
            f"--pidfile={d / 'ovs-vswitchd.pid'}", f"--log-file={d / 'ovs-vswitchd.log'}", "-vconsole:off"]),
        d / "ovs-vswitchd.out", pidfile=d / "ovs-vswitchd.pid", env=environ(base, node),
    )


def wait(base, layout, node, switch, timeout=20):
    d = rundir(base, node)
    # without --no-wait, ovs-vsctl returns once ovs-vswitchd has applied the change
    run(["ovs-vsctl", f"--db=unix:{d / 'db.sock'}", f"--timeout={timeout}",
         "set", "Open_vSwitch", ".", f"external_ids:pcocc-testcluster={layout.id}"], timeout=timeout + 5)
    if switch.poll() is not None:
        raise TimeoutExpired(f"ovs-vswitchd of {node} died: {proc.tail(d / 'ovs-vswitchd.out')}")


def _wait_path(path, process, log, timeout=10):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise TimeoutExpired(f"{path} did not appear: {proc.tail(log)}")
        time.sleep(0.005)


def add_tunnel_bridge(base, layout, node, timeout=20):
    """br-phy owning the node's tunnel underlay port, with the node's tunnel IP on it.

    The userspace datapath only tunnels (native tunnelling) from an IP that sits on the
    OVS bridge owning the underlay port. It goes with the OVS instance at `down`.
    """
    from pcocc.testcluster.net import TUNNEL_DEV

    d = rundir(base, node)
    run(["ovs-vsctl", f"--db=unix:{d / 'db.sock'}", f"--timeout={timeout}", "add-br", "br-phy",
         "--", "set", "bridge", "br-phy", "datapath_type=netdev", "--", "add-port", "br-phy", TUNNEL_DEV],
        timeout=timeout + 5)
    ns = layout.netns(node)
    run(["ip", "-n", ns, "-batch", "-"], input=(
        f"addr add {layout.tunnel_ip(node)}/{layout.tunnel_subnet.prefixlen} dev br-phy\n"
        "link set br-phy up\n"))
