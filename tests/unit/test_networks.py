"""Private networks without a real host: names, MACs, the undo log, NIC arguments, node setup with fake drivers."""


import pytest

from pcocc.config.models import Network
from pcocc.errors import PcoccError
from pcocc.networks import ethernet, hostnet, names
from pcocc.networks.ethernet import SETTINGS as ETH_SETTINGS
from pcocc.networks.undo import UndoError, UndoLog


def eth(**settings):
    from pcocc.config.schema import At, Problems

    checked = ETH_SETTINGS.check({"dev-prefix": "pn", "network-layer": "L2", **settings}, At("networks.yaml", 1, "priv.settings", Problems()))
    return Network("priv", "ethernet", checked)


# ---------------------------------------------------------------- names and MACs

def test_device_names_are_short_readable_and_the_same_on_both_sides():
    s = eth().settings
    assert ethernet.bridge_name(s, 12) == "pnb12"
    assert ethernet.tap_name(s, 12, 3) == "pnt12_3"
    assert ethernet.tunnel_port_name(s, 12, 1) == "pnx12_1"
    long = eth(**{"dev-prefix": "abcdefgh"}).settings
    taps = {ethernet.tap_name(long, 4294967295, rank) for rank in range(1000)}
    assert len(taps) == 1000  # still one per VM
    assert all(len(t) <= names.IFNAMSIZ and t.startswith("abcdefght") for t in taps)
    assert ethernet.tap_name(long, 4294967295, 7) == ethernet.tap_name(long, 4294967295, 7)


def test_mac_addresses_follow_upstream():
    assert names.mac_address("52:54:00", 3) == "52:54:00:00:00:03"
    assert names.mac_address("52:54:00:77", 300, 1) == "52:54:00:77:01:2d"
    with pytest.raises(ValueError, match="does not fit"):
        names.mac_address("52:54:00:77", 65536)
    s = eth(**{"mac-prefix": "02:00", "mac-start-offset": 16}).settings
    assert ethernet.vm_mac(s, 0) == "02:00:00:00:00:10"


# ---------------------------------------------------------------- the undo log

def test_undo_log_replays_in_reverse_then_drops_the_record(tmp_path):
    log = UndoLog(str(tmp_path))
    log.record(7, "a", name="first")
    log.record(7, "b", name="second")
    log.record(8, "a", name="other job")
    assert log.jobs() == [7, 8]
    assert log.entries(7) == [
        {"kind": "a", "args": {"name": "first"}}, {"kind": "b", "args": {"name": "second"}}]
    done = []
    actions = {"a": lambda name: done.append(name), "b": lambda name: done.append(name)}
    log.replay(7, actions)
    assert done == ["second", "first"]
    assert log.jobs() == [8] and sorted(p.name for p in tmp_path.iterdir()) == ["undo-8.json"]  # no temporary file left
    log.replay(7, actions)  # nothing recorded: nothing to do
    assert done == ["second", "first"]


def test_undo_keeps_what_it_could_not_remove(tmp_path):
    log = UndoLog(str(tmp_path))
    for name in ("x", "y", "z"):
        log.record(3, "thing", name=name)
    log.record(3, "mystery")

    def undo(name):
        if name == "y":
            raise PcoccError("device busy")

    with pytest.raises(UndoError, match=r"2 object\(s\) not removed: thing name=y: device busy; mystery : no undo action"):
        log.replay(3, {"thing": undo})
    assert [e["args"].get("name") for e in log.entries(3)] == ["y", None]
    log.replay(3, {"thing": lambda name: None, "mystery": lambda: None})  # a later replay finishes the job
    assert log.jobs() == []


# ---------------------------------------------------------------- the VM side

