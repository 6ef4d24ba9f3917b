"""etcd access on a real server: per-user isolation (RBAC), credentials, TLS, failover."""

import os
import shutil
import stat
import subprocess
import types
from pathlib import Path

import pytest
from etcd_fixture import ETCD, SKIP_REASON, free_port, start_etcd  # tests/, on sys.path through tests/conftest.py

from pcocc.config.models import BatchConfig
from pcocc.env import Environment
from pcocc.errors import PermissionDenied
from pcocc.store import StoreError, etcdauth, open_store
from pcocc.store.etcd import EtcdStore

pytestmark = [pytest.mark.integration, pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)]

ROOT_PW = "root-secret"
A, B = "alice", "bob"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """An etcd with auth on, users alice and bob registered; yields (server, root store)."""
    server = start_etcd(tmp_path_factory.mktemp("etcd-auth"))
    root = EtcdStore([server.url])
    etcdauth.enable_auth(root, ROOT_PW)
    for user in (A, B):
        etcdauth.ensure_user(root, user, password=f"{user}-pw")
    yield server, root
    root.close()
    server.stop()


def as_user(server, user, password=None):
    return EtcdStore([server.url], user=user, password=password or f"{user}-pw")


@pytest.fixture
def seeded(secured):
    server, root = secured
    root.delete_prefix("")
    root.put(f"/pcocc/users/{A}/clusters/1/info", {"owner": A})
    root.put("/pcocc/hosts/n1/reservations/1", {"cores": 2})
    return server, root


def test_a_user_reads_and_writes_its_own_keys(seeded):
    server, root = seeded
    a = as_user(server, A)
    mine = f"/pcocc/users/{A}/"
    assert a.get(mine + "clusters/1/info") == {"owner": A}
    a.put(mine + "x", 1, ttl=5)
    assert a.create(mine + "y", 1) and a.replace(mine + "y", 1, 2) and a.update(mine + "y", lambda v: v + 1) == 3
    assert set(a.range(mine)) == {mine + "clusters/1/info", mine + "x", mine + "y"}
    assert a.revision() == root.revision()
    assert a.wait(mine, lambda items: mine + "x" in items, timeout=1) is not None  # watch needs read
    assert a.delete(mine + "x") and a.delete_prefix(mine) == 2
    assert root.range(mine) == {}


def test_another_user_can_neither_read_nor_write(seeded):
    server, root = seeded
    b = as_user(server, B)
    key = f"/pcocc/users/{A}/clusters/1/info"
    attempts = {
        "get": lambda: b.get(key),
        "range": lambda: b.range(f"/pcocc/users/{A}/"),
        "range of all users": lambda: b.range("/pcocc/users/"),
        "put": lambda: b.put(key, "mine now"),
        "create": lambda: b.create(f"/pcocc/users/{A}/new", 1),
        "replace": lambda: b.replace(key, {"owner": A}, None),
        "delete": lambda: b.delete(key),
        "delete_prefix": lambda: b.delete_prefix(f"/pcocc/users/{A}/"),
        "wait": lambda: b.wait(f"/pcocc/users/{A}/", lambda items: False, timeout=1),
        "a longer name": lambda: b.put(f"/pcocc/users/{B}x/k", 1),  # prefixes end with "/"
    }
    for name, attempt in attempts.items():
        with pytest.raises(PermissionDenied, match=f"denies .* to user {B}"):
            attempt()
            pytest.fail(f"{name} was allowed")
    assert root.range(f"/pcocc/users/{A}/") == {key: {"owner": A}}
    assert root.range(f"/pcocc/users/{B}x/") == {}


def test_users_read_hosts_and_only_root_writes_them(seeded):
    server, root = seeded
    b = as_user(server, B)
    assert b.range("/pcocc/hosts/") == {"/pcocc/hosts/n1/reservations/1": {"cores": 2}}
    with pytest.raises(PermissionDenied):
        b.put("/pcocc/hosts/n1/reservations/2", {"cores": 64})
    with pytest.raises(PermissionDenied):
        b.put("/pcocc/elsewhere", 1)


