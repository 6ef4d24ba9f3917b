"""InfiniBand SR-IOV, hostib and generic PCI passthrough, against a SIMULATED sysfs and a SIMULATED OpenSM.

No InfiniBand hardware here: tests/sim/sysfs.py models a node's PCI tree, an
mlx5 PF with VFs, IOMMU groups and the kernel's reactions to bind/unbind/
driver_override writes; tests/sim/opensm.py stands in for OpenSM. Hardware
validation on a real cluster is still to be done (docs/infiniband.md).
"""

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sim.sysfs import SimulatedHost
from store_fixtures import connect, etcd_server, store  # noqa: F401 - fixtures

from pcocc import state
from pcocc.allocator import Pool
from pcocc.lifecycle import nodesetup
from pcocc.context import Context
from pcocc.env import Environment
from pcocc.errors import PcoccError
from pcocc.networks import infiniband, jobnet, pkeyd, sysfs

SIM = Path(__file__).parent.parent / "sim"
USER = pwd.getpwuid(65534).pw_name  # the jobs' owner: any user other than root
UID = 65534

NETWORKS = """\
ib:
  type: ib
  settings:
    host-device: mlx5_0
    min-pkey: "0x2000"
    max-pkey: "0x203f"
    license: pkey
    opensm-daemon: {daemon}
    opensm-partition-cfg: /etc/opensm/partitions.conf
    opensm-partition-tpl: /etc/opensm/partitions.conf.tpl
hib:
  type: hostib
  settings: {{host-device: mlx5_0}}
gpu:
  type: genericpci
  settings: {{host-device-addrs: ["81:00.0", "0000:82:00.0", "0000:83:00.0"], host-driver: gpudrv}}
priv:
  type: ethernet
  settings: {{dev-prefix: pn, network-layer: L2}}
"""
RESOURCES = "default:\n  default: true\nib:\n  networks: [ib]\nhib:\n  networks: [hib]\ngpu:\n  networks: [gpu]\nboth:\n  networks: [priv, ib]\n"
TEMPLATE = "# the site's static partitions\nDefault=0x7fff, ipoib : ALL=limited, SELF=full ;\n"


class Site:
    """Simulated nodes (each a sysfs root and a state dir) sharing one config and one store."""

    def __init__(self, tmp_path, monkeypatch, connect, daemon="opensm"):
        self.tmp = tmp_path
        self.connect = connect
        self.etc = tmp_path / "etc"
        self.etc.mkdir()
        (self.etc / "networks.yaml").write_text(NETWORKS.format(daemon=daemon))
        (self.etc / "resources.yaml").write_text(RESOURCES)
        self.hosts = {}  # name -> SimulatedHost
        self.dead = set()
        by_root = {}
        monkeypatch.setattr(sysfs, "open_host", lambda environ: by_root[sysfs.host_root(environ)])
        alive = lambda jobid: int(jobid) not in self.dead  # noqa: E731 - SLURM's view, as the tests set it
        monkeypatch.setattr(nodesetup, "job_alive", alive)
        if hasattr(nodesetup, "liveness"):
            monkeypatch.setattr(nodesetup, "liveness", lambda ctx: alive)
        monkeypatch.setattr(nodesetup, "_owner_alive", lambda *args: (lambda owner: alive(owner.split(":")[0])))
        self._by_root = by_root
        self.store = connect()

    def add_node(self, name, **kw):
        root = self.tmp / name / "root"
        root.mkdir(parents=True)
        self.hosts[name] = self._by_root[str(root)] = SimulatedHost(root, **kw)
        return self.hosts[name]

    def environ(self, name):
        return {"PCOCC_SYSTEM_CONF_DIR": str(self.etc), "PCOCC_NODE_STATE_DIR": str(self.tmp / name / "state"),
                "PCOCC_HOST_ROOT": str(self.tmp / name / "root")}

    def ctx(self, name, store=None):
        ctx = Context(Environment(environ=self.environ(name), user=USER, home=str(self.tmp)))
        ctx.hostname = name
        ctx._store = store or self.store
        return ctx

    def put_cluster(self, jobid, rsets):
        vms = [{"rank": i, "settings": {"resource-set": r, "nic-model": "virtio-net"}} for i, r in enumerate(rsets)]
        self.store.put(state.cluster_prefix(USER, jobid) + "info", {"jobid": jobid, "vms": vms})

    def record(self, name, jobid):
        return self.store.get(state.node_key(USER, jobid, name))

    def undo_entries(self, name):
        d = self.tmp / name / "state"
        from pcocc.networks.undo import UndoLog

        log = UndoLog(str(d))
        return [e for job in log.jobs() for e in log.entries(job)]