def test_nic_arguments():
    netdev = ethernet.EthernetDriver(eth(**{"datapath-type": "netdev"}))
    assert netdev.nic_args(12, 3, 0, "virtio-net") == [
        "-netdev", "tap,id=net0,ifname=pnt12_3,script=no,downscript=no,vnet_hdr=off",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:03"]
    kernel = ethernet.EthernetDriver(eth(mtu=9000, **{"datapath-type": "system"}))
    args = kernel.nic_args(12, 3, 1, "virtio-net")
    assert "vnet_hdr" not in args[1] and args[3].endswith(",host_mtu=8950") and "id=net1" in args[1]
    assert kernel.nic_args(12, 3, 0, "e1000")[3].startswith("e1000,netdev=net0,")


def test_datapath_auto_is_the_kernels_where_the_kernel_has_it(monkeypatch):
    from pcocc.networks import hostnet

    # a network written with the original's keys only: datapath-type is ours, its default asks the kernel
    auto = eth().settings
    assert auto["datapath-type"] == "auto"
    assert ethernet.datapath_type(auto, kernel_has_it=lambda: True) == "system"
    assert ethernet.datapath_type(auto, kernel_has_it=lambda: False) == "netdev"
    for written in ("system", "netdev"):  # a written value is kept, whatever the kernel has
        assert ethernet.datapath_type(eth(**{"datapath-type": written}).settings, kernel_has_it=lambda: False) == written
    # the VM's tap follows the same answer as the node's bridge
    monkeypatch.setattr(hostnet, "kernel_has_ovs_datapath", lambda: False)
    assert "vnet_hdr=off" in ethernet.EthernetDriver(eth()).nic_args(1, 0, 0, "virtio-net")[1]
    monkeypatch.setattr(hostnet, "kernel_has_ovs_datapath", lambda: True)
    assert "vnet_hdr" not in ethernet.EthernetDriver(eth()).nic_args(1, 0, 0, "virtio-net")[1]


def test_generic_netlink_families_are_found_by_name():
    from pcocc.networks import hostnet

    assert hostnet.genl_family_exists("nlctrl")  # the controller itself: every kernel has it
    assert not hostnet.genl_family_exists("pcocc_no_such_family")
    assert hostnet.kernel_has_ovs_datapath() == hostnet.genl_family_exists("ovs_datapath")


def test_networks_too_small_fail_clearly():
    with pytest.raises(PcoccError, match="int-network and ext-network need room for at least 2 hosts"):
        ethernet.EthernetDriver(eth(**{"network-layer": "L3", "int-network": "10.0.0.0/31"})).check()


def test_bridged_nics_have_macs_unique_per_job_and_rank():
    from pcocc import networks
    from pcocc.networks import bridged

    driver = networks.driver(Network("lan", "bridged", {"host-bridge": "br0", "tap-prefix": "vt", "mtu": 1500}))
    args = driver.nic_args(12, 3, 1, "virtio-net")
    assert args[1] == "tap,id=net1,ifname=vt12_3,script=no,downscript=no"
    assert args[3] == f"virtio-net-pci,netdev=net1,mac={bridged.vm_mac(12, 3)}"
    macs = {bridged.vm_mac(job, rank) for job in range(100) for rank in range(50)}
    assert len(macs) == 5000 and all(m.startswith("02:") for m in macs)  # locally administered, unicast


# ---------------------------------------------------------------- L3: addresses, DHCP and DNS, ssh

def test_l3_addresses_and_dnsmasq_configuration():
    from pcocc.networks import gateway

    s = eth(**{"network-layer": "L3", "int-network": "10.200.0.0/24", "domain-name": "my.domain",
               "dns-server": "192.0.2.53", "ntp-server": "192.0.2.123", "mtu": 9000}).settings
    a = gateway.Addressing(s, "priv")
    assert (str(a.vm_ip(0)), str(a.vm_ip(252)), str(a.gateway)) == ("10.200.0.1", "10.200.0.253", "10.200.0.254")
    with pytest.raises(PcoccError, match="vm253 does not fit in int-network 10.200.0.0/24"):
        a.vm_ip(253)
    assert a.ext_pool() == ("extip-priv", 1, 65534) and str(a.ext_ip(1)) == "10.201.0.1"
    conf = gateway.dnsmasq_conf(s, a, {0: "52:54:00:00:00:00", 5: "52:54:00:00:00:05"}, "/x/leases").splitlines()
    # leases last as long as the cluster, and the VMs' MTU leaves room for VXLAN (pcocc-networks.yaml(5))
    for line in ("interface=gw", "dhcp-range=10.200.0.0,static,255.255.255.0,infinite", "dhcp-option=option:router,10.200.0.254",
                 "dhcp-option=option:dns-server,10.200.0.254", "dhcp-option=option:mtu,8950", "domain=my.domain",
                 "local=/my.domain/", "dhcp-option=option:domain-search,my.domain", "dhcp-option=option:ntp-server,192.0.2.123",
                 "server=192.0.2.53", "no-resolv", "dhcp-host=52:54:00:00:00:05,10.200.0.6,vm5,infinite",
                 "host-record=vm5.my.domain,vm5,10.200.0.6", "dhcp-leasefile=/x/leases"):
        assert line in conf
    # no upstream DNS server: forward to the host's resolvers; the domain is pcocc.<host's domain>
    bare = gateway.dnsmasq_conf(eth(**{"network-layer": "L3"}).settings, a, {1: "52:54:00:00:00:01"}, "/l",
                                getfqdn=lambda: "node7.site.example").splitlines()
    assert "resolv-file=/etc/resolv.conf" in bare and "no-resolv" not in bare and not any(x.startswith("server=") for x in bare)
    assert "host-record=vm1.pcocc.site.example,vm1,10.200.0.2" in bare and "domain=pcocc.site.example" in bare


def test_ssh_config_names_each_reachable_vm():
    from pcocc.lifecycle import remote

    objects = {"address": "192.0.2.7", "vm_port": 22, "vms": {"0": {"host_port": 40001}, "1": {"ip": "10.0.0.2"}}}
    info = {"jobid": 42, "nodes": {"n1": {"objects": {"pub": objects}}}}
    vms = [{"rank": 0, "host": "n1", "state": "running"}, {"rank": 1, "host": "n1", "state": "running"}]
    assert remote.port_map(info, vms) == {0: ("192.0.2.7", 40001, 22)}
    conf = remote.ssh_config(info, vms, "/k", ["/h/.ssh/id_ed25519"])
    assert "Host vm0\n  HostName 192.0.2.7\n  Port 40001\n  HostKeyAlias pcocc-42-vm0\n" in conf
    assert "IdentityFile /h/.ssh/id_ed25519" in conf and "Host vm1" not in conf and conf.endswith("Include ~/.ssh/config\n")
    assert remote.endpoint(info, vms, 0) == ("192.0.2.7", 40001)
    with pytest.raises(PcoccError, match="vm1 has no reverse-NATed port"):
        remote.endpoint(info, vms, 1)
    with pytest.raises(PcoccError, match="port 80 of vm0 is not reverse-NATed"):
        remote.endpoint(info, vms, 0, 80)
    # job ids can come back (a new SLURM controller): host keys are remembered per job id and creation time
    assert "HostKeyAlias pcocc-42-1700000000500-vm0" in remote.ssh_config({**info, "created": 1700000000.5}, vms, "/k")
    with pytest.raises(PcoccError, match="no VM of cluster 42 has a reverse-NATed ssh port"):
        remote.ssh_config({"jobid": 42}, vms, "/k")


# ---------------------------------------------------------------- node setup with fake host drivers

class FakeHost:
    """Ovs and Ip in memory; each creation checks that the undo log named the object first."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.objects = set()
        self.tunnels = {}  # port -> (remote ip, VNI)

    def recorded(self):
        log = UndoLog(str(self.log_dir))
        return [e["args"] for job in log.jobs() for e in log.entries(job)]

    def make(self, obj, args):
        assert args in self.recorded(), f"{obj} made before it was recorded"
        self.objects.add(obj)

    def classes(self):
        host = self

        class Ovs:
            def __init__(self, environ=None):
                pass

            def add_bridge(self, bridge, datapath_type="system"):
                host.make(("bridge", bridge), {"bridge": bridge})

            def del_bridge(self, bridge):
                host.objects = {o for o in host.objects if o[1] != bridge and o[:2] != ("port", bridge)}

            def add_port(self, bridge, port, protected=False):
                host.make(("port", bridge, port), {"bridge": bridge, "port": port})

            def add_vxlan_port(self, bridge, port, remote_ip, key):
                host.make(("port", bridge, port), {"bridge": bridge, "port": port})
                host.tunnels[port] = (remote_ip, key)

            def add_vxlan_ports(self, bridge, tunnels, key):
                for port, remote_ip in tunnels:
                    self.add_vxlan_port(bridge, port, remote_ip, key)

            def del_port(self, bridge, port):
                host.objects.discard(("port", bridge, port))

        class Ip:
            def __init__(self, environ=None):
                pass

            def add_tap(self, name, uid, mtu):
                host.make(("tap", name), {"name": name})

            def del_link(self, name):
                host.objects.discard(("tap", name))

        return Ovs, Ip


@pytest.fixture
def node(tmp_path, monkeypatch):
    from pcocc.lifecycle import nodesetup
    from pcocc.context import Context
    from pcocc.env import Environment

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "networks.yaml").write_text("priv:\n  type: ethernet\n  settings: {dev-prefix: pn, network-layer: L2}\n")
    (etc / "resources.yaml").write_text("default:\n  default: true\nl2net:\n  networks: [priv]\n")
    state = tmp_path / "state"
    environ = {"PCOCC_SYSTEM_CONF_DIR": str(etc), "PCOCC_NODE_STATE_DIR": str(state), "PCOCC_TUNNEL_IP": "192.0.2.1"}
    ctx = Context(Environment(environ=environ, user="root", home=str(tmp_path)))
    host = FakeHost(state)
    monkeypatch.setattr(hostnet, "Ovs", host.classes()[0])
    monkeypatch.setattr(hostnet, "Ip", host.classes()[1])
    dead = set()
    monkeypatch.setattr(nodesetup, "liveness", lambda ctx: (lambda jobid: int(jobid) not in dead))
    yield ctx, host, dead, state
    ctx.close_store()


def put_cluster(ctx, jobid, rsets, peers=()):
    from pcocc import state

    ctx.store.put(state.cluster_prefix("root", jobid) + "info", {"jobid": jobid, "vms": [{"rank": i, "settings": {"resource-set": r}} for i, r in enumerate(rsets)]})
    for host, ip in peers:  # as a peer's node setup publishes itself: its record, and its endpoint apart
        ctx.store.put(state.cluster_prefix("root", jobid) + f"nodes/{host}", {"state": "network-config", "networks": ["priv"], "endpoint": ip})
        ctx.store.put(state.peer_key("root", jobid, host), {"networks": ["priv"], "endpoint": ip})


def test_node_setup_records_then_creates_and_delete_undoes_it(node):
    from pcocc.allocator import Pool
    from pcocc.lifecycle import nodesetup

    ctx, host, dead, state_dir = node
    put_cluster(ctx, 5, ["l2net", "default", "l2net"], peers=[("far", "192.0.2.2")])
    nodesetup.create(ctx, 5, 0, 2, ranks=[0, 1], step_nodes=[ctx.hostname, "far"])
    assert host.objects == {("bridge", "pnb5"), ("tap", "pnt5_0"), ("port", "pnb5", "pnt5_0"), ("port", "pnb5", "pnx5_1")}  # vm1 has no network
    (vni,) = Pool(ctx.store, "vxlan", 0, 0).owners()  # the job's VXLAN id: drawn at random from the pool
    assert host.tunnels == {"pnx5_1": ("192.0.2.2", vni)}
    record = ctx.store.get(f"/pcocc/users/root/clusters/5/nodes/{ctx.hostname}")
    assert record["state"] == "complete" and record["endpoint"] == "192.0.2.1" and record["objects"] == {"priv": {"bridge": "pnb5", "vni": vni}}
    # what its peers wait for, apart from its record: the networks and endpoint only
    assert ctx.store.get(f"/pcocc/users/root/clusters/5/peers/{ctx.hostname}") == {"networks": ["priv"], "endpoint": "192.0.2.1"}
    nodesetup.delete(ctx, 5, 0)
    assert ctx.store.get(f"/pcocc/users/root/clusters/5/peers/{ctx.hostname}") is None
    assert host.objects == set() and list(state_dir.glob("undo-*")) == []
    assert Pool(ctx.store, "vxlan", 0, 0).owners() == {vni: "5:priv"}  # "far" still holds it
    nodesetup.delete(ctx, 5, 0)  # twice is fine


def test_a_dead_jobs_leftovers_are_undone_by_the_next_setup(node):
    from pcocc.allocator import Pool
    from pcocc.lifecycle import nodesetup
    from pcocc.networks.undo import UndoLog

    ctx, host, dead, state_dir = node
    put_cluster(ctx, 6, ["l2net"])
    nodesetup.create(ctx, 6, 0, 1, ranks=[0])
    UndoLog(str(state_dir)).record(6, "tap", name="pnt6_9")  # as if killed right after recording
    dead.add(6)
    put_cluster(ctx, 7, ["l2net"])
    nodesetup.create(ctx, 7, 0, 1, ranks=[0])
    assert {o for o in host.objects if "6" in o[1]} == set()
    assert [p.name for p in state_dir.glob("undo-*")] == ["undo-7.json"]
    assert list(Pool(ctx.store, "vxlan", 0, 0).owners().values()) == ["7:priv"]  # the dead job's VNI, reclaimed


def test_node_setup_fails_clearly_before_making_anything(node, tmp_path):
    from pcocc.lifecycle import nodesetup

    ctx, host, dead, state_dir = node
    (tmp_path / "etc" / "networks.yaml").write_text("priv:\n  type: ethernet\n  settings: {dev-prefix: pn, int-network: 10.0.0.0/31}\n")
    put_cluster(ctx, 8, ["l2net"])
    with pytest.raises(PcoccError, match="node setup failed on .*: network 'priv': int-network and ext-network need room"):
        nodesetup.create(ctx, 8, 0, 1, ranks=[0])
    assert ctx.store.get(f"/pcocc/users/root/clusters/8/nodes/{ctx.hostname}")["state"] == "failed"
    assert host.objects == set()


def test_gateway_namespaces_of_two_test_clusters_never_share_a_name(tmp_path):
    """/run/netns is host-wide: two test clusters (or a test cluster and this host's local
    backend), whose nodes and job ids repeat (node1, job 1), got the same gateway namespace name,
    and one's setup replaced the other's namespace. The node state dir's tag tells them apart."""
    from pcocc.networks.gateway import netns_name, netns_tag

    a, b = tmp_path / "a", tmp_path / "b"
    assert netns_name(1, "pub", "node1", str(a)) != netns_name(1, "pub", "node1", str(b))
    assert netns_name(1, "pub", "node1", str(a)) == netns_name(1, "pub", "node1", str(a) + "/")
    name = netns_name(1, "pub", "node1", str(a))
    assert name.startswith("pcocc-node1-1-pub-") and name.endswith(netns_tag(str(a))) and len(netns_tag(str(a))) == 7
