"""pcocc cp end to end without a VM: the copy's guest scripts run on this host through the fake
qemu-ga of test_exec_fake_agent.py, behind a real endpoint (test_exec_stream.Cluster). Real VMs:
tests/integration/test_cp_vms.py."""

import hashlib
import os
from types import SimpleNamespace

import pytest

from test_exec_stream import Cluster, Stream, creds  # noqa: F401 - creds is a fixture
from pcocc.agent import qga
from pcocc.cli import copy



@pytest.fixture(autouse=True)
def private_exec_dirs(tmp_path, monkeypatch):
    """The runner runs on this host here: its private exec directories go under the test's own
    tmp_path (removed by pytest), not /tmp."""
    from pcocc.agent import qga as _qga

    monkeypatch.setattr(_qga, "EXEC_TMP", str(tmp_path))

@pytest.fixture
def vms(creds):  # noqa: F811
    c = Cluster(creds, 2)
    yield c
    c.close()


def run(cluster, fn, *args, ranks=(0,)):
    targets = SimpleNamespace(vms=cluster.vms, ranks=list(ranks), client=cluster.client)
    out, err = Stream(), Stream()
    app = SimpleNamespace(env=SimpleNamespace(stdout=out, stderr=err))
    status = fn(app, targets, *args)
    return status, out.bytes(), err.bytes()


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree(root):
    """{relative path: bytes or None for a directory} under root."""
    found = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            found[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                found[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return found


@pytest.mark.parametrize("text, expected", [
    ("vm0:/etc/hosts", ("vm0", "/etc/hosts")), ("vm[0-3]:x", ("vm[0-3]", "x")), ("vm1:", ("vm1", ".")),
    ("all:/tmp/", ("all", "/tmp/")), ("./vm0:x", (None, "./vm0:x")), ("local", (None, "local")),
    ("dir/vm0:a", (None, "dir/vm0:a")),
])
def test_locations_follow_scp(text, expected):
    assert copy.parse_location(text) == expected


def test_a_file_goes_up_and_down_whole(vms, tmp_path, monkeypatch):
    monkeypatch.setattr(qga, "STDIN_SEGMENT", 256 * 1024)
    monkeypatch.setattr(qga, "EXEC_SEGMENT", 256 * 1024)
    src = tmp_path / "data"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    guest = tmp_path / "guest"
    guest.mkdir()
    assert run(vms, copy._upload, False, str(src), str(guest)) == (0, b"", b"")  # a directory: guest/data
    assert digest(guest / "data") == digest(src)
    back = tmp_path / "back"
    assert run(vms, copy._download, False, str(guest / "data"), str(back)) == (0, b"", b"")  # a new name
    assert digest(back) == digest(src)


def test_upload_to_several_vms_and_a_new_name(vms, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"hello\n")
    status, out, err = run(vms, copy._upload, False, str(src), str(tmp_path / "g"), ranks=(0, 1))
    assert (status, out, err) == (0, b"", b"")
    assert (tmp_path / "g").read_bytes() == b"hello\n"
    assert len([a for a in vms.agents if any(c == "guest-exec" for c, _ in a.log)]) == 2


def test_directories_need_r_and_keep_their_tree(vms, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"A")
    (src / "sub" / "b").write_bytes(os.urandom(100000))
    (src / "sub" / "empty").mkdir()
    with pytest.raises(copy.UsageError, match="is a directory"):
        run(vms, copy._upload, False, str(src), str(tmp_path / "x"))
    up = tmp_path / "up"
    assert run(vms, copy._upload, True, str(src), str(up))[0] == 0  # not there: src becomes up
    assert tree(up) == tree(src)
    assert run(vms, copy._upload, True, str(src), str(up))[0] == 0  # there: into up/src
    assert tree(up / "src") == tree(src)
    status, _, err = run(vms, copy._download, False, str(src), str(tmp_path / "d"))
    assert status == 1 and err == f"pcocc: error: vm0: cp {src}: {src}: is a directory (use -r)\n".encode()
    assert run(vms, copy._download, True, str(src), str(tmp_path / "d"))[0] == 0
    assert tree(tmp_path / "d") == tree(src)
    (tmp_path / "into").mkdir()
    assert run(vms, copy._download, True, str(src), str(tmp_path / "into"))[0] == 0
    assert tree(tmp_path / "into") == {"src": None, **{f"src/{k}": v for k, v in tree(src).items()}}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pcocc-cp.")]


def test_errors_are_one_line_with_the_table_status(vms, tmp_path):
    status, out, err = run(vms, copy._download, False, str(tmp_path / "nope"), str(tmp_path / "x"))
    assert (status, out) == (4, b"")
    assert err == f"pcocc: error: vm0: cp {tmp_path}/nope: {tmp_path}/nope: No such file or directory\n".encode()
    assert not (tmp_path / "x").exists()
    src = tmp_path / "f"
    src.write_bytes(b"x")
    status, _, err = run(vms, copy._upload, False, str(src), str(tmp_path / "no" / "dir" / "f"))
    assert status == 1 and len(err.splitlines()) == 1 and err.startswith(b"pcocc: error: vm0: cp to ")
    with pytest.raises(copy.NotFoundError):
        run(vms, copy._upload, False, str(tmp_path / "missing"), str(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["cp", "x"], "at least one source and a destination"),
    (["cp", "a", "b"], "one side must be a VM"),
    (["cp", "vm0:a", "vm1:b"], "copies between VMs"),
    (["cp", "vm0:a", "b", "vm1:c"], "copies between VMs"),
    (["exec", "--pty", "-b", "sh"], "--pty cannot be combined"),
    (["exec", "--pty", "-n", "sh"], "--pty cannot be combined"),
])
def test_bad_command_lines_are_status_2_with_one_line(cli, argv, message):
    r = cli(*argv)
    assert r.status == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_progress_is_shown_on_a_terminal_only(vms, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(os.urandom(300000))

    class Tty(Stream):
        def isatty(self):
            return True

    targets = SimpleNamespace(vms=vms.vms, ranks=[0], client=vms.client)
    err = Tty()
    app = SimpleNamespace(env=SimpleNamespace(stdout=Stream(), stderr=err))
    assert copy._upload(app, targets, False, str(src), str(tmp_path / "g")) == 0
    shown = err.bytes().decode()
    assert str(src) in shown and "100%" in shown
    assert run(vms, copy._download, False, str(src), str(tmp_path / "h")) == (0, b"", b"")  # not a terminal: nothing


def test_a_download_extracts_only_the_requested_tree_whatever_the_guest_sends(tmp_path):
    """A guest (its root, a planted tar) may send an archive naming other files: only the
    requested name's tree reaches the destination (scp's CVE-2019-6111 kind)."""
    import io as _io
    import tarfile
    from types import SimpleNamespace

    from pcocc.cli.copy import _Download

    src = tmp_path / "guest"
    (src / "d").mkdir(parents=True)
    (src / "d" / "ok.txt").write_text("wanted\n")
    (src / "PWNED").write_text("pwned\n")
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src / "d", arcname="d")
        tar.add(src / "PWNED", arcname="PWNED")
    dest = tmp_path / "victim"
    dest.mkdir()
    (dest / "PWNED").write_text("original\n")
    app = SimpleNamespace(env=SimpleNamespace(stderr=_io.StringIO()))
    down = _Download(app, "/root/d", str(dest), "vm0")
    down(b"D %d\n" % len(buf.getvalue()) + buf.getvalue())
    down.finish(True)
    assert (dest / "d" / "ok.txt").read_text() == "wanted\n"
    assert (dest / "PWNED").read_text() == "original\n"
    assert sorted(p.name for p in dest.iterdir()) == ["PWNED", "d"]  # and no temporary directory left
