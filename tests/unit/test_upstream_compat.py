"""Config files written for the original pcocc load here with the same meaning (issue 13, first section).

Every file below is written for these tests in the original's format, as its man
pages describe it (pcocc-templates.yaml(5), pcocc-networks.yaml(5),
pcocc-resources.yaml(5), pcocc-batch.yaml(5)); each test asserts what the
setting means, not only that the file loads.
"""

import json
import os

import pytest

from pcocc import pathtpl
from pcocc.config.loader import load_config
from pcocc.errors import ExitStatus, NotFoundError, UsageError
from pcocc.images import legacy_dir, qcow2
from pcocc.images.store import ImageStore
from pcocc.networks import bridged, ethernet, gateway, jobnet
from pcocc.templates import SETTINGS

NET_L3 = "nat-rssh:\n  type: ethernet\n  settings:\n    dev-prefix: nat\n    network-layer: L3\n"


def config(cli):
    return load_config(cli.env())


# ---------------------------------------------------------------- resources.yaml

def test_a_resource_set_with_empty_networks_has_none_and_unknown_keys_are_only_warned(cli):
    cli.write("etc/networks.yaml", NET_L3)
    path = cli.write("etc/resources.yaml", "default:\n  default: true\n  networks:\nnat:\n  networks: [nat-rssh]\n  colour: blue\n")
    cfg = config(cli)
    assert cfg.resources["default"].networks == () and cfg.resources["nat"].networks == ("nat-rssh",)
    assert cfg.warnings == [f"{path}:6: nat.colour: unknown key, ignored (known keys: default, description, networks)"]
    r = cli("config", "validate")
    assert r.status == 0, r.stderr
    assert f"{path}:6: nat.colour: unknown key, ignored" in r.stderr and "warning" in r.stderr.lower()


# ---------------------------------------------------------------- templates: a key set to nothing

RESET_KEYS = ("custom-args", "mount-points", "user-data", "qemu-bin", "nic-model", "instance-id",
              "emulator-cores", "remote-display", "disk-cache")


def test_a_child_template_key_written_empty_gives_the_default_back(cli):
    cli.write("etc/templates.yaml", """\
parent:
  image: user:base
  custom-args: ['-cdrom', '/isos/tools.iso']
  mount-points:
    home: {path: '%{homedir}'}
  user-data: /etc/pcocc/ud.yaml
  qemu-bin: /opt/qemu/bin/qemu-system-x86_64
  nic-model: e1000
  instance-id: fixed-id
  emulator-cores: 2
  remote-display: spice
  disk-cache: writeback
""")
    cli.write("user/templates.yaml", "child:\n  inherits: parent\n" + "".join(f"  {k}:\n" for k in RESET_KEYS))
    tset = config(cli).templates
    parent, child = tset.resolve("parent"), tset.resolve("child")
    for key in RESET_KEYS:
        assert parent[key] != SETTINGS[key].default, key  # the parent really sets something else
        assert child[key] == SETTINGS[key].default, key
        assert child.origin[key] == "child", key
    assert child["image"] == "user:base"  # what the child does not write is still inherited


def test_an_empty_resource_set_key_gives_the_default_set(cli):
    cli.write("etc/resources.yaml", "main:\n  default: true\nother:\n  networks: []\n")
    cli.write("etc/templates.yaml", "a:\n  image: x\n  resource-set: other\nb:\n  inherits: a\n  resource-set:\n")
    assert config(cli).templates.resolve("b")["resource-set"] == "main"


# ---------------------------------------------------------------- templates: resource-set required

def test_a_template_without_resource_set_is_refused_when_no_set_is_the_default(cli):
    cli.write("etc/resources.yaml", "cluster:\n  networks: []\nib-cluster:\n  networks: []\n")
    path = cli.write("etc/templates.yaml", "good:\n  image: x\n  resource-set: cluster\nchild:\n  inherits: good\n\nbad:\n  image: x\n")
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG
    errors = [line for line in r.stderr.splitlines() if "resource-set" in line]
    assert len(errors) == 1, r.stderr  # 'child' inherits one
    assert f"{path}:7: bad: no resource-set" in errors[0] and "cluster, ib-cluster" in errors[0]
    # with a default set, or without resources.yaml at all, the same template is fine
    cli.write("etc/resources.yaml", "cluster:\n  default: true\n")
    assert cli("config", "validate").status == 0
    os.unlink(cli.system / "resources.yaml")
    cli.write("etc/templates.yaml", "bad:\n  image: x\n")
    assert cli("config", "validate").status == 0
    assert config(cli).templates.resolve("bad")["resource-set"] == "default"  # the built-in set