@pytest.fixture
def site(tmp_path, monkeypatch, connect):
    return Site(tmp_path, monkeypatch, connect)


@pytest.fixture
def sqlite_site(tmp_path, monkeypatch):
    from pcocc.store.sqlite import SqliteStore

    opened = []
    s = Site(tmp_path, monkeypatch, lambda: opened.append(SqliteStore(str(tmp_path / "state.db"))) or opened[-1])
    yield s
    for st in opened:
        st.close()


def config(site):
    return site.ctx("any").config


# ---------------------------------------------------------------- one job, step by step

def test_simulation_vfs_are_bound_passed_to_qemu_and_released(sqlite_site):
    site = sqlite_site
    host = site.add_node("n1", vfs=4)
    site.put_cluster(5, ["ib", "ib", "default"])
    ctx = site.ctx("n1")
    nodesetup.create(ctx, 5, UID, 2, ranks=[0, 1, 2])

    given = host.on_vfio()
    assert given == host.vfs[:2]  # one VF per VM on the network; vm2 has none
    for i, addr in enumerate(given):
        assert host.override(addr) == "vfio-pci"
        assert host.vf_guids(i) == {"policy": "Follow", "node": f"d0:cc:20:00:00:00:0{i}:00", "port": f"c0:cc:20:00:00:00:0{i}:00"}
        node = Path(host.path(f"/dev/vfio/{host.group(addr)}"))
        assert node.stat().st_uid == UID  # the user's qemu opens its VF's group
    assert host.vfio_nodes() == sorted(host.group(a) for a in given)
    record = site.record("n1", 5)
    assert record["state"] == "complete"
    ib = record["objects"]["ib"]
    assert ib["pkey"] == "0x2000" and sorted(ib["vms"]) == ["0", "1"] and ib["vms"]["1"]["addr"] == given[1]
    member = site.store.get(state.pkey_member_key("0x2000", "n1"))
    assert member == {"owner": "5:ib", "network": "ib", "host_guids": [host.port_guid],
                      "vf_guids": ["0xc0cc200000000000", "0xc0cc200000000100"]}

    # the VM's side (as the user, from the node record): -device vfio-pci with its own VF
    settings = {"resource-set": "ib", "nic-model": "virtio-net"}
    assert jobnet.nic_args(ctx.config, settings, 5, 1, record["objects"]) == [["-device", f"vfio-pci,host={given[1]},id=hostdev0"]]
    with pytest.raises(PcoccError, match="network 'ib': node setup recorded no device for vm2"):
        jobnet.nic_args(ctx.config, settings, 5, 2, record["objects"])

    nodesetup.delete(ctx, 5, UID)
    assert host.on_vfio() == [] and host.vfio_nodes() == []
    assert all(host.driver(a) == "mlx5_core" and host.override(a) == "(null)" for a in host.vfs)
    assert [host.vf_guids(i)["policy"] for i in range(4)] == ["Down"] * 4
    assert Pool(site.store, "pkey", 0, 0).owners() == {}
    assert site.store.range(state.pkey_members_prefix()) == {}
    nodesetup.delete(ctx, 5, UID)  # twice is fine


