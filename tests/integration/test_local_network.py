"""An L3 private network on the local backend (as root): DHCP addresses and names, DNS
between the VMs, outbound NAT to a server on this host, `pcocc ssh`/`scp`/`nc` through
the reverse NAT, and nothing left after `pcocc cancel`.

Open vSwitch runs for the test only (its own ovsdb-server and ovs-vswitchd, userspace
datapath, stopped by pid). The test leaves the host's ip_forward alone
(manage-ip-forward: false): the VMs only talk to this host.
"""

import json
import os
import re
import socket
import subprocess
import threading

import pytest

from local_site import PCOCC
from waiting import wait_for

# one worker for the module: two userspace Open vSwitch instances in one namespace clash (both make "ovs-netdev")
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("host-ovs")]

NETWORKS = """\
lnet:
  type: ethernet
  settings:
    dev-prefix: tl
    network-layer: L3
    datapath-type: netdev
    int-network: 10.250.0.0/24
    ext-network: 10.251.0.0/24
    domain-name: lcl.test
    manage-ip-forward: false
    reverse-nat:
      vm-port: 22
      min-host-port: 42200
      max-host-port: 42299
"""


@pytest.fixture
def ovs(tmp_path):
    """A private Open vSwitch in this host's namespace; its environment for pcocc."""
    d = tmp_path / "ovs"
    d.mkdir()
    env = dict(os.environ, OVS_RUNDIR=str(d), OVS_LOGDIR=str(d), OVS_DBDIR=str(d))
    subprocess.run(["ovsdb-tool", "create", d / "conf.db", "/usr/share/openvswitch/vswitch.ovsschema"], check=True)
    procs = [subprocess.Popen(["ovsdb-server", d / "conf.db", f"--remote=punix:{d / 'db.sock'}", f"--unixctl={d / 'db.ctl'}",
                               "-vconsole:off", f"--log-file={d / 'db.log'}"], env=env, start_new_session=True)]
    try:
        wait_for(lambda: (d / "db.sock").exists(), timeout=10, what="ovsdb-server")
        subprocess.run(["ovs-vsctl", "--no-wait", "init"], env=env, check=True)
        procs.append(subprocess.Popen(["ovs-vswitchd", f"unix:{d / 'db.sock'}", f"--unixctl={d / 'vs.ctl'}", "-vconsole:off",
                                       f"--log-file={d / 'vs.log'}"], env=env, start_new_session=True))
        subprocess.run(["ovs-vsctl", "--timeout=20", "set", "Open_vSwitch", ".", "external_ids:test=1"], env=env, check=True)
        yield {k: env[k] for k in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR")}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def netsite(site, ovs, tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "networks.yaml").write_text(NETWORKS)
    (etc / "resources.yaml").write_text("default:\n  default: true\n  networks: []\nl3:\n  networks: [lnet]\n")
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\nnet:\n  inherits: tiny\n  resource-set: l3\n")
    site.environ.update(ovs, PCOCC_NODE_STATE_DIR=str(tmp_path / "node"))
    (site.home / ".ssh").mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", site.home / ".ssh" / "id_ed25519"], check=True)
    return site


def vm_sh(site, vm, script, timeout=60):
    return site.pcocc("exec", "-w", f"vm{vm}", "sh", "-c", script, timeout=timeout)


def dhcp_env(site, vm):
    r = vm_sh(site, vm, "cat /run/pcocc/dhcp.env")
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line) if r.returncode == 0 else {}


def leftovers(site, jobid, node_dir):
    """What of the job exists on this host: devices, namespaces, iptables rules, dnsmasq, files, store keys."""
    found = re.findall(rf"\btl[bgth]{jobid}(?:_\w+)?\b", subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout)
    found += [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split() if f"-{jobid}-lnet" in n]
    for table in ("filter", "nat"):
        rules = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
        found += [line for line in rules.splitlines() if f"pcocc job {jobid}\"" in line]
        if not list(node_dir.glob("undo-*")):  # no job left here: nor the chain they shared
            found += [line for line in rules.splitlines() if "PCOCC-FORWARD" in line]
    found += [p.name for p in node_dir.glob(f"*{jobid}*")] if node_dir.exists() else []
    found += [k for k, v in site.store_items().items() if f"/{jobid}/" in k or f'"{jobid}:lnet' in str(v)]
    return found


class _Server:
    """A one-shot TCP server on this host: who connected, and what they sent."""

    def __init__(self, address):
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]
        self.peers = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                self.peers.append(peer[0])
                conn.sendall(b"hello from the host\n")

    def close(self):
        self.sock.close()