# ---------------------------------------------------------------- batch.yaml

def test_etcd_auth_munge_is_refused_with_the_reason_and_the_replacement(cli):
    path = cli.write("etc/batch.yaml", "type: slurm\nsettings:\n  etcd-servers: [kv1]\n  etcd-auth-type: munge\n")
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG
    line = next(x for x in r.stderr.splitlines() if "etcd-auth-type" in x)
    assert f"{path}:4: settings.etcd-auth-type:" in line and "munge credential" in line and "use 'password'" in line
    cli.write("etc/batch.yaml", "type: slurm\nsettings:\n  etcd-servers: [kv1]\n  etcd-auth-type: password\n")
    assert cli("config", "validate").status == 0


# ---------------------------------------------------------------- path templates

def test_path_templates_unbraced_percent_and_clusteruser(cli):
    cli.write("user/repos.yaml", "repos:\n  - name: mine\n    path: '%homedir/repo-100%%'\n")
    cli.write("etc/templates.yaml", "a:\n  image: x\n  mount-points:\n    home: {path: '/scratch/%{clusteruser}'}\n")
    cfg = config(cli)
    assert cfg.repos[0].path == f"{cli.home}/repo-100%"
    values = {"homedir": "/home/ann", "user": "ann", "vm_rank": 3}
    assert pathtpl.expand("/scratch/%{clusteruser}/vm%vm_rank", values, {}) == "/scratch/ann/vm3"
    assert pathtpl.expand("%{clusteruser}", {**values, "clusteruser": "bob"}, {}) == "bob"
    assert pathtpl.expand("/data/50%off/%user_files", values, {}) == "/data/50%off/%user_files"  # not ours: as written


# ---------------------------------------------------------------- networks.yaml: bridged

def test_bridged_vlans_in_the_original_list_form_make_the_same_plan_as_the_mapping(cli):
    cli.write("etc/networks.yaml", """\
listed:
  type: bridged
  settings:
    host-bridge: br0
    tap-prefix: lt
    vlans:
      - {vid: 10, type: tagged}
      - {vid: 20, type: tagged}
      - {vid: 5, type: native}
mapped:
  type: bridged
  settings: {host-bridge: br0, tap-prefix: mt, vlans: {native: 5, tagged: [10, 20]}}
only:
  type: bridged
  settings: {host-bridge: br0, tap-prefix: ot, vlans: [{vid: 10, type: tagged}]}
""")
    nets = config(cli).networks
    assert nets["listed"].settings["vlans"] == nets["mapped"].settings["vlans"] == {"native": 5, "tagged": [10, 20], "untagged": []}
    assert nets["only"].settings["vlans"] == {"native": None, "tagged": [10], "untagged": []}


def test_bridged_vlans_refused_when_ambiguous(cli):
    path = cli.write("etc/networks.yaml", "b:\n  type: bridged\n  settings:\n    host-bridge: br0\n    tap-prefix: t\n"
                                          "    vlans: [{vid: 5, type: native}, {vid: 6, type: native}]\n")
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG and f"{path}:6: b.settings.vlans: only one VLAN can be native" in r.stderr


