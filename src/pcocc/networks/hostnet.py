"""Thin drivers of the host's network tools: ovs-vsctl and ip, through the one runner.

Each creating call has an idempotent undo, listed in undo_actions() under the
kind the undo log records. The OVS commands reach the node's own Open vSwitch
through OVS_RUNDIR in the environment they are given (a node may run its own
instance, as the test cluster does).
"""

from pcocc.errors import CommandError
from pcocc.runner import run

OVS_TIMEOUT = 30  # seconds ovs-vsctl waits for ovsdb-server and ovs-vswitchd


class Ovs:
    def __init__(self, environ=None):
        self.environ = environ

    def vsctl(self, *args):
        # without --no-wait: returns once ovs-vswitchd has applied the change (the port exists)
        return run(["ovs-vsctl", f"--timeout={OVS_TIMEOUT}", *args], env=self.environ, timeout=OVS_TIMEOUT + 5).stdout

    def add_bridge(self, bridge, datapath_type="system"):
        self.vsctl("add-br", bridge, "--", "set", "bridge", bridge, f"datapath_type={datapath_type}")

    def del_bridge(self, bridge):
        self.vsctl("--if-exists", "del-br", bridge)

    def add_port(self, bridge, port):
        """An existing network device (a tap) as a port of bridge."""
        self.vsctl("add-port", bridge, port)

    def add_vxlan_port(self, bridge, port, remote_ip, key):
        # protected: NORMAL never floods from one tunnel to another (split horizon),
        # so a full mesh of tunnels between 3+ nodes has no loop
        self.vsctl("add-port", bridge, port, "--", "set", "interface", port, "type=vxlan",
                   f"options:remote_ip={remote_ip}", f"options:key={key}", "--", "set", "port", port, "protected=true")

    def del_port(self, bridge, port):
        try:
            self.vsctl("--if-exists", "del-port", bridge, port)
        except CommandError as exc:
            if "no bridge named" not in exc.stderr:  # the bridge went first: so did its ports
                raise

    def bridges(self):
        return self.vsctl("list-br").split()

    def ports(self, bridge):
        return self.vsctl("list-ports", bridge).split()


class Ip:
    def __init__(self, environ=None):
        self.environ = environ

    def _ip(self, *args):
        return run(["ip", *args], env=self.environ)

    def add_tap(self, name, uid, mtu):
        """A persistent tap that uid (the VM's qemu) may attach to, up, with mtu."""
        self._ip("tuntap", "add", "dev", name, "mode", "tap", "user", str(uid))
        self._ip("link", "set", "dev", name, "mtu", str(mtu), "up")

    def del_link(self, name):
        try:
            self._ip("link", "del", "dev", name)
        except CommandError:
            if self.link_exists(name):
                raise

    def link_exists(self, name):
        # not /sys/class/net: a process entered into a netns with nsenter sees the host's sysfs
        return run(["ip", "link", "show", "dev", name], env=self.environ, check=False).returncode == 0


def undo_actions(environ=None):
    """{kind: idempotent undo} of the objects these drivers make."""
    ovs, ip = Ovs(environ), Ip(environ)
    return {
        "ovs-bridge": lambda bridge: ovs.del_bridge(bridge),
        "ovs-port": lambda bridge, port: ovs.del_port(bridge, port),
        "tap": lambda name: ip.del_link(name),
    }
