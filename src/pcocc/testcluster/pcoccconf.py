"""The pcocc configuration of a test cluster: SLURM backend, state in the cluster's etcd
with authentication on (a role per user, as in production)."""

import os
from pathlib import Path


def conf_dir(base):
    return Path(base) / "etc" / "pcocc"


def node_state_dir(base, node):
    return Path(base) / "nodes" / node / "pcocc"


def write(base, layout):
    d = conf_dir(base)
    d.mkdir(parents=True, exist_ok=True)
    (d / "batch.yaml").write_text(
        "type: slurm\n"
        "settings:\n"
        f"  etcd-servers: ['{layout.host_ip}']\n"
        f"  etcd-client-port: {layout.etcd_port}\n"
        "  etcd-protocol: http\n"
        "  etcd-auth-type: password\n"
    )
    # private networks for the VMs of a job, L2 only or L3 (DHCP, DNS, NAT); templates opt in with
    # `resource-set: l2net` or `l3net`, the default set has none (OVS's userspace datapath: no kernel module here)
    (d / "networks.yaml").write_text(
        "priv:\n"
        "  type: ethernet\n"
        "  settings:\n"
        "    dev-prefix: pn\n"
        "    network-layer: L2\n"
        "    datapath-type: netdev\n"
        "    mac-prefix: '52:54:00:77'\n"
        "pub:\n"
        "  type: ethernet\n"
        "  settings:\n"
        "    dev-prefix: pl\n"
        "    network-layer: L3\n"
        "    datapath-type: netdev\n"
        "    mac-prefix: '52:54:00:78'\n"
        "    int-network: 10.78.0.0/24\n"
        "    ext-network: 10.79.0.0/24\n"
        "    domain-name: cluster.test\n"
        "    reverse-nat:\n"
        "      vm-port: 22\n"
        "      min-host-port: 40000\n"
        "      max-host-port: 40999\n"
    )
    (d / "resources.yaml").write_text(
        "default:\n"
        "  default: true\n"
        "  networks: []\n"
        "l2net:\n"
        "  description: a private L2 network between the job's VMs\n"
        "  networks: [priv]\n"
        "l3net:\n"
        "  description: the job's private network with DHCP, DNS, NAT out and ssh in\n"
        "  networks: [pub]\n"
    )
    for p in (d.parent, d, *(d / name for name in ("batch.yaml", "networks.yaml", "resources.yaml"))):
        p.chmod(0o755 if p.is_dir() else 0o644)
    for node in layout.node_names:
        node_state_dir(base, node).mkdir(parents=True, exist_ok=True)


def enable_etcd_auth(base, layout):
    """Turn etcd's authentication on, with root's password in the config dir (root only)."""
    from pcocc.store.etcd import EtcdStore
    from pcocc.store.etcdauth import enable_auth, new_password

    path = conf_dir(base) / "etcd-password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    password = new_password()
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    store = EtcdStore([f"http://{layout.host_ip}:{layout.etcd_port}"])
    try:
        enable_auth(store, password)
    finally:
        store.close()


def etcdctl_credentials(base):
    """ETCDCTL_USER for root, once authentication is on (etcdctl reads it from the environment)."""
    try:
        return {"ETCDCTL_USER": "root:" + (conf_dir(base) / "etcd-password").read_text().strip()}
    except OSError:
        return {}