def test_bridged_untagged_vlan_on_a_linux_bridge(monkeypatch):
    """type: untagged is the original's `bridge vlan add ... untagged` (not the port's own VLAN)."""
    from pcocc.config.models import Network
    from pcocc.config.schema import At, Problems
    from pcocc.networks import hostnet

    settings = bridged.SETTINGS.check({"host-bridge": "br0", "tap-prefix": "t", "vlans": [{"vid": 7, "type": "untagged"}, {"vid": 9, "type": "native"}]},
                                      At("n.yaml", 1, "b.settings", Problems()))
    commands, masters = [], []

    class Result:
        returncode, stdout = 0, "bridge vlan_filtering 1"

    class Ip:
        def __init__(self, environ=None):
            pass

        def add_tap(self, name, uid, mtu):
            pass

        def set_master(self, dev, bridge, vlans):
            masters.append((dev, bridge, vlans))

    class Ovs:
        def __init__(self, environ=None):
            pass

        def has_bridge(self, bridge):
            return False

    monkeypatch.setattr(hostnet, "Ip", Ip)
    monkeypatch.setattr(hostnet, "Ovs", Ovs)
    monkeypatch.setattr(hostnet, "run", lambda argv, **kw: commands.append(argv) or Result())

    class Undo:
        def record(self, *a, **k):
            pass

    job = jobnet.NodeJob(jobid=4, uid=1000, host="n1", ranks=[0], nodes=["n1"], peers={}, environ={}, store=None,
                         undo=Undo(), owner_alive=None, nodes_key="")
    bridged.BridgedDriver(Network("b", "bridged", settings)).node_setup(job)
    assert masters == [("t4_0", "br0", {"native": 9, "tagged": [], "untagged": [7]})]
    assert ["bridge", "vlan", "add", "dev", "t4_0", "vid", "7", "untagged"] in commands


# ---------------------------------------------------------------- networks.yaml: deprecated types

def test_pv_is_an_l2_ethernet_network_with_a_deprecation_warning(cli):
    path = cli.write("etc/networks.yaml", """\
internal:
  type: pv
  settings:
    bridge-prefix: pvbr
    tap-prefix: pvtap
    mtu: 9000
    host-if-suffix: -ib
    mac-prefix: '52:54:01'
""")
    cli.write("etc/resources.yaml", "default:\n  default: true\n  networks: [internal]\n")
    cfg = config(cli)
    net = cfg.networks["internal"]
    assert net.type == "ethernet"
    s = net.settings
    assert (s["network-layer"], s["dev-prefix"], s["mtu"], s["host-if-suffix"], s["mac-prefix"]) == ("L2", "pvbr", 9000, "-ib", "52:54:01")
    assert ethernet.vm_mac(s, 2) == "52:54:01:00:00:02"  # the MACs the original gave: prefix, then the rank
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith(f"{path}:2: internal.type: 'pv' is deprecated")
    r = cli("config", "validate")
    assert r.status == 0 and "'pv' is deprecated" in r.stderr


def test_nat_is_refused_with_the_reason_and_the_replacement(cli):
    path = cli.write("etc/networks.yaml", """\
nat-ssh:
  type: nat
  settings:
    nat-network: 10.255.0.0/16
    vm-network: 10.254.0.0/16
    vm-network-gw: 10.254.0.1
    vm-ip: 10.254.0.2
    bridge: natbr
    tap-prefix: nattap
""")
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG
    line = next(x for x in r.stderr.splitlines() if "nat-ssh" in x)
    assert f"{path}:2: nat-ssh.type:" in line
    assert "no traffic between VMs" in line and "use type 'ethernet' with network-layer L3" in line
    # a resource set naming it is told so, not that the network is unknown (the original's sample confs do this)
    rpath = cli.write("etc/resources.yaml", "cluster:\n  networks:\n    - nat-ssh\n  default: true\n")
    r = cli("config", "validate")
    assert f"{rpath}:3: cluster.networks: network 'nat-ssh' is refused in networks.yaml (see its problem)" in r.stderr, r.stderr
    assert "unknown network" not in r.stderr


# ---------------------------------------------------------------- images given as a directory

def image_file(path, size=32 << 20, backing=None):
    qcow2.create_overlay(str(path), backing or "x", size)
    if backing is None:  # a standalone image: no backing file
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\0" * 12)
    return path


