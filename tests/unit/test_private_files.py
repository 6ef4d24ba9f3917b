"""Nothing predictable in shared directories: run dir, probe cache (issue 12, section 4)."""

import json
import os
import stat

import pytest

from pcocc import fsutil
from pcocc.env import Environment
from pcocc.errors import PermissionDenied
from pcocc.hypervisor import accel

OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's directory needs root")


def test_private_dir_is_created_0700(tmp_path):
    d = tmp_path / "run"
    assert fsutil.private_dir(str(d)) == str(d)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


def test_private_dir_narrows_our_own_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    fsutil.private_dir(str(d))
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700


def test_private_dir_refuses_a_link(tmp_path):
    target = tmp_path / "victim"
    target.mkdir()
    os.chmod(target, 0o755)
    link = tmp_path / "run"
    link.symlink_to(target)
    with pytest.raises(PermissionDenied) as err:
        fsutil.private_dir(str(link))
    assert str(link) in err.value.message and "PCOCC_RUN_DIR" in err.value.message
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755  # not chmod-ed through the link


def test_private_dir_refuses_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(PermissionDenied):
        fsutil.private_dir(str(f))


@needs_root
def test_private_dir_refuses_another_users_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o777)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionDenied) as err:
        fsutil.private_dir(str(d))
    assert str(d) in err.value.message and "another user" in err.value.message and "\n" not in err.value.message
    assert os.lstat(d).st_uid == OTHER_UID