def test_simulation_writes_follow_the_kernel_protocol(sqlite_site):
    """Record, GUIDs, override, unbind from the host driver, probe; and the reverse at release."""
    site = sqlite_site
    host = site.add_node("n1", vfs=2)
    site.put_cluster(6, ["hib"])
    ctx = site.ctx("n1")
    nodesetup.create(ctx, 6, UID, 1, ranks=[0])
    vf = host.vfs[0]
    sriov = "/sys/class/infiniband/mlx5_0/device/sriov/0"
    assert host.writes == [
        (f"{sriov}/policy", "Follow\n"), (f"{sriov}/node", "d1:cc:00:00:00:06:00:00"), (f"{sriov}/port", "c1:cc:00:00:00:06:00:00"),
        (f"/sys/bus/pci/devices/{vf}/driver_override", "vfio-pci"), ("/sys/bus/pci/drivers/mlx5_core/unbind", vf),
        ("/sys/bus/pci/drivers_probe", vf)]
    assert "pkey" not in site.record("n1", 6)["objects"]["hib"]  # hostib: no partition, no PKey
    assert Pool(site.store, "pkey", 0, 0).owners() == {}
    del host.writes[:]
    nodesetup.delete(ctx, 6, UID)
    assert host.writes == [
        ("/sys/bus/pci/drivers/vfio-pci/unbind", vf), (f"/sys/bus/pci/devices/{vf}/driver_override", "\n"),
        (f"{sriov}/policy", "Down\n"), ("/sys/bus/pci/drivers/mlx5_core/bind", vf)]


def test_simulation_no_free_vf_and_a_missing_device_fail_clearly(sqlite_site):
    site = sqlite_site
    site.add_node("n1", vfs=1)
    site.put_cluster(7, ["ib", "ib"])
    with pytest.raises(PcoccError, match=r"node setup failed on n1: network 'ib': VFs of mlx5_0: 2 device\(s\) needed on this node, 1 free of 1"):
        nodesetup.create(site.ctx("n1"), 7, UID, 2, ranks=[0, 1])
    assert site.record("n1", 7)["state"] == "failed"
    assert site.hosts["n1"].on_vfio() == []  # nothing was bound
    site.add_node("n2", ib_device="mlx5_1")
    site.put_cluster(8, ["ib"])
    with pytest.raises(PcoccError, match=r"no InfiniBand device mlx5_0 on this host"):
        nodesetup.create(site.ctx("n2"), 8, UID, 1, ranks=[0])


def test_simulation_a_crashed_jobs_vfs_are_released_at_the_next_setup(sqlite_site):
    site = sqlite_site
    host = site.add_node("n1", vfs=3)
    site.put_cluster(10, ["ib", "ib"])
    nodesetup.create(site.ctx("n1"), 10, UID, 2, ranks=[0, 1])
    # killed while setting up a third VF: recorded, GUIDs written, still on the host driver
    from pcocc.networks.undo import UndoLog

    UndoLog(str(site.tmp / "n1" / "state")).record(10, "ib-vf", device="mlx5_0", vf=2, addr=host.vfs[2], host_driver="mlx5_core", group=host.group(host.vfs[2]))
    host.write("/sys/class/infiniband/mlx5_0/device/sriov/2/policy", "Follow\n")
    assert len(host.on_vfio()) == 2
    site.dead.add(10)  # SLURM no longer runs it; its delete never ran

    site.put_cluster(11, ["ib", "ib", "ib"])
    nodesetup.create(site.ctx("n1"), 11, UID, 3, ranks=[0, 1, 2])  # needs all three VFs
    assert host.on_vfio() == host.vfs
    assert [host.vf_guids(i)["port"] for i in range(3)] == [f"c0:cc:20:00:00:00:0{i}:00" for i in range(3)]  # the dead job's PKey, reused
    assert Pool(site.store, "pkey", 0, 0).owners() == {0x2000: "11:ib"}
    assert [m["owner"] for m in site.store.range(state.pkey_members_prefix()).values()] == ["11:ib"]
    assert {e["args"]["addr"] for e in site.undo_entries("n1") if e["kind"] == "ib-vf"} == set(host.vfs)
    assert [p.name for p in (site.tmp / "n1" / "state").glob("undo-*")] == ["undo-11.json"]


