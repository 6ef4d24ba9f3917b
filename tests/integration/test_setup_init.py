"""`pcocc internal setup init` turns etcd's authentication on for an administrator."""

import pytest
from etcd_fixture import start_etcd

from pcocc.errors import PermissionDenied
from pcocc.store.etcd import EtcdStore

pytestmark = pytest.mark.integration


def test_setup_init_enables_etcd_auth(cli, tmp_path):
    server = start_etcd(tmp_path / "etcd")
    cli.environ["PCOCC_NODE_STATE_DIR"] = str(tmp_path / "node")  # not the host's /var/run/pcocc
    try:
        host, port = server.url.rsplit(":", 1)
        cli.write("etc/batch.yaml", f"type: slurm\nsettings:\n  etcd-servers: ['{host.split('//')[1]}']\n"
                  f"  etcd-client-port: {port}\n  etcd-auth-type: password\n")
        r = cli("internal", "setup", "init")
        assert r.status == 0, r.stderr
        password = (cli.system / "etcd-password").read_text().strip()
        assert (cli.system / "etcd-password").stat().st_mode & 0o077 == 0
        anonymous = EtcdStore([server.url])
        with pytest.raises(PermissionDenied):
            anonymous.put("/x", 1)
        anonymous.close()
        root = EtcdStore([server.url], user="root", password=password)
        root.put("/x", 1)
        assert root.get("/x") == 1
        root.close()
        assert cli("internal", "setup", "init").status == 0  # again: nothing changes
        assert (cli.system / "etcd-password").read_text().strip() == password
    finally:
        server.stop()
