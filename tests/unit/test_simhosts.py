"""The scale harness at a size that runs in CI: 8 simulated hosts x 16 VMs set up and torn
down through the real node-setup code on a real etcd (pcocc.testcluster.simhosts), and its
RecordingFake, which must answer as the real tools do and catch what the undo log misses.
Checks are on content (ids, objects, leftovers), never on time."""

import os

import pytest
from store_fixtures import etcd_server  # noqa: F401 - fixture

from pcocc.errors import CommandError
from pcocc.networks import hostnet
from pcocc.networks.undo import UndoLog
from pcocc.testcluster import simhosts
from pcocc.testcluster.simhosts import FakeRunners, FakeSlurm, RecordingFake, expected_objects


def test_eight_hosts_set_up_and_tear_down_through_the_real_code(etcd_server, tmp_path):  # noqa: F811
    result = simhosts.simulate([etcd_server.url], tmp_path, hosts=8, workers=2, check_order=True, cap=300)
    # no problem: every node complete, 128 VMs running with their ranks where they belong, one VXLAN
    # id for the job, no external address twice, no host port twice on a host, each host's objects
    # exactly its undo log's (each recorded before it was made), and after the teardown nothing left
    # on any host, in any node state dir, in the pools or under the cluster's keys
    assert result["problems"] == []
    assert result["hosts_up"] == 8 and result["vms"] == 128
    # per host at least: a bridge, 16 taps and their ports, 7 tunnels, the gateway's namespace
    assert result["objects"] >= 8 * (1 + 16 + 16 + 7 + 1)
    assert result["record_bytes"] > 0 and result["requests"] > 0

    # the launcher's end, real code: the cluster's history record is what stays of it
    from pcocc import history
    from pcocc.store.etcd import EtcdStore

    store = EtcdStore([etcd_server.url])
    try:
        import pwd

        ended = history.get(store, pwd.getpwuid(os.getuid()).pw_name, result["jobid"])
        assert ended["state"] == "COMPLETED" and len(ended["vms"]) == 128
    finally:
        store.close()


@pytest.fixture
def fake(tmp_path):
    runners = FakeRunners().install()
    host = RecordingFake("sim0000", FakeSlurm(running=[7], addresses={"sim0000": "10.100.0.0"}), tmp_path, check_order=True)
    runners.acting_as(host)
    yield host
    runners.uninstall()


def test_the_fake_answers_as_the_tools_do(fake):
    ovs, ip, iptables = hostnet.Ovs(), hostnet.Ip(), hostnet.Iptables()
    with pytest.raises(CommandError, match='Cannot find device "nope"'):
        ip._ip("link", "set", "dev", "nope", "up")
    ip.del_link("nope")  # hostnet's undo is idempotent: it asks whether the link exists
    ovs.del_port("nobr", "p")  # "no bridge named": the bridge went first, so did its ports
    ovs.del_bridge("nobr")
    with pytest.raises(CommandError, match="no bridge named nobr"):
        ovs.add_port("nobr", "p")
    iptables.ensure_chain("filter", "PCOCC-FORWARD", "FORWARD")
    iptables.ensure_chain("filter", "PCOCC-FORWARD", "FORWARD")  # once only
    iptables.add("filter", "PCOCC-FORWARD", ["-o", "x", "-j", "DROP"])
    iptables.drop_chain_if_empty("filter", "PCOCC-FORWARD", "FORWARD")  # still used: kept
    assert ("iptables-chain", "filter", "PCOCC-FORWARD") in fake.objects()
    iptables.delete("filter", "PCOCC-FORWARD", ["-o", "x", "-j", "DROP"])
    iptables.delete("filter", "PCOCC-FORWARD", ["-o", "x", "-j", "DROP"])  # gone already: fine
    iptables.drop_chain_if_empty("filter", "PCOCC-FORWARD", "FORWARD")
    assert fake.leftovers() == []
    # squeue and scontrol: the batch system's answers
    from pcocc.lifecycle import nodesetup

    assert nodesetup.job_alive(7) and not nodesetup.job_alive(8)
    from pcocc.networks import jobnet

    assert jobnet.node_address({}, "sim0000") == "10.100.0.0"


def test_the_checks_catch_an_object_the_undo_log_does_not_name(fake, tmp_path):
    log = UndoLog(str(tmp_path))
    log.record(7, "netns", name="ns7")
    ip = hostnet.Ip()
    ip.add_netns("ns7")
    ip.add_veth_into("plg7", "gw", "ns7", 1500)  # made, never recorded
    assert fake.order_errors == ["link {'name': 'plg7'} made before the undo log named it"]
    assert fake.objects() - expected_objects(log.entries(7)) == {("link", "plg7")}
    log.replay(7, hostnet.undo_actions())  # the namespace goes, and the veth with its peer inside
    assert fake.leftovers() == []
    ip.add_tap("plt7_0", 0, 1500)
    assert "('link', 'plt7_0')" in fake.leftovers()


def test_the_tunnel_mesh_is_made_in_batches_each_all_or_none(fake, tmp_path):
    log = UndoLog(str(tmp_path))
    log.record(7, "ovs-bridge", bridge="pb7")
    ovs = hostnet.Ovs()
    ovs.add_bridge("pb7", "netdev")
    tunnels = [(f"pv7_{i}", f"10.100.0.{i}") for i in range(5)]
    for port in [p for p, _ in tunnels] + ["pv7_9"]:
        log.record(7, "ovs-port", bridge="pb7", port=port)
    before = len(fake.commands)
    ovs.add_vxlan_ports("pb7", tunnels, 42, batch=2)
    assert len(fake.commands) - before == 3  # 5 ports, 2 per ovs-vsctl call
    assert {o for o in fake.objects() if o[0] == "ovs-port"} == {("ovs-port", "pb7", p) for p, _ in tunnels}
    with pytest.raises(CommandError, match="already exists"):
        ovs.add_vxlan_ports("pb7", [("pv7_9", "10.100.0.9"), ("pv7_0", "10.100.0.0")], 42)
    assert ("ovs-port", "pb7", "pv7_9") not in fake.objects()  # one transaction: none made
    assert fake.order_errors == []