def test_root_does_everything(seeded):
    server, root = seeded
    again = EtcdStore([server.url], user="root", password=ROOT_PW)
    again.put(f"/pcocc/users/{B}/k", 1)
    again.put("/anything", 2)
    assert again.replace(f"/pcocc/users/{A}/clusters/1/info", {"owner": A}, None)
    assert again.delete_prefix("") == 3


def test_refusals_say_what_to_do(seeded):
    server, _ = seeded
    with pytest.raises(PermissionDenied, match="requires authentication") as anon:
        EtcdStore([server.url]).get("/pcocc/hosts/")
    assert "etcd-auth-type: password" in anon.value.hint
    with pytest.raises(PermissionDenied, match=f"rejected the password of user {A}"):
        as_user(server, A, "wrong").get("/pcocc/users/alice/x")
    with pytest.raises(PermissionDenied, match="rejected the password of user nobody"):
        as_user(server, "nobody").get("/x")


def test_an_invalid_token_is_renewed(seeded):
    server, _ = seeded
    a = as_user(server, A)
    a.get(f"/pcocc/users/{A}/x")
    a.client._token = "expired.1"  # what etcd says after --auth-token-ttl, or on another member
    assert a.get(f"/pcocc/users/{A}/clusters/1/info") == {"owner": A}


def test_setup_steps_are_idempotent(secured):
    server, root = secured
    etcdauth.enable_auth(EtcdStore([server.url]), ROOT_PW)  # auth already on: logs in as root
    etcdauth.ensure_user(root, A, password=f"{A}-pw")
    a = as_user(server, A)
    a.put(f"/pcocc/users/{A}/still", 1)
    etcdauth.ensure_user(root, "carl", password="c1")
    etcdauth.remove_user(root, "carl")
    etcdauth.remove_user(root, "carl")
    with pytest.raises(PermissionDenied):
        as_user(server, "carl", "c1").get("/pcocc/users/carl/x")


def test_open_store_uses_the_callers_password_file(secured, tmp_path):
    server, root = secured
    home = tmp_path / "home"
    env = Environment(environ={"HOME": str(home), "PCOCC_SYSTEM_CONF_DIR": str(tmp_path / "etc")}, uid=4242, user="dora", home=str(home))
    config = _config(server, etcd_auth="password")
    store = open_store(config, env)  # first use: creates ~/.pcocc/.etcd-password
    pw_file = home / ".pcocc" / ".etcd-password"
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o400
    with pytest.raises(PermissionDenied, match="rejected the password of user dora") as not_yet:
        store.get("/pcocc/users/dora/x")
    assert "node setup" in not_yet.value.hint
    etcdauth.ensure_user(root, "dora", password=pw_file.read_text().strip())  # what the node setup does
    store = open_store(config, env)
    store.put("/pcocc/users/dora/x", 1)
    # root's processes use root's file in the system config dir
    root_env = Environment(environ={"HOME": "/root", "PCOCC_SYSTEM_CONF_DIR": str(tmp_path / "etc")}, uid=0, user="root", home="/root")
    with pytest.raises(PermissionDenied, match="no etcd password for root"):
        open_store(config, root_env)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "etcd-password").write_text(ROOT_PW + "\n")
    assert open_store(config, root_env).get("/pcocc/users/dora/x") == 1