# ---------------------------------------------------------------- 32 jobs at once

def test_simulation_32_concurrent_jobs_get_unique_pkeys_and_never_share_a_vf(site):
    """4 nodes of 16 VFs; 32 jobs of 2 VMs, each on two nodes: 64 VFs, all of them, set up at once."""
    nodes = [f"node{i}" for i in range(4)]
    for i, n in enumerate(nodes):
        site.add_node(n, vfs=16, bus=0x10 + i)
    pairs = [(nodes[j % 4], nodes[(j + 1 + j // 4 % 3) % 4]) for j in range(32)]
    for j in range(32):
        site.put_cluster(100 + j, ["ib", "ib"])
    errors = []

    def setup(jobid, rank, node, peers):
        try:
            nodesetup.create(site.ctx(node, site.connect()), jobid, UID, 1, ranks=[rank], step_nodes=peers)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((jobid, node, exc))

    threads = [threading.Thread(target=setup, args=(100 + j, r, pairs[j][r], list(pairs[j]))) for j in range(32) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    pkeys = {}
    for j, (a, b) in enumerate(pairs):
        ra, rb = site.record(a, 100 + j)["objects"]["ib"], site.record(b, 100 + j)["objects"]["ib"]
        assert ra["pkey"] == rb["pkey"]  # the job's two nodes agree
        pkeys[100 + j] = ra["pkey"]
    assert len(set(pkeys.values())) == 32 and all(0x2000 <= int(p, 16) <= 0x203F for p in pkeys.values())
    for n in nodes:
        host = site.hosts[n]
        assert host.on_vfio() == host.vfs  # every VF taken...
        owners = [e["args"]["addr"] for e in site.undo_entries(n) if e["kind"] == "ib-vf"]
        assert sorted(owners) == host.vfs  # ...each by exactly one job
    members = site.store.range(state.pkey_members_prefix())
    assert len(members) == 64 and {m["owner"] for m in members.values()} == {f"{j}:ib" for j in pkeys}

    site.put_cluster(200, ["ib"])  # the 33rd finds no VF
    with pytest.raises(PcoccError, match="0 free of 16"):
        nodesetup.create(site.ctx("node0"), 200, UID, 1, ranks=[0])

    threads = [threading.Thread(target=lambda j=j, n=n: nodesetup.delete(site.ctx(n, site.connect()), 100 + j, UID))
               for j in range(32) for n in pairs[j]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in nodes:
        assert site.hosts[n].on_vfio() == [] and site.hosts[n].vfio_nodes() == []
    assert Pool(site.store, "pkey", 0, 0).owners() == {}  # every PKey given back by the last node out
    assert site.store.range(state.pkey_members_prefix()) == {}


# ---------------------------------------------------------------- generic PCI passthrough

def _add_gpus(host):
    host.add_driver("gpudrv", {("10de", "20b0")})
    host.add_driver("snd", {("10de", "1aef")})
    host.add_device("0000:81:00.0", "10de", "20b0", group="81", driver="gpudrv")
    host.add_device("0000:82:00.0", "10de", "20b0", group="82", driver="gpudrv")
    host.add_device("0000:82:00.1", "10de", "1aef", group="82", driver="snd")  # its audio function, same group
    host.add_device("0000:83:00.0", "10de", "20b0", group="83", driver=None)


def test_simulation_a_group_shared_with_a_host_driver_is_refused(sqlite_site):
    site = sqlite_site
    host = site.add_node("n1", vfs=1)
    _add_gpus(host)
    site.put_cluster(21, ["gpu", "gpu"])
    with pytest.raises(PcoccError, match=r"IOMMU group 82 of 0000:82:00.0 also holds 0000:82:00.1, bound to snd"):
        nodesetup.create(site.ctx("n1"), 21, UID, 2, ranks=[0, 1])
    assert host.driver("0000:82:00.0") == "gpudrv"  # refused before any write to it
    nodesetup.delete(site.ctx("n1"), 21, UID)
    assert host.driver("0000:81:00.0") == "gpudrv" and host.override("0000:81:00.0") == "(null)"


def test_simulation_generic_pci_unbound_device_and_release_to_host_driver(sqlite_site):
    site = sqlite_site
    host = site.add_node("n1", vfs=1)
    _add_gpus(host)
    host.write("/sys/bus/pci/drivers/snd/unbind", "0000:82:00.1")  # the admin freed the group
    site.put_cluster(22, ["gpu", "gpu", "gpu"])
    ctx = site.ctx("n1")
    nodesetup.create(ctx, 22, UID, 3, ranks=[0, 1, 2])
    vms = site.record("n1", 22)["objects"]["gpu"]["vms"]
    assert [vms[r]["addr"] for r in ("0", "1", "2")] == ["0000:81:00.0", "0000:82:00.0", "0000:83:00.0"]
    assert host.vfio_nodes() == ["81", "82", "83"]
    nodesetup.delete(ctx, 22, UID)
    # all go to the configured host driver, also the one that had none
    assert [host.driver(a) for a in ("0000:81:00.0", "0000:82:00.0", "0000:83:00.0")] == ["gpudrv"] * 3
    assert host.vfio_nodes() == []


# ---------------------------------------------------------------- the qemu side

def test_qemu_command_line_for_vfio_passthrough(tmp_path, monkeypatch):
    from pcocc.hypervisor import topology
    from pcocc.hypervisor.qemu import VMConfig, command_line
    from pcocc.networks import hostnet
    from pcocc.templates import SETTINGS

    objects = {"ib": {"vms": {"3": {"addr": "0000:03:00.2", "group": "304"}}}}
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "networks.yaml").write_text(NETWORKS.format(daemon="opensm"))
    (etc / "resources.yaml").write_text(RESOURCES)
    cfg = Context(Environment(environ={"PCOCC_SYSTEM_CONF_DIR": str(etc)}, user="u", home=str(tmp_path))).config
    settings = {k: s.default for k, s in SETTINGS.items()} | {"resource-set": "both"}
    monkeypatch.setattr(hostnet, "kernel_has_ovs_datapath", lambda: True)  # the ethernet network's datapath is the kernel's
    nics = jobnet.nic_args(cfg, settings, 12, 3, objects)
    assert nics == [["-netdev", "tap,id=net0,ifname=pnt12_3,script=no,downscript=no", "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:03"],
                    ["-device", "vfio-pci,host=0000:03:00.2,id=hostdev1"]]  # the ethernet NIC as before, then the VF
    vm = VMConfig(name="vm3", rundir=str(tmp_path), settings=settings, accel="tcg", topology=topology.plan((0,), 256, sysfs=str(tmp_path / "nosys")),
                  disk="/d/disk.qcow2", seed=None, boot=None, nics=nics)
    argv = command_line(vm)
    assert argv[argv.index("vfio-pci,host=0000:03:00.2,id=hostdev1") - 1] == "-device"
    # qemu itself takes the arguments and goes for the host device in sysfs (absent here)
    out = subprocess.run(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-S", *nics[1]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "vfio /sys/bus/pci/devices/0000:03:00.2: no such host device" in out.stderr


def test_networks_with_a_vf_cannot_be_checkpointed(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "networks.yaml").write_text(NETWORKS.format(daemon="opensm"))
    (etc / "resources.yaml").write_text(RESOURCES)
    cfg = Context(Environment(environ={"PCOCC_SYSTEM_CONF_DIR": str(etc)}, user="u", home=str(tmp_path))).config
    assert jobnet.unmigratable_networks(cfg, {"resource-set": "both"}) == ["ib"]
    assert jobnet.unmigratable_networks(cfg, {"resource-set": "hib"}) == ["hib"]
    assert jobnet.unmigratable_networks(cfg, {"resource-set": "gpu"}) == ["gpu"]
    assert jobnet.unmigratable_networks(cfg, {"resource-set": "default"}) == []
    assert jobnet.unmigratable_networks(cfg, {}) == []
    # what `pcocc ckpt` checks before it pauses anything
    from pcocc.lifecycle import checkpoint

    info = {"jobid": 7, "vms": [{"rank": 0, "settings": {"resource-set": "default"}}, {"rank": 1, "settings": {"resource-set": "both"}}]}
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot checkpoint cluster 7: vm1: network 'ib' \(infiniband\) passes a host device"):
        checkpoint.check_cluster(cfg, info)
    checkpoint.check_cluster(cfg, {"jobid": 8, "vms": [{"rank": 0, "settings": {"resource-set": "default"}}]})


def test_slurm_license_requested_once_per_network(tmp_path):
    from pcocc.batch.slurm import SlurmBackend

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "networks.yaml").write_text(NETWORKS.format(daemon="opensm"))
    (etc / "resources.yaml").write_text(RESOURCES)
    (etc / "templates.yaml").write_text("a:\n  resource-set: ib\nb:\n  resource-set: both\nc:\n  resource-set: gpu\n")
    ctx = Context(Environment(environ={"PCOCC_SYSTEM_CONF_DIR": str(etc)}, user="u", home=str(tmp_path)))
    backend = SlurmBackend(ctx)
    assert backend.with_licenses("a:3,b:2", {"name": "x"})["licenses"] == ["pkey"]  # one PKey for the cluster, not one per VM
    assert backend.with_licenses("c:2", {"name": "x"}) == {"name": "x"}
    argv = backend.allocation_argv("salloc", 5, backend.with_licenses("a:3,c:2", {"name": "x", "licenses": ["other"]}), [])
    assert argv[-2:] == ["-L", "other,pkey"]


# ---------------------------------------------------------------- pkeyd and a simulated OpenSM

def test_pkeyd_renders_upstream_partitions(sqlite_site):
    text = pkeyd.render(TEMPLATE, {0x2001: {"network": "ib", "vf_guids": ["0xc0cc200100000100", "0xc0cc200100000000"], "host_guids": ["0x0002c90300317e01"]}})
    assert text == TEMPLATE + (
        "\n# pcocc pkeyd: the partitions of virtual clusters (generated: edit the template, not this)\n"
        "pcocc_0x2001=0x2001, indx0, ipoib : 0xc0cc200100000000=full, 0xc0cc200100000100=full ;\n"
        "pcocc_0x2001=0x2001, ipoib : 0x0002c90300317e01=full ;\n")
    many = pkeyd.render("", {0x2002: {"vf_guids": [f"0xc0cc2002{i:08x}" for i in range(250)], "host_guids": []}})
    lines = [ln for ln in many.splitlines() if ln.startswith("pcocc_")]
    assert len(lines) == 3 and max(map(len, lines)) < 4096  # OpenSM's line limit


@pytest.fixture
def opensm(tmp_path):
    """A simulated OpenSM process (its own process name), stopped by pid at the end."""
    name = f"osm-sim-{os.getpid() % 100000}"
    root = tmp_path / "n1" / "root"
    (root / "etc/opensm").mkdir(parents=True)
    (root / "etc/opensm/partitions.conf.tpl").write_text(TEMPLATE)
    (root / "run").mkdir()
    pidfile = root / "run/opensm.pid"
    records = tmp_path / "opensm-records"
    records.mkdir()
    proc = subprocess.Popen([sys.executable, str(SIM / "opensm.py"), name, str(root / "etc/opensm/partitions.conf"), str(records), str(pidfile)])
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the simulated OpenSM did not start"
        time.sleep(0.02)

    def reads():
        path = records / "reads.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # the last line, being written
        return out

    yield {"name": name, "proc": proc, "reads": reads, "root": root, "pidfile": "/run/opensm.pid"}
    proc.terminate()
    proc.wait(timeout=30)


def wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_simulation_pkeyd_writes_partitions_and_signals_opensm(tmp_path, monkeypatch, connect, opensm):
    site = Site(tmp_path, monkeypatch, connect, daemon=opensm["name"])
    host = SimulatedHost(tmp_path / "n2" / "root", vfs=4)  # a compute node; n1 is the SM node (opensm's files)
    site._by_root[str(tmp_path / "n2" / "root")] = site.hosts["n2"] = host
    sm_env = site.environ("n1")
    site._by_root[sm_env["PCOCC_HOST_ROOT"]] = sysfs.HostFs(sm_env["PCOCC_HOST_ROOT"])  # the SM node: plain files
    stop = threading.Event()
    daemon = threading.Thread(target=pkeyd.serve, args=(site.connect(), site.ctx("n1").config, sm_env, stop))
    daemon.start()
    try:
        wait_for(lambda: len(opensm["reads"]()) >= 2)  # its own start, then pkeyd's first write
        first = opensm["reads"]()[-1]
        assert first["error"] is None and list(first["partitions"]) == ["0x7fff"]

        site.put_cluster(30, ["ib", "ib"])
        nodesetup.create(site.ctx("n2"), 30, UID, 2, ranks=[0, 1])
        wait_for(lambda: "0x2000" in (opensm["reads"]()[-1]["partitions"] or {}))
        part = opensm["reads"]()[-1]["partitions"]["0x2000"]
        assert part["members"] == {"0xc0cc200000000000": "full", "0xc0cc200000000100": "full", host.port_guid: "full"}
        assert part["flags"] == ["indx0", "ipoib"]
        assert opensm["reads"]()[-1]["partitions"]["0x7fff"]["members"] == {"ALL": "limited", "SELF": "full"}  # the template, kept
        on_disk = (opensm["root"] / "etc/opensm/partitions.conf")
        assert oct(on_disk.stat().st_mode & 0o777) == "0o644" and not list(on_disk.parent.glob(".*tmp"))

        nodesetup.delete(site.ctx("n2"), 30, UID)
        wait_for(lambda: "0x2000" not in (opensm["reads"]()[-1]["partitions"] or {}))
        assert all(r["error"] is None for r in opensm["reads"]())
    finally:
        stop.set()
        daemon.join(timeout=30)
    assert not daemon.is_alive()


def test_pkeyd_command_once_with_a_pidfile_and_its_errors(tmp_path, opensm):
    """`pcocc internal pkeyd` as a process: --once writes and signals by pidfile; errors are one line."""
    root = opensm["root"]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "networks.yaml").write_text(NETWORKS.format(daemon=opensm["pidfile"]))
    (etc / "resources.yaml").write_text(RESOURCES)
    (etc / "batch.yaml").write_text(f"type: local\nsettings:\n  store: sqlite\n  store-path: {tmp_path / 'state.db'}\n")
    from pcocc.store.sqlite import SqliteStore

    st = SqliteStore(str(tmp_path / "state.db"))
    st.put(state.pool_key("pkey"), {str(0x2005): "40:ib"})
    st.put(state.pkey_member_key("0x2005", "nodeA"), {"owner": "40:ib", "network": "ib", "host_guids": ["0x0000000000000a01"], "vf_guids": ["0xc0cc200500000000"]})
    st.put(state.pkey_member_key("0x2005", "nodeB"), {"owner": "39:ib", "network": "ib", "host_guids": ["0x0000000000000b01"], "vf_guids": ["0xc0cc200500000100"]})  # stale
    st.close()
    env = {**os.environ, "PCOCC_SYSTEM_CONF_DIR": str(etc), "PCOCC_HOST_ROOT": str(root)}
    pcocc = [sys.executable, "-m", "pcocc"]
    before = len(opensm["reads"]())
    out = subprocess.run([*pcocc, "internal", "pkeyd", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(opensm["reads"]()) == before + 1)
    assert opensm["reads"]()[-1]["partitions"]["0x2005"]["members"] == {"0xc0cc200500000000": "full", "0x0000000000000a01": "full"}

    out = subprocess.run([*pcocc, "internal", "pkeyd", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "opensm-partition-tpl" in out.stdout
    (root / "etc/opensm/partitions.conf.tpl").unlink()
    out = subprocess.run([*pcocc, "internal", "pkeyd", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[0].endswith(f"no partitions template {root}/etc/opensm/partitions.conf.tpl (opensm-partition-tpl): copy the site's partitions.conf there")
    (etc / "networks.yaml").write_text("priv:\n  type: ethernet\n  settings: {dev-prefix: pn}\n")
    (etc / "resources.yaml").write_text("default:\n  default: true\n")
    out = subprocess.run([*pcocc, "internal", "pkeyd", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().endswith("no infiniband network in networks.yaml: pkeyd has nothing to manage")


def test_pkeyd_finds_opensm_by_name(opensm):
    fs = sysfs.HostFs(str(opensm["root"]))
    assert pkeyd.opensm_pids(fs, opensm["name"]) == [opensm["proc"].pid]
    assert pkeyd.opensm_pids(fs, opensm["pidfile"]) == [opensm["proc"].pid]
    assert pkeyd.opensm_pids(fs, "no-such-daemon-here") == []


def test_guid_schemes():
    assert infiniband.pkey_guids(0x2abc, 0x1234) == ("0xd0cc2abc00123400", "0xc0cc2abc00123400")
    assert infiniband.job_guids(0x1_0000_0007, 3) == ("0xd1cc000000070003", "0xc1cc000000070003")
    assert infiniband.colon_guid("0x0002c90300317e01") == "00:02:c9:03:00:31:7e:01"


def test_simulation_vfs_held_elsewhere_are_never_taken(sqlite_site):
    """A VF recorded by a live job but not bound yet, and one an admin gave to vfio-pci, are both skipped."""
    from pcocc.networks.undo import UndoLog

    site = sqlite_site
    host = site.add_node("n1", vfs=4)
    UndoLog(str(site.tmp / "n1" / "state")).record(50, "ib-vf", device="mlx5_0", vf=0, addr=host.vfs[0], host_driver="mlx5_core", group=host.group(host.vfs[0]))
    host.write(f"/sys/bus/pci/devices/{host.vfs[1]}/driver_override", "vfio-pci")
    host.write("/sys/bus/pci/drivers/mlx5_core/unbind", host.vfs[1])
    host.write("/sys/bus/pci/drivers_probe", host.vfs[1])
    site.put_cluster(51, ["ib", "ib"])
    nodesetup.create(site.ctx("n1"), 51, UID, 2, ranks=[0, 1])  # job 50 still runs: its record stands
    assert sorted(vm["addr"] for vm in site.record("n1", 51)["objects"]["ib"]["vms"].values()) == host.vfs[2:]
    nodesetup.delete(site.ctx("n1"), 51, UID)
    assert host.driver(host.vfs[1]) == "vfio-pci" and host.driver(host.vfs[0]) == "mlx5_core"  # not ours: left alone


def test_pkeyd_systemd_unit_runs_the_command():
    import configparser
    import shlex

    from click.testing import CliRunner

    from pcocc.cli.internal import internal

    unit = configparser.ConfigParser()
    unit.read(Path(__file__).parent.parent.parent / "contrib/systemd/pcocc-pkeyd.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/pcocc") and argv[1:] == ["internal", "pkeyd"]
    assert CliRunner().invoke(internal, [*argv[2:], "--help"]).exit_code == 0