def test_an_image_directory_boots_its_latest_revision(cli, tmp_path):
    images = tmp_path / "images" / "centos"
    images.mkdir(parents=True)
    image_file(images / "image")
    image_file(images / "image-rev1", backing="image")
    image_file(images / "image-rev2", backing="image-rev1")
    (images / "image-rev2.tmp").write_text("not a revision")
    cli.write("etc/templates.yaml", f"centos:\n  image: '{tmp_path}/images/centos'\n  description: older form\n")
    assert cli("config", "validate").status == 0
    store = ImageStore([], "tester")
    value = config(cli).templates.resolve("centos")["image"]
    rev = store.find(value)
    assert (rev.revision, rev.top, rev.size) == (2, str(images / "image-rev2"), 32 << 20)
    assert rev.uri == f"{images}@2"
    assert store.find(f"{images}@0").top == str(images / "image")  # revisions as usual
    assert store.find(rev.uri).top == rev.top  # what a checkpoint records finds the same file again
    with pytest.raises(NotFoundError, match="has no revision 7 .revisions: 0, 1, 2."):
        store.find(f"{images}@7")
    with pytest.raises(NotFoundError, match="holds no image"):
        store.find(str(tmp_path))
    # read in place, never written: a save in place is refused, naming the way out
    with pytest.raises(UsageError, match="read-only") as exc:
        store.save_layer(rev, lambda path, backing: None)
    assert "-d [REPO:]NAME" in exc.value.hint


def test_an_image_directory_with_only_image_is_revision_0(tmp_path):
    image_file(tmp_path / "image", size=1 << 20)
    rev = legacy_dir.find(str(tmp_path) + "/")
    assert (rev.revision, rev.layers, rev.size) == (0, ("image",), 1 << 20)
    (tmp_path / "image-rev1").write_bytes(b"\0" * 4096)
    with pytest.raises(UsageError, match="not a qcow2 image"):
        legacy_dir.find(str(tmp_path))


# ---------------------------------------------------------------- network defaults (L3 ethernet)

def l3(cli, text=""):
    cli.write("etc/networks.yaml", NET_L3 + text)
    return config(cli).networks["nat-rssh"].settings


def test_l3_dhcp_hands_the_vms_mtu_less_50(cli):
    from pcocc.networks.gateway import Addressing

    s = l3(cli)  # mtu left to its default, 1500
    conf = gateway.dnsmasq_conf(s, Addressing(s, "nat-rssh"), {0: "52:54:00:00:00:00"}, "/l").splitlines()
    assert "dhcp-option=option:mtu,1450" in conf
    s = l3(cli, "    mtu: 9000\n")
    conf = gateway.dnsmasq_conf(s, Addressing(s, "nat-rssh"), {0: "52:54:00:00:00:00"}, "/l").splitlines()
    assert "dhcp-option=option:mtu,8950" in conf
    nic = ethernet.EthernetDriver(config(cli).networks["nat-rssh"]).nic_args(3, 0, 0, "virtio-net")
    assert nic[3].endswith(",host_mtu=8950")


def test_without_dns_server_the_vms_resolve_through_the_hosts_resolvers(cli):
    from pcocc.networks.gateway import Addressing

    s = l3(cli)
    conf = gateway.dnsmasq_conf(s, Addressing(s, "n"), {}, "/l").splitlines()
    assert "resolv-file=/etc/resolv.conf" in conf and "no-resolv" not in conf
    s = l3(cli, "    dns-server: 192.0.2.53\n")
    conf = gateway.dnsmasq_conf(s, Addressing(s, "n"), {}, "/l").splitlines()
    assert "server=192.0.2.53" in conf and "no-resolv" in conf and not any(x.startswith("resolv-file") for x in conf)
    s = l3(cli, "    allow-outbound: none\n")  # the VMs may not reach outside: no forwarding (the original's rule)
    assert "no-resolv" in gateway.dnsmasq_conf(s, Addressing(s, "n"), {}, "/l").splitlines()


