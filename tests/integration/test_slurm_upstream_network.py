"""An L3 `ethernet` network written with only the original pcocc's keys (pcocc-networks.yaml(5)),
on the real SLURM test cluster: a job of 2 VMs, one per node, VXLAN between the nodes.

- DHCP hands the VMs the network's mtu less 50 (1450 for the default 1500), and frames of that
  full size cross the nodes: a 1422-byte ping and a 1 MB transfer (checked by its checksum). For
  the module, the test cluster's tunnel underlay is put at the usual 1500 (it runs at 9000) and a
  control shows that a VM at 1500 loses its full-size frames there: the 50 bytes are needed;
- each VM resolves the other as vmN and vmN.<domain>, the domain being pcocc.<the node's DNS
  domain> or pcocc;
- with no dns-server, an outside name resolves through the host's resolvers: a resolver file of
  the test's own (our `resolv-file`, the one key that is not the original's) naming a dnsmasq the
  test starts on the test cluster's host bridge, which serves one test name. Never /etc/resolv.conf.
- the datapath is left to pcocc too (`datapath-type` unset): this kernel has no Open vSwitch
  module, so it takes the userspace one by itself.

The network and its resource set are added to the test cluster's config for this module only;
the dnsmasq is the test's own, stopped by pid.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import leftovers
from test_slurm_cluster import PCOCC, SlurmSite
from waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

OUTSIDE_NAME, OUTSIDE_ADDR = "outside.pcocc-test", "192.0.2.78"
PREFIX, INT_NET = "pu", "10.74.0"  # the network's dev-prefix and int-network (a /24)
UNDERLAY_MTU = 1500  # a site's usual Ethernet between nodes


def networks_yaml(resolv):
    # the original's keys only (mtu, datapath and DNS server left to their defaults), plus our resolv-file
    return f"""\
nat-rssh-up:
  type: ethernet
  settings:
    network-layer: "L3"
    dev-prefix: "{PREFIX}"
    int-network: "{INT_NET}.0/24"
    ext-network: "10.75.0.0/24"
    host-if-suffix: ""
    resolv-file: "{resolv}"
"""


RESOURCES = "upstream-l3:\n  description: the original's L3 network\n  networks: [nat-rssh-up]\n"


@pytest.fixture(scope="module")
def outside_resolver(testcluster):
    """A dnsmasq on the test cluster's host bridge that answers OUTSIDE_NAME (the nodes reach the host
    there); a resolv.conf naming it, in a directory that dnsmasq may read once it drops root."""
    addr = testcluster.layout.host_ip
    readable = Path(tempfile.mkdtemp(prefix="pcocc-resolv-"))
    proc = None
    try:
        readable.chmod(0o755)
        proc = subprocess.Popen(["dnsmasq", "-k", "--conf-file=/dev/null", f"--listen-address={addr}", "--bind-interfaces",
                                 "--no-resolv", "--no-hosts", f"--address=/{OUTSIDE_NAME}/{OUTSIDE_ADDR}",
                                 f"--address=/{OUTSIDE_NAME}/2001:db8::78",  # nslookup asks AAAA too
                                 f"--pid-file={readable / 'outside-dns.pid'}"], start_new_session=True)
        wait_for(lambda: proc.poll() is not None or _answers(addr), timeout=30, what="the outside dnsmasq")
        assert proc.poll() is None, "the outside dnsmasq did not start"
        resolv = readable / "resolv.conf"
        resolv.write_text(f"nameserver {addr}\n")
        resolv.chmod(0o644)
        yield resolv
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(readable, ignore_errors=True)


def _answers(addr):
    r = subprocess.run(["busybox", "nslookup", OUTSIDE_NAME, addr], capture_output=True, text=True, timeout=20)
    return OUTSIDE_ADDR in r.stdout


@pytest.fixture(scope="module")
def upstream_config(testcluster, outside_resolver):
    """The network and its resource set, added to the test cluster's config for this module."""
    from pcocc.testcluster.pcoccconf import conf_dir

    d = conf_dir(testcluster.base)
    saved = {name: (d / name).read_text() for name in ("networks.yaml", "resources.yaml")}
    try:
        (d / "networks.yaml").write_text(saved["networks.yaml"] + networks_yaml(outside_resolver))
        (d / "resources.yaml").write_text(saved["resources.yaml"] + RESOURCES)
        yield
    finally:
        for name, text in saved.items():
            (d / name).write_text(text)


@pytest.fixture(scope="module")
def underlay_1500(testcluster):
    """The nodes' tunnel underlay at UNDERLAY_MTU for the module (both ends of each node's veth)."""
    from pcocc.testcluster.net import TUNNEL_DEV

    tc, layout = testcluster, testcluster.layout

    def links():
        return [(layout.netns(n), TUNNEL_DEV) for n in tc.node_names] + [(None, layout.tunnel_veth(n)) for n in tc.node_names]

    def mtu(ns, dev):
        r = subprocess.run(["ip", *(["-n", ns] if ns else []), "-o", "link", "show", dev], capture_output=True, text=True, check=True)
        return int(r.stdout.split(" mtu ")[1].split()[0])

    before = {link: mtu(*link) for link in links()}
    try:
        for ns, dev in links():
            subprocess.run(["ip", *(["-n", ns] if ns else []), "link", "set", dev, "mtu", str(UNDERLAY_MTU)], check=True)
        yield
    finally:
        for (ns, dev), value in before.items():
            subprocess.run(["ip", *(["-n", ns] if ns else []), "link", "set", dev, "mtu", str(value)], check=False)


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image, upstream_config, underlay_1500):
    templates = "tiny:\n  image: user:tiny\nupl3:\n  inherits: tiny\n  resource-set: upstream-l3\n"
    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "upnetrepo", templates)
    yield s
    s.cancel_all()


