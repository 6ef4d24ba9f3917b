"""An L3 `ethernet` network configured with only the original pcocc's keys, on the local
backend (as root): the defaults of pcocc-networks.yaml(5) hold on a real network.

- DHCP hands the VMs the network's mtu less 50 (room for VXLAN): 1450 for the default 1500
  (repro 06: 1500 was handed out and full-size frames between nodes were lost);
- the VMs' domain is pcocc.<this host's DNS domain> (or pcocc), and vmN.<domain> resolves;
- with no dns-server, outside names resolve through the host's resolvers: here a resolver
  file of the test's own (our `resolv-file` setting) naming a dnsmasq the test starts on a
  bridge of this host, which serves one test name. Never /etc/resolv.conf.

Open vSwitch, that interface and the test's dnsmasq are the test's own, stopped by pid.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_local_network import dhcp_env, ovs, vm_sh  # noqa: F401 (ovs is a fixture)
from waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("host-ovs")]

OUTSIDE_NAME, OUTSIDE_ADDR = "outside.pcocc-test", "192.0.2.77"


@pytest.fixture
def outside_resolver(tmp_path):
    """A dnsmasq on an interface of this host of its own (a bridge: this kernel has no dummy devices)
    that answers OUTSIDE_NAME; a resolv.conf naming it."""
    dev, addr = f"pcdns{os.getpid() % 100000}", "10.253.53.1"
    subprocess.run(["ip", "link", "add", dev, "type", "bridge"], check=True)
    proc = readable = None
    try:
        subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", dev], check=True)
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        proc = subprocess.Popen(["dnsmasq", "-k", "--conf-file=/dev/null", f"--listen-address={addr}", "--bind-interfaces",
                                 "--no-resolv", "--no-hosts", f"--address=/{OUTSIDE_NAME}/{OUTSIDE_ADDR}",
                                 f"--address=/{OUTSIDE_NAME}/2001:db8::77",  # nslookup asks AAAA too
                                 f"--pid-file={tmp_path / 'outside-dns.pid'}"], start_new_session=True)
        # dnsmasq reads it as its unprivileged user: a directory of ours others may enter (not tmp_path, 0700)
        readable = Path(tempfile.mkdtemp(prefix="pcocc-resolv-"))
        readable.chmod(0o755)
        resolv = readable / "resolv.conf"
        resolv.write_text(f"nameserver {addr}\n")
        resolv.chmod(0o644)
        yield resolv
    finally:
        if readable is not None:
            shutil.rmtree(readable, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "link", "del", dev], check=False)


def test_l3_defaults_of_the_original(site, ovs, outside_resolver, tmp_path):  # noqa: F811
    from pcocc.networks.gateway import domain_name

    etc = tmp_path / "etc"
    # the original's keys only, plus what this machine needs (a userspace datapath, the host's
    # ip_forward left alone) and where the "host's resolvers" are for this test
    (etc / "networks.yaml").write_text(f"""\
nat-rssh:
  type: ethernet
  settings:
    network-layer: L3
    dev-prefix: tu
    int-network: 10.248.0.0/24
    ext-network: 10.249.0.0/24
    datapath-type: netdev
    manage-ip-forward: false
    resolv-file: {outside_resolver}
""")
    (etc / "resources.yaml").write_text("default:\n  networks: []\nl3:\n  default: true\n  networks: [nat-rssh]\n")
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    site.environ.update(ovs, PCOCC_NODE_STATE_DIR=str(tmp_path / "node"))
    domain = domain_name({"domain-name": ""})
    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:2")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    try:
        for vm in (0, 1):
            wait_for(lambda: dhcp_env(site, vm).get("ip"), timeout=120, what=f"vm{vm}'s DHCP lease")
        assert dhcp_env(site, 1)["domain"] == domain
        # the MTU left room for VXLAN
        assert [vm_sh(site, vm, "cat /sys/class/net/eth0/mtu").stdout.strip() for vm in (0, 1)] == ["1450", "1450"]
        # the other VM by its short and its qualified name
        r = vm_sh(site, 1, f"nslookup vm0 10.248.0.254; nslookup vm0.{domain} 10.248.0.254")
        assert r.returncode == 0 and r.stdout.count("10.248.0.1") >= 2, r.stdout + r.stderr
        # a name outside the cluster, through the "host's" resolver
        r = vm_sh(site, 0, f"nslookup {OUTSIDE_NAME} 10.248.0.254")
        assert r.returncode == 0 and OUTSIDE_ADDR in r.stdout, r.stdout + r.stderr
    finally:
        site.pcocc("cancel", "-j", jobid)
