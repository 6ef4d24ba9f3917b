"""virtio-fs mount points end to end on the local backend: the guest reads and writes a host
directory through an unprivileged virtiofsd in a user namespace mapping the owner's uid only;
a read-only share refuses writes; the daemons end with the VM."""

import os

import pytest

from local_site import LocalSite
from waiting import wait_for

pytestmark = pytest.mark.integration

UD = """#cloud-config
mounts:
  - [rw, /mnt/rw, virtiofs]
  - [ro, /mnt/ro, virtiofs]
runcmd:
  - cp /mnt/ro/in.txt /mnt/rw/out.txt
  - if echo x > /mnt/ro/written; then echo accepted; else echo refused; fi > /mnt/rw/ro-write.txt
"""


def virtiofsd_pids():
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].endswith(b"virtiofsd"):
                    out.append(int(pid))
        except OSError:
            continue
    return out


def test_a_virtio_fs_share_is_read_and_written_by_the_guest_as_its_owner(tmp_path_factory, tiny_image):
    site = LocalSite(tmp_path_factory.mktemp("vfs"), tiny_image)
    rw, ro = site.root / "rw", site.root / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("from the host\n")
    site.write("ud.yaml", UD)
    site.write(".pcocc/templates.yaml", f"""
vfs:
  image: user:tiny
  mount-points:
    rw: {{path: {rw}, type: virtio-fs}}
    ro: {{path: {ro}, type: virtio-fs, readonly: true}}
  user-data: {site.home}/ud.yaml
""")
    before = set(virtiofsd_pids())
    try:
        r = site.pcocc("batch", "-m", "256", "--wait", "vfs:1")
        assert r.returncode == 0, r.stderr
        jobid = int(r.stdout.split()[0])
        try:
            wait_for(lambda: (rw / "ro-write.txt").exists() and (rw / "ro-write.txt").read_text().strip(), timeout=300,
                     what="the guest's runcmd to write into the share")
        except AssertionError as exc:
            console = site.pcocc("console", "-j", jobid, "-l").stdout[-3000:]
            logs = "".join(p.read_text(errors="replace")[-1000:] for p in site.run_dir.glob(f"job_{jobid}/vm0/vfs-*.log"))
            raise AssertionError(f"{exc}\n--- console\n{console}\n--- virtiofsd\n{logs}") from None
        assert (rw / "out.txt").read_text() == "from the host\n"
        assert (rw / "ro-write.txt").read_text().strip() == "refused"
        assert not (ro / "written").exists()
        assert (rw / "out.txt").stat().st_uid == os.getuid()  # the guest's root is the owner, nobody else
        daemons = set(virtiofsd_pids()) - before  # one per share (and its sandbox child)
        sources = {arg for pid in daemons for arg in open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
                   if arg.startswith("source=")}
        assert sources == {f"source={rw}", f"source={ro}"}, sources
        for pid in daemons:
            assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")  # a user namespace of its own
            with open(f"/proc/{pid}/uid_map") as f:
                maps = [line.split() for line in f if line.strip()]
            assert maps == [["0", str(os.getuid()), "1"]], maps  # the owner's uid, and only it
        # a VM with a virtio-fs share cannot be checkpointed (vhost-user cannot migrate)
        r = site.pcocc("ckpt", "-j", jobid, site.root / "ck")
        assert r.returncode != 0 and "virtio-fs mounts (ro, rw)" in r.stderr, r.stderr
        site.pcocc("cancel", "-j", jobid, check=True)
        wait_for(lambda: not (set(virtiofsd_pids()) & daemons), timeout=60, what="virtiofsd to end with its VM")
    finally:
        site.cleanup()

