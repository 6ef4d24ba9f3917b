"""The pcocc configuration of a test cluster: SLURM backend, state in the cluster's etcd."""

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
        "  etcd-auth-type: none\n"
    )
    for p in (d.parent, d, *(d / name for name in ("batch.yaml",))):
        p.chmod(0o755 if p.is_dir() else 0o644)
    for node in layout.node_names:
        node_state_dir(base, node).mkdir(parents=True, exist_ok=True)