def _config(server, etcd_auth="none", **extra):
    """A Config with just the batch part (open_store reads nothing else)."""
    settings = server.settings(**{"etcd-auth-type": etcd_auth, **extra})
    return types.SimpleNamespace(batch=BatchConfig("slurm", settings))


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd")
def test_ensure_user_makes_the_password_file_as_the_user(secured):
    import pwd
    import tempfile

    server, root = secured
    home = Path(tempfile.mkdtemp(prefix="pcocc-home-"))  # not under tmp_path: pytest's root is 0700
    name = f"pcocct{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", "-d", str(home), name], check=True)
    try:

        entry = pwd.getpwnam(name)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        etcdauth.ensure_user(root, name)  # no password given: read or created in the user's home, as the user
        pw_file = home / ".pcocc" / ".etcd-password"
        st = pw_file.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, 0o400)
        user = EtcdStore([server.url], user=name, password=pw_file.read_text().strip())
        user.put(f"/pcocc/users/{name}/k", 1)
        # a symlink planted by the user is not followed, by the user's ids either
        pw_file.unlink()
        pw_file.symlink_to("/etc/shadow")
        with pytest.raises(PermissionDenied, match=f"as {name}"):
            etcdauth.ensure_user(root, name)
    finally:
        subprocess.run(["userdel", name], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(home)
        etcdauth.remove_user(root, name)


# -- connecting


def test_failover_to_the_next_server_and_clear_errors(secured):
    server, _ = secured
    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore([dead, server.url, dead], user=A, password=f"{A}-pw")
    for _ in range(5):  # whatever the shuffled order
        store.client._current = store.client.urls.index(dead)
        store.client.close()
        assert store.get(f"/pcocc/users/{A}/none") is None
        assert store.client.url == server.url
    with pytest.raises(StoreError, match=rf"cannot reach etcd at {dead}: connection refused") as err:
        EtcdStore([dead]).get("/x")
    assert "etcd-servers" in err.value.hint
    with pytest.raises(StoreError, match="cannot reach etcd at http://no-such-host.invalid:2379: "):
        EtcdStore(["http://no-such-host.invalid:2379"]).get("/x")


def test_https_with_a_private_ca(tmp_path):
    from pcocc.agent import pki

    ca_pem, ca_key = pki.make_ca("etcd test CA")
    cert, key = pki.issue(ca_pem, ca_key, "127.0.0.1", server=True, ips=["127.0.0.1"])
    for name, data in {"ca.pem": ca_pem, "server.pem": cert, "server.key": key}.items():
        (tmp_path / name).write_bytes(data)
    server = start_etcd(tmp_path / "etcd", cert=tmp_path / "server.pem", key=tmp_path / "server.key", ca=tmp_path / "ca.pem")
    try:
        store = open_store(_config(server), Environment(environ={}, home=str(tmp_path)))
        assert store.client.url.startswith("https://")
        store.put("/tls", {"ok": True})
        assert store.get("/tls") == {"ok": True}
        assert store.wait("/tls", bool, timeout=1) == {"/tls": {"ok": True}}
        other_ca, _ = pki.make_ca("another CA")
        (tmp_path / "other.pem").write_bytes(other_ca)
        with pytest.raises(StoreError, match="TLS certificate verify failed: unable to get local issuer"):
            EtcdStore([server.url], ca_cert=str(tmp_path / "other.pem")).get("/tls")
        with pytest.raises(StoreError, match="closed the connection") as plain:
            EtcdStore([server.url.replace("https:", "http:")]).get("/tls")
        assert "etcd-protocol: https" in plain.value.hint
        with pytest.raises(StoreError, match="cannot load the etcd CA certificate"):
            EtcdStore([server.url], ca_cert=str(tmp_path / "missing.pem")).get("/tls")
    finally:
        server.stop()


def _auth_revision(server):
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("etcd_debugging_auth_revision "):
                return float(line.split()[1])
    raise AssertionError("etcd's /metrics has no etcd_debugging_auth_revision")


def test_ensure_user_writes_nothing_when_the_account_is_right(secured):
    """Every node of every job calls ensure_user: once the account is right, it only reads
    (a write goes through etcd's apply loop, a user add with its bcrypt, and moves the auth
    revision, which logs every client out: 16 nodes at once timed out)."""
    server, root = secured
    etcdauth.ensure_user(root, A, password=f"{A}-pw")
    before = _auth_revision(server)
    for _ in range(3):
        etcdauth.ensure_user(root, A, password=f"{A}-pw")
    assert _auth_revision(server) == before
    etcdauth.ensure_user(root, A, password="new-pw")  # a changed password file is followed
    assert _auth_revision(server) > before
    as_user(server, A, "new-pw").put(f"/pcocc/users/{A}/x", 1)
    etcdauth.ensure_user(root, A, password=f"{A}-pw")
    as_user(server, A).put(f"/pcocc/users/{A}/x", 2)