def test_xdg_runtime_dir_is_used_only_when_private(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    me = os.getuid()
    assert fsutil.default_run_dir({"XDG_RUNTIME_DIR": str(xdg)}, me) == str(xdg / "pcocc")
    # the rule is for the user named, whoever asks (root's node setup asks for a user's tasks)
    assert fsutil.default_run_dir({"XDG_RUNTIME_DIR": str(xdg)}, 1234) == "/tmp/pcocc-1234"
    assert fsutil.default_run_dir({"PCOCC_RUN_DIR": "/x/y", "XDG_RUNTIME_DIR": str(xdg)}, 1234) == "/x/y"
    os.chmod(xdg, 0o755)
    assert fsutil.default_run_dir({"XDG_RUNTIME_DIR": str(xdg)}, 1234) == "/tmp/pcocc-1234"
    assert fsutil.default_run_dir({"XDG_RUNTIME_DIR": "relative"}, 1234) == "/tmp/pcocc-1234"
    assert fsutil.default_run_dir({}, 1234) == "/tmp/pcocc-1234"
    link = tmp_path / "xdglink"
    os.chmod(xdg, 0o700)
    link.symlink_to(xdg)
    assert fsutil.default_run_dir({"XDG_RUNTIME_DIR": str(link)}, 1234) == "/tmp/pcocc-1234"


def test_environment_run_dir_prefers_xdg_and_checks_it(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    env = Environment(environ={"XDG_RUNTIME_DIR": str(xdg)}, home=str(tmp_path))
    assert env.run_dir == str(xdg / "pcocc")
    assert stat.S_IMODE(os.lstat(xdg / "pcocc").st_mode) == 0o700
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    env = Environment(environ={"PCOCC_RUN_DIR": str(tmp_path / "link")}, home=str(tmp_path))
    with pytest.raises(PermissionDenied):
        env.run_dir


def test_write_private_never_follows_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("important")
    path = tmp_path / "cache.json"
    path.symlink_to(victim)
    fsutil.write_private(str(path), b"new")
    assert victim.read_text() == "important"
    assert not path.is_symlink() and path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache")] == []


def _spy_probe(monkeypatch, answer):
    calls = []
    monkeypatch.setattr(accel, "probe_kvm", lambda *a, **k: calls.append(a) or answer)
    return calls


def test_accel_cache_in_a_private_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    fsutil.private_dir(str(d))
    calls = _spy_probe(monkeypatch, False)
    assert accel.choose(str(d), "qemu-x") == "tcg"
    assert accel.choose(str(d), "qemu-x") == "tcg"
    assert len(calls) == 1  # the second answer came from the cache
    cached = json.loads((d / "pcocc-accel.json").read_text())
    assert cached["accel"] == "tcg" and cached["qemu"] == "qemu-x"
    assert stat.S_IMODE(os.lstat(d / "pcocc-accel.json").st_mode) == 0o600


def test_accel_cache_link_is_neither_followed_nor_trusted(tmp_path, monkeypatch):
    d = tmp_path / "run"
    fsutil.private_dir(str(d))
    victim = tmp_path / "notes.txt"
    victim.write_text(json.dumps({"boot_id": accel._boot_id(), "qemu": "qemu-x", "accel": "kvm"}))
    (d / "pcocc-accel.json").symlink_to(victim)
    calls = _spy_probe(monkeypatch, False)
    assert accel.choose(str(d), "qemu-x") == "tcg"  # the link's content is not read
    assert len(calls) == 1
    assert "kvm" in victim.read_text()  # nor written through


def test_accel_cache_is_not_kept_in_a_shared_dir(tmp_path, monkeypatch):
    shared = tmp_path / "stick"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    calls = _spy_probe(monkeypatch, False)
    assert accel.choose(str(shared), "qemu-x") == "tcg"
    assert accel.choose(str(shared), "qemu-x") == "tcg"
    assert len(calls) == 2 and list(shared.iterdir()) == []


def test_a_mount_point_that_is_a_file_is_called_so_everywhere(tmp_path):
    """One rule (fsutil.not_a_dir) for --mount, a template's mount-points and virtio-fs."""
    from pcocc import templates
    from pcocc.errors import PcoccError, UsageError
    from pcocc.fsutil import not_a_dir
    from pcocc.hypervisor.virtiofs import Share

    f = tmp_path / "f"
    f.write_text("x")
    assert (not_a_dir(str(tmp_path)), not_a_dir(str(f)), not_a_dir(str(tmp_path / "nope"))) == \
        (None, "not a directory", "no such directory")
    with pytest.raises(UsageError, match=f"not a directory: {f}$"):
        templates.parse_mount_option(f"d={f}", str(tmp_path), check_dir=True)
    with pytest.raises(PcoccError, match=f"mount point 'd': not a directory: {f}$"):
        Share("d", str(f), False, str(tmp_path / "sock")).start()


_FAKE_QEMU = """#!/bin/sh
# a stand-in for qemu-system-x86_64 in the KVM probe: prints a kernel's first line, or checks
# the boot sector it is given and exits as the isa-debug-exit port would make qemu exit
for a in "$@"; do
    case "$a" in
        -kernel) echo "[    0.000000] Linux version 6.1.0 (fake)"; exec sleep 30 ;;
        file=/dev/fd/*) f=${a#file=}; f=${f%%,*}
                        head -c 2 "$f" | od -An -tx1 | grep -q "b0 01" && exit 3; exit 1 ;;
    esac
done
exec sleep 30
"""


def test_the_kvm_probe_writes_no_file(tmp_path, monkeypatch):
    """A probe killed half-way used to leave its /tmp/pcocc-probe-* directory: it now has none
    (console on a pipe, boot sector in a memfd), so nothing can be left."""
    fake = tmp_path / "qemu"
    fake.write_text(_FAKE_QEMU)
    fake.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(accel.os, "access", lambda path, mode: True)  # as if /dev/kvm opened
    assert accel.probe_kvm(str(fake), kernel="/nonexistent/vmlinuz") is True  # its first line, read from the pipe
    assert accel.probe_kvm(str(fake), kernel=None) is True  # the boot sector reached it through /dev/fd
    assert accel.probe_kvm("/bin/true", kernel="/nonexistent/vmlinuz") is False  # exited without a line
    assert list(tmp.iterdir()) == []


def test_a_run_dir_name_taken_by_another_user_does_not_lock_its_owner_out(tmp_path, monkeypatch):
    """Without XDG_RUNTIME_DIR, another user who makes /tmp/pcocc-<uid> first (a directory of
    his, a link, a file) used to stop pcocc for good (it refused the taken name): the owner's
    run dir moves to ~/.cache/pcocc/run-<host>, found the same way by root's node setup."""
    import pwd
    import socket
    from types import SimpleNamespace

    uid = os.geteuid()
    monkeypatch.setattr(fsutil, "TMP", str(tmp_path))
    home = tmp_path / "home"
    monkeypatch.setattr(pwd, "getpwuid", lambda u: SimpleNamespace(pw_dir=str(home)))
    moved = str(home / ".cache" / "pcocc" / f"run-{socket.gethostname().split('.')[0]}")
    shared = tmp_path / f"pcocc-{uid}"
    assert fsutil.default_run_dir({}, uid) == str(shared)  # free: the usual name
    shared.mkdir()
    assert fsutil.default_run_dir({}, uid) == str(shared)  # ours
    os.chown(shared, 65534, 65534)
    assert fsutil.default_run_dir({}, uid) == moved  # another user's
    shared.rmdir()
    shared.symlink_to(tmp_path)
    assert fsutil.default_run_dir({}, uid) == moved  # a link
    assert fsutil.default_run_dir({"PCOCC_RUN_DIR": "/x"}, uid) == "/x"
    assert fsutil.private_dir(fsutil.default_run_dir({}, uid)) == moved
    assert fsutil.is_private_dir(moved)