def test_l3_network_on_the_local_backend(netsite, tmp_path):
    from pcocc.networks.gateway import LINK_ADDR

    site = netsite
    r = site.pcocc("batch", "-m", "256", "-J", "l3", "--wait", "net:2")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    node_dir = tmp_path / "node"
    try:
        # DHCP: each VM has its address, gateway, DNS server, domain and hostname from dnsmasq
        for vm in (0, 1):
            wait_for(lambda: dhcp_env(site, vm).get("ip"), timeout=90, what=f"vm{vm}'s DHCP lease")
            got = dhcp_env(site, vm)
            assert got == {"ip": f"10.250.0.{vm + 1}", "router": "10.250.0.254", "dns": "10.250.0.254",
                           "domain": "lcl.test", "hostname": f"vm{vm}"}
        # DNS: names of the other VM, short and qualified, and ping by name
        r = vm_sh(site, 0, "nslookup vm1.lcl.test 10.250.0.254; ping -c1 -W3 vm1")
        assert r.returncode == 0 and "10.250.0.2" in r.stdout, r.stdout + r.stderr

        # outbound: a server on this host (on the address of the job's uplink) sees the VM's external address
        host = LINK_ADDR
        server = _Server(host)
        try:
            r = vm_sh(site, 1, f"echo hi | nc {host} {server.port}")
            assert r.returncode == 0 and "hello from the host" in r.stdout, r.stdout + r.stderr
        finally:
            server.close()
        nodes = json.loads(site.pcocc("ps", "--json").stdout)
        assert [j["jobid"] for j in nodes] == [jobid]
        records = {k: v for k, v in site.store_items().items() if f"/clusters/{jobid}/nodes/" in k}
        (record,) = [json.loads(v) for v in records.values()]
        ext = record["objects"]["lnet"]["vms"]["1"]["ext_ip"]
        assert server.peers == [ext] and ext.startswith("10.251.0.")

        # ssh, scp and nc through the reverse NAT
        r = site.pcocc("ssh", "vm1", "hostname", timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "vm1", r.stderr
        (tmp_path / "up.txt").write_text("to the VM\n")
        r = site.pcocc("scp", tmp_path / "up.txt", "vm0:/tmp/up.txt", timeout=120)
        assert r.returncode == 0, r.stderr
        assert vm_sh(site, 0, "cat /tmp/up.txt").stdout == "to the VM\n"
        nc = subprocess.run([str(PCOCC), "nc", "vm0"], env=site.environ, input=b"", capture_output=True, timeout=60)
        assert nc.returncode == 0 and nc.stdout.startswith(b"SSH-2.0-"), nc.stderr
        r = site.pcocc("nc", "vm0", "80")
        assert r.returncode != 0 and "port 80 of vm0 is not reverse-NATed" in r.stderr
        # the original's forms: ssh -p / scp -P name the VM's port; ssh-config for plain ssh
        r = site.pcocc("ssh", "-p", "22", "vm1", "hostname", timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "vm1", r.stderr
        r = site.pcocc("ssh", "-p2222", "vm1", "hostname", timeout=120)
        assert r.returncode != 0 and "port 2222 of the VMs is not reverse-NATed (only port 22 is)" in r.stderr, r.stderr
        conf = site.pcocc("ssh-config", check=True).stdout
        assert "Host vm0" in conf and "Host vm1" in conf
        (tmp_path / "ssh.conf").write_text(conf)
        r = subprocess.run(["ssh", "-F", str(tmp_path / "ssh.conf"), "vm0", "hostname"], env=site.environ,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "vm0", r.stderr

        assert leftovers(site, jobid, node_dir)  # the check sees a live job's objects
    finally:
        site.pcocc("cancel", "-j", jobid)
    assert leftovers(site, jobid, node_dir) == []


@pytest.fixture
def linux_bridge():
    """A Linux bridge of the test's own, with this host on it (10.252.0.1). This kernel has no
    bridge VLAN filtering: VLANs are tested on an Open vSwitch bridge."""
    name = f"pcbr{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.252.0.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=True)


@pytest.fixture
def ovs_bridge(ovs):
    """An Open vSwitch bridge of the test's own, with this host on its VLAN 100 (10.252.0.1, an internal port)."""
    env = dict(os.environ, **ovs)
    name = f"pcovs{os.getpid() % 100000}"
    subprocess.run(["ovs-vsctl", "--timeout=20", "add-br", name, "--", "set", "bridge", name, "datapath_type=netdev",
                    "--", "add-port", name, "vl100", "--", "set", "interface", "vl100", "type=internal",
                    "--", "set", "port", "vl100", "tag=100"], env=env, check=True)
    subprocess.run(["ip", "addr", "add", "10.252.0.1/24", "dev", "vl100"], check=True)
    subprocess.run(["ip", "link", "set", "vl100", "up"], check=True)
    yield name, ovs
    subprocess.run(["ovs-vsctl", "--timeout=20", "del-br", name], env=env, check=True)


def bridged_site(site, tmp_path, bridge, vlans=""):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "networks.yaml").write_text(
        f"lan:\n  type: bridged\n  settings:\n    host-bridge: {bridge}\n    tap-prefix: tb\n" + (f"    vlans: {vlans}\n" if vlans else ""))
    (etc / "resources.yaml").write_text("default:\n  default: true\n  networks: []\nlan:\n  networks: [lan]\n")
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\nonlan:\n  inherits: tiny\n  resource-set: lan\n")
    site.environ.update(PCOCC_NODE_STATE_DIR=str(tmp_path / "node"))
    return site


def on_the_bridge(site, tmp_path, check_port):
    """Start a VM on the bridged network; it reaches this host; its tap goes with it."""
    from pcocc.networks.bridged import tap_name

    r = site.pcocc("batch", "-m", "256", "--wait", "onlan:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    tap = tap_name({"tap-prefix": "tb"}, jobid, 0)
    try:
        check_port(tap)
        r = vm_sh(site, 0, "ip addr add 10.252.0.2/24 dev eth0 && ip link set eth0 up && ping -c1 -W5 10.252.0.1")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        site.pcocc("cancel", "-j", jobid)
    assert subprocess.run(["ip", "link", "show", "dev", tap], capture_output=True).returncode != 0  # the tap is gone
    assert not list((tmp_path / "node").glob("undo-*"))


def test_bridged_network_on_a_linux_bridge(site, linux_bridge, tmp_path):
    def on_bridge(tap):
        assert f"master {linux_bridge}" in subprocess.run(["ip", "link", "show", "dev", tap], capture_output=True, text=True).stdout

    on_the_bridge(bridged_site(site, tmp_path, linux_bridge), tmp_path, on_bridge)
    # VLANs need a VLAN-aware bridge: said before anything is made
    bridged_site(site, tmp_path, linux_bridge, "{native: 100}")
    r = site.pcocc("batch", "-m", "256", "--wait", "onlan:1")
    assert r.returncode != 0 and f"bridge {linux_bridge} on" in r.stderr and "needs vlan_filtering on for VLANs" in r.stderr


def test_bridged_network_with_vlans_on_an_ovs_bridge(site, ovs_bridge, tmp_path):
    bridge, ovs_env = ovs_bridge
    site.environ.update(ovs_env)

    def tagged(tap):
        env = dict(os.environ, **ovs_env)
        get = lambda col: subprocess.run(["ovs-vsctl", "get", "port", tap, col], env=env, capture_output=True, text=True).stdout.strip()
        assert (get("tag"), get("trunks"), get("vlan_mode")) == ("100", "[100, 101]", "native-untagged")

    on_the_bridge(bridged_site(site, tmp_path, bridge, "{native: 100, tagged: [101]}"), tmp_path, tagged)


def test_instant_cluster_on_the_l3_network_gets_one_address_per_vm(netsite):
    """VMs restored from one snapshot each take their own MAC, then their own lease and name."""
    site = netsite
    r = site.pcocc("template", "snapshot", "-m", "256", "net", timeout=300)
    assert r.returncode == 0, r.stderr
    r = site.pcocc("batch", "-m", "256", "--wait", "net:3")
    assert r.returncode == 0 and "restoring the VMs of net from their template's snapshot" in r.stderr, r.stderr
    jobid = int(r.stdout.split()[0])
    try:
        for vm in range(3):
            want = f"10.250.0.{vm + 1}"
            try:
                wait_for(lambda: dhcp_env(site, vm).get("ip") == want, timeout=90, what=f"vm{vm}'s own lease ({want})")
            except AssertionError:
                r = vm_sh(site, vm, "cat /run/pcocc/dhcp.env; cat /sys/class/net/eth0/address; ps; ip addr; cat /run/pcocc/udhcpc.log")
                raise AssertionError(f"vm{vm} has no lease of its own: {r.stdout}{r.stderr}") from None
            assert dhcp_env(site, vm)["hostname"] == f"vm{vm}"
            assert vm_sh(site, vm, "cat /sys/class/net/eth0/address").stdout.strip() == f"52:54:00:00:00:{vm:02x}"
        r = vm_sh(site, 0, "ping -c1 -W3 vm2.lcl.test && ping -c1 -W3 vm1")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        site.pcocc("cancel", "-j", jobid)


def test_a_killed_supervisor_s_network_is_undone_when_its_cluster_is_reclaimed(netsite, tmp_path):
    """The supervisor and VM processes of a cluster die (SIGKILL): the next `pcocc ps` reclaims the
    cluster, and with it everything its node setup made."""
    import signal

    site = netsite
    r = site.pcocc("batch", "-m", "256", "--wait", "net:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    items = {k: json.loads(v) for k, v in site.store_items().items() if f"/clusters/{jobid}/" in k}
    info = next(v for k, v in items.items() if k.endswith("/info"))
    vm = next(v for k, v in items.items() if k.endswith("/vms/0"))
    assert leftovers(site, jobid, tmp_path / "node")
    for pid in (info["supervisor"], vm["pid"], vm["qemu_pid"]):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{vm['qemu_pid']}/cmdline") or
             not open(f"/proc/{vm['qemu_pid']}/cmdline", "rb").read(), timeout=30, what="qemu to die")
    assert json.loads(site.pcocc("ps", "--json").stdout) == []
    assert leftovers(site, jobid, tmp_path / "node") == []