def vm_sh(site, jobid, vm, script, timeout=120):
    return site.pcocc("exec", "-j", jobid, "-w", f"vm{vm}", "sh", "-c", script, timeout=timeout)


def dhcp_env(site, jobid, vm):
    r = vm_sh(site, jobid, vm, "cat /run/pcocc/dhcp.env")
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line) if r.returncode == 0 else {}


def node_domain(tc, node):
    """The VMs' domain as a node computes it with no domain-name (pcocc.<its DNS domain>, or pcocc)."""
    python = str(Path(PCOCC).parent / "python")
    r = tc.onnode(node, [python, "-c", "from pcocc.networks.gateway import domain_name; print(domain_name({'domain-name': ''}))"],
                  check=True)
    return r.stdout.strip()


def addresses(nslookup_output):
    """The addresses of the answer (busybox nslookup: the server's own lines come first)."""
    answer = nslookup_output.split("Name:", 1)[1] if "Name:" in nslookup_output else ""
    return [line.split()[-1] for line in answer.splitlines() if line.strip().startswith("Address")]


def test_original_l3_network_across_two_nodes(site):
    tc = site.tc
    r = site.pcocc("batch", "-J", "upl3", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "--wait", "upl3:2")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())
    try:
        vms = site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/vms/")
        hosts = {v["rank"]: v["host"] for v in vms.values()}
        assert hosts[0] != hosts[1], hosts  # one VM per node: everything below crosses the VXLAN tunnel
        for vm in (0, 1):
            wait_for(lambda: dhcp_env(site, jobid, vm).get("ip"), timeout=180, what=f"vm{vm}'s DHCP lease")
        # the domain: pcocc.<the nodes' DNS domain>, or pcocc
        domain = node_domain(tc, hosts[0])
        assert domain == "pcocc" or domain.startswith("pcocc."), domain
        assert node_domain(tc, hosts[1]) == domain
        for vm in (0, 1):
            env = dhcp_env(site, jobid, vm)
            assert env == {"ip": f"{INT_NET}.{vm + 1}", "router": f"{INT_NET}.254", "dns": f"{INT_NET}.254",
                           "domain": domain, "hostname": f"vm{vm}"}, env

        # the MTU DHCP handed: the network's 1500 less 50 (the virtio NIC was given none of its own)
        for vm in (0, 1):
            assert vm_sh(site, jobid, vm, "cat /sys/class/net/eth0/mtu").stdout.strip() == "1450"

        # each VM resolves the other by its short and its qualified name, through the DNS that DHCP gave it
        for vm, other in ((0, 1), (1, 0)):
            for name in (f"vm{other}", f"vm{other}.{domain}"):
                r = vm_sh(site, jobid, vm, f"nslookup {name}")
                assert r.returncode == 0 and set(addresses(r.stdout)) == {f"{INT_NET}.{other + 1}"}, f"vm{vm}, {name}: {r.stdout}{r.stderr}"
            # an outside name, through the host's resolvers (the resolver file of this test)
            r = vm_sh(site, jobid, vm, f"nslookup {OUTSIDE_NAME}")
            assert r.returncode == 0 and OUTSIDE_ADDR in addresses(r.stdout), f"vm{vm}: {r.stdout}{r.stderr}"

        # full-size frames across the nodes: 1422 bytes of ICMP data make a 1450-byte packet (DF set:
        # the kernel's default path MTU discovery), and a 1 MB transfer, 1450-byte TCP segments
        for vm, other in ((0, 1), (1, 0)):
            r = vm_sh(site, jobid, vm, f"ping -c 3 -W 5 -s 1422 vm{other}")
            assert r.returncode == 0 and "1430 bytes from" in r.stdout, f"vm{vm}: {r.stdout}{r.stderr}"
        r = vm_sh(site, jobid, 0, "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/f bs=1024 count=1024 2>/dev/null"
                                  " && httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1 && md5sum /tmp/www/f")
        assert r.returncode == 0, r.stdout + r.stderr
        sent = r.stdout.split()[0]
        r = vm_sh(site, jobid, 1, "wget -q -O /tmp/f http://vm0:8080/f && wc -c < /tmp/f && md5sum /tmp/f", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        size, received = r.stdout.split()[:2]
        assert (int(size), received) == (1024 * 1024, sent)
        # without the 50 bytes, full-size frames are lost on this underlay: what the default avoids
        r = vm_sh(site, jobid, 0, "ip link set eth0 mtu 1500; ping -c 2 -W 3 -s 1472 vm1; s=$?; ip link set eth0 mtu 1450; exit $s")
        assert r.returncode != 0, f"a 1500-byte packet crossed an underlay of {UNDERLAY_MTU}: the control proves nothing\n{r.stdout}"
        assert vm_sh(site, jobid, 0, "ping -c 1 -W 5 -s 1422 vm1").returncode == 0
    finally:
        tc.run(["scancel", str(jobid)], user=site.user)
        wait_for(lambda: str(jobid) not in {j[0] for j in site.squeue()}, timeout=180, what=f"job {jobid} to end")
    leftovers.assert_gone(site, jobid, PREFIX)
    assert site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/") == {}