def test_loopback_resolvers_are_detected(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search x\nnameserver 127.0.0.53\nnameserver 192.0.2.1\n")
    assert gateway.loopback_resolvers(str(conf)) == ["127.0.0.53"]
    assert gateway.loopback_resolvers(str(tmp_path / "none")) == []


def test_domain_name_defaults_to_pcocc_dot_the_hosts_domain(cli):
    from pcocc.networks.gateway import Addressing

    s = l3(cli)
    assert gateway.domain_name(s, getfqdn=lambda: "node12.hpc.example.org") == "pcocc.hpc.example.org"
    assert gateway.domain_name(s, getfqdn=lambda: "node12") == "pcocc"
    conf = gateway.dnsmasq_conf(s, Addressing(s, "n"), {1: "52:54:00:00:00:01"}, "/l", getfqdn=lambda: "node12").splitlines()
    assert "domain=pcocc" in conf and "host-record=vm1.pcocc,vm1,10.200.0.2" in conf
    s = l3(cli, "    domain-name: 'mycluster.local.'\n    dns-search: 'a.example,b.example'\n")
    conf = gateway.dnsmasq_conf(s, Addressing(s, "n"), {1: "52:54:00:00:00:01"}, "/l").splitlines()
    assert "host-record=vm1.mycluster.local,vm1,10.200.0.2" in conf
    assert "dhcp-option=option:domain-search,mycluster.local,a.example,b.example" in conf  # in addition to the domain


def test_leases_do_not_expire_while_the_job_runs(cli):
    from pcocc.networks.gateway import Addressing

    s = l3(cli)
    conf = gateway.dnsmasq_conf(s, Addressing(s, "n"), {0: "52:54:00:00:00:00"}, "/l").splitlines()
    assert [x for x in conf if x.startswith("dhcp-range=")] == ["dhcp-range=10.200.0.0,static,255.255.0.0,infinite"]
    assert "dhcp-host=52:54:00:00:00:00,10.200.0.1,vm0,infinite" in conf


def test_host_if_suffix_selects_each_nodes_tunnel_endpoint(cli, monkeypatch):
    cli.write("etc/networks.yaml", "pv:\n  type: ethernet\n  settings: {dev-prefix: pv, network-layer: L2, host-if-suffix: -ib}\n"
                                   "plain:\n  type: ethernet\n  settings: {dev-prefix: pl, network-layer: L2}\n")
    cli.write("etc/resources.yaml", "default:\n  default: true\n  networks: [pv, plain]\n")
    cfg = config(cli)
    names = {"node1-ib": "10.9.0.1"}
    monkeypatch.setattr(jobnet.socket, "gethostbyname", lambda name: names[name])
    info = {"vms": [{"rank": 0, "settings": {"resource-set": "default"}}]}
    plan = jobnet.plan(cfg, info, [0], {jobnet.TUNNEL_IP_ENV: "192.0.2.1"}, "node1")
    assert plan.record() == {"networks": ["pv", "plain"], "endpoint": "192.0.2.1", "endpoints": {"pv": "10.9.0.1"}}
    # the other nodes tunnel to a peer's suffixed endpoint on that network, to its plain one elsewhere
    peer = {"networks": ["pv", "plain"], "endpoint": "192.0.2.2", "endpoints": {"pv": "10.9.0.2"}}
    assert (jobnet.peer_endpoint(peer, "pv"), jobnet.peer_endpoint(peer, "plain")) == ("10.9.0.2", "192.0.2.2")
    seen = {}

    class Driver:
        needs_peers = True

        def node_setup(self, job):
            seen[job.ranks[0]] = job.peers

    fake = jobnet.NodePlan(networks={"pv": (cfg.networks["pv"], Driver(), [0]), "plain": (cfg.networks["plain"], Driver(), [1])})
    jobnet.setup_node(fake, {"node2": peer}, dict(jobid=1, uid=0, host="node1", nodes=["node1", "node2"], environ={}, store=None,
                                                  undo=None, owner_alive=None, nodes_key=""))
    assert seen == {0: {"node2": "10.9.0.2"}, 1: {"node2": "192.0.2.2"}}
    monkeypatch.setattr(jobnet.socket, "gethostbyname", lambda name: (_ for _ in ()).throw(OSError("unknown")))
    with pytest.raises(Exception, match="cannot resolve node1-ib, the tunnel endpoint of node node1"):
        jobnet.plan(cfg, info, [0], {jobnet.TUNNEL_IP_ENV: "192.0.2.1"}, "node1")


def test_config_show_reports_the_original_keys_with_their_meaning(cli):
    cli.write("etc/networks.yaml", NET_L3)
    r = cli("config", "show", "--json")
    s = r.json["networks"]["nat-rssh"]["settings"]
    assert (s["mtu"], s["network-layer"], s["dns-server"], s["resolv-file"]) == (1500, "L3", "", "/etc/resolv.conf")
    assert json.loads(json.dumps(s)) == s


def test_a_resolver_file_dnsmasq_cannot_read_is_detected(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    assert not gateway.readable_by_anyone(str(private / "resolv.conf"))  # dnsmasq, no longer root, would not see it
    assert gateway.readable_by_anyone("/etc/passwd")
    assert not gateway.readable_by_anyone(str(tmp_path / "missing"))
