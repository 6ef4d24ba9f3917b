"""pcocc display with a real client: remote-viewer (virt-viewer) under Xvfb, against real VMs
of the local backend whose template sets `remote-display: spice` (issue 13).

qemu must report the client connected (`info spice`: channels), and a screenshot of the
viewer's window must hold the VM's screen as qemu's own screendump shows it. Both are read
through `pcocc monitor-cmd` (HMP `info spice` and `screendump` run qemu's query-spice and
screendump): the VM's process holds qemu's only QMP connection.
"""

import configparser
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import time

import pytest
from local_site import PCOCC
from waiting import wait_for

pytestmark = pytest.mark.integration

TEMPLATES = "spicy:\n  image: user:tiny\n  remote-display: spice\ntiny:\n  image: user:tiny\n"


def vm_records(site, jobid):
    return {v["name"]: v for k, v in ((k, json.loads(v)) for k, v in site.store_items().items())
            if f"/{jobid}/vms/" in k and isinstance(v, dict) and "name" in v}


def hmp(site, jobid, vm, *command):
    r = site.pcocc("monitor-cmd", "-j", jobid, "-w", vm, *command)
    assert r.returncode == 0, r.stderr
    return r.stdout


def screendump(site, jobid, vm, path):
    """The VM's screen as qemu renders it (an RGB numpy array), through HMP screendump (PPM)."""
    import numpy as np
    from PIL import Image

    if os.path.exists(path):
        os.unlink(path)
    hmp(site, jobid, vm, "screendump", str(path))
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def find_in(shot, screen, min_equal=0.98):
    """The share of `screen`'s pixels equal in `shot` where screen appears 1:1 in it (located by
    its most detailed row, found byte for byte), or 0.0 when it appears nowhere."""
    h, w, _ = screen.shape
    r = max(range(h), key=lambda y: int((screen[y] != screen[y, 0]).any(axis=1).sum()))
    row = screen[r].tobytes()
    best = 0.0
    for y in range(r, shot.shape[0] - (h - r) + 1):
        line = shot[y].tobytes()
        i = line.find(row)
        while i >= 0:
            if i % 3 == 0:
                x, top = i // 3, y - r
                region = shot[top:top + h, x:x + w]
                if region.shape == screen.shape:
                    best = max(best, float((region == screen).all(axis=2).mean()))
                    if best >= min_equal:
                        return best
            i = line.find(row, i + 1)
    return best


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


def spice_login(address, password):
    """SPICE's link result (0: accepted, 7: permission denied) for `password` on the main
    channel at address (host, port): the link message with no capabilities, then the password
    encrypted with the server's RSA key (RSA-OAEP, SHA-1), as SPICE's ticket authentication
    has it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    with socket.create_connection(address, timeout=60) as sock:
        mess = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)  # connection id, main channel 0, no caps (offset 18)
        sock.sendall(struct.pack("<4sIII", b"REDQ", 2, 2, len(mess)) + mess)
        magic, _, _, size = struct.unpack("<4sIII", _recv_exact(sock, 16))
        reply = _recv_exact(sock, size)
        assert magic == b"REDQ" and struct.unpack("<I", reply[:4])[0] == 0, reply[:4]
        key = serialization.load_der_public_key(reply[4:166])
        sock.sendall(key.encrypt(password.encode() + b"\0", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)))
        return struct.unpack("<I", _recv_exact(sock, 4))[0]


class Xvfb:
    """An X server of its own: Xvfb picks a free display number and tells it (-displayfd)."""

    def __init__(self, width=1280, height=1024):
        r, w = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
                                     pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        try:
            data = b""
            deadline = time.monotonic() + 60
            while not data.endswith(b"\n") and time.monotonic() < deadline:
                ready, _, _ = select.select([r], [], [], 1)
                if ready:
                    chunk = os.read(r, 64)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(r)
        if not data.strip().isdigit():
            self.stop()
            raise AssertionError("Xvfb did not start")
        self.display = f":{data.strip().decode()}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_remote_viewer_shows_the_vm_s_screen(site, tmp_path):
    import numpy as np
    from PIL import ImageGrab

    site.write(".pcocc/templates.yaml", TEMPLATES)
    r = site.pcocc("batch", "-m", "256", "--wait", "spicy:2,tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    vms = wait_for(lambda: (v := vm_records(site, jobid)) and all(x.get("state") == "running" for x in v.values()) and v,
                   timeout=600, what="the VMs to run")

    # Each spice VM: its own port (the kernel's pick) and password, on the control address
    d0, d1 = vms["vm0"]["display"], vms["vm1"]["display"]
    assert d0["host"] == d1["host"] == "127.0.0.1" and d0["port"] != d1["port"] and d0["password"] != d1["password"]
    assert "display" not in vms["vm2"]
    r = site.pcocc("display", "-j", jobid, "-p", "vm2")
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "add 'remote-display: spice' to its template 'tiny'" in r.stderr

    # -p: the connection file of vm1, as remote-viewer reads it
    r = site.pcocc("display", "-j", jobid, "-p", "vm1")
    assert r.returncode == 0, r.stderr
    vv = configparser.ConfigParser(interpolation=None)
    vv.read_string(r.stdout)
    assert dict(vv["virt-viewer"]) | {"title": ""} == {
        "type": "spice", "host": "127.0.0.1", "port": str(d1["port"]), "password": d1["password"], "title": "",
        "delete-this-file": "1", "toggle-fullscreen": "shift+f11", "release-cursor": "shift+f12",
        "secure-attention": "ctrl+alt+end"}
    assert vv["virt-viewer"]["title"] == f"vm1 - pcocc job {jobid} (pcocc)"  # its default job name

    # Through the relay, SPICE takes each VM's password and no other
    assert spice_login(("127.0.0.1", d1["port"]), "not" + d1["password"]) == 7
    assert spice_login(("127.0.0.1", d1["port"]), d0["password"]) == 7
    assert spice_login(("127.0.0.1", d1["port"]), d1["password"]) == 0

    # The passwords: on no command line, and in no file another user could read
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    for d in (d0, d1):
        assert d["password"] not in args
    _check_private(site, [d0["password"], d1["password"]])

    # The guest's screen settles (its console idle): two screendumps a few seconds apart agree
    # (the tiny image's kernel writes to its serial console: its screen stays SeaBIOS's)
    dump = tmp_path / "screen.ppm"
    last = {}

    def settled():
        now = screendump(site, jobid, "vm0", dump)
        # loosely: the text cursor may blink
        same = "screen" in last and now.shape == last["screen"].shape and (now == last["screen"]).all(axis=2).mean() > 0.999
        last["screen"] = now
        return same

    wait_for(settled, timeout=300, interval=3, what="vm0's screen to settle")
    screen = last["screen"]
    assert (screen != screen[0, 0]).any(axis=2).mean() > 0.002, "vm0's screen shows nothing to compare"
    assert "Channels: none" in hmp(site, jobid, "vm0", "info", "spice")

    xvfb = Xvfb()
    viewer = None
    try:
        env = {**site.environ, "DISPLAY": xvfb.display}
        viewer = subprocess.Popen([str(PCOCC), "display", "-j", str(jobid), "vm0"],
                                  env=env, cwd=site.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        info = wait_for(lambda: (out := hmp(site, jobid, "vm0", "info", "spice")) and "Channels: none" not in out
                        and "channel" in out.lower() and out, timeout=180, what="remote-viewer to connect")
        assert "auth: spice" in info, info
        # No connection file is left: remote-viewer deleted it once read (delete-this-file)
        wait_for(lambda: not [f for f in os.listdir(site.run_dir) if f.startswith("display-")], timeout=60,
                 what="the connection file to go")

        def matches():
            screen = screendump(site, jobid, "vm0", dump)
            shot = np.asarray(ImageGrab.grab(xdisplay=xvfb.display).convert("RGB"))
            last["shot"], last["screen"], last["score"] = shot, screen, find_in(shot, screen)
            return last["score"] >= 0.98

        try:
            wait_for(matches, timeout=180, interval=2, what="the viewer to show vm0's screen")
        except AssertionError:
            from PIL import Image

            Image.fromarray(last["shot"]).save(tmp_path / "viewer.png")
            raise AssertionError(f"the viewer's screenshot ({tmp_path / 'viewer.png'}) holds vm0's screen at "
                                 f"{last['score']:.1%} only") from None
        assert viewer.poll() is None, viewer.communicate()
        if os.environ.get("PCOCC_TEST_KEEP_SHOTS"):  # to look at: the viewer's screen and qemu's
            from PIL import Image

            Image.fromarray(last["shot"]).save(os.path.join(os.environ["PCOCC_TEST_KEEP_SHOTS"], "viewer.png"))
            Image.fromarray(last["screen"]).save(os.path.join(os.environ["PCOCC_TEST_KEEP_SHOTS"], "screendump.png"))
    finally:
        if viewer is not None:
            if viewer.poll() is None:
                os.killpg(viewer.pid, signal.SIGTERM)  # pcocc display and its remote-viewer: a session of their own
            try:
                viewer.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(viewer.pid, signal.SIGKILL)
                viewer.wait()
        xvfb.stop()

    site.pcocc("cancel", "-j", jobid, check=True)
    for d in (d0, d1):  # the relays are gone with their VMs
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", d["port"])) != 0


def _check_private(site, secrets):
    """Every file under the site's run dir and home that holds one of `secrets` is readable by
    its owner only, and so is every directory above it up to the run dir or the home."""
    for top in (site.run_dir, site.home):
        for dirpath, _, files in os.walk(top):
            for name in files:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                if not any(s.encode() in data for s in secrets):
                    continue
                private = not st.st_mode & 0o077
                d = dirpath
                while not private and len(d) >= len(str(top)):
                    private = not os.stat(d).st_mode & 0o077
                    d = os.path.dirname(d)
                assert private, f"{path} holds a display password and others can read it (mode {oct(st.st_mode)})"


@pytest.mark.xdist_group("slurm")
def test_from_a_login_node_to_vms_on_slurm_nodes(testcluster, slurm_user, tiny_image, tmp_path):
    """Under SLURM the display is reached from the login node (the test host) on each VM's node
    address, with that VM's password only, by remote-viewer too."""
    from test_slurm_cluster import SlurmSite

    site = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "repo-display", TEMPLATES)
    xvfb = viewer = None
    try:
        r = site.pcocc("batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "--wait", "spicy:2")
        assert r.returncode == 0, r.stderr
        jobid = int(r.stdout.split()[0])
        files = {}
        for vm in ("vm0", "vm1"):
            r = site.pcocc("display", "-j", jobid, "-p", vm)
            assert r.returncode == 0, r.stderr
            vv = configparser.ConfigParser(interpolation=None)
            vv.read_string(r.stdout)
            files[vm] = (r.stdout, vv["virt-viewer"])
        (_, d0), (_, d1) = files["vm0"], files["vm1"]
        assert d0["host"] != d1["host"] and not d0["host"].startswith("127.")  # each node's own address
        assert spice_login((d0["host"], int(d0["port"])), d1["password"]) == 7
        assert spice_login((d0["host"], int(d0["port"])), d0["password"]) == 0
        records = site.keys(f"/pcocc/users/{site.user}/clusters/{jobid}/vms/")
        assert {v["name"]: v["display"]["password"] for v in records.values()} == {"vm0": d0["password"], "vm1": d1["password"]}

        xvfb = Xvfb()
        path = tmp_path / "vm1.vv"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(files["vm1"][0])
        viewer = subprocess.Popen(["remote-viewer", str(path)], env={**os.environ, "DISPLAY": xvfb.display},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (out := site.pcocc("monitor-cmd", "-j", jobid, "-w", "vm1", "info", "spice").stdout)
                 and "Channels: none" not in out and "channel" in out.lower(), timeout=180, what="remote-viewer to connect to vm1")
        assert not path.exists()  # read, then deleted by remote-viewer
    finally:
        if viewer is not None:
            viewer.terminate()
            try:
                viewer.wait(30)
            except subprocess.TimeoutExpired:
                viewer.kill()
                viewer.wait()
        if xvfb is not None:
            xvfb.stop()
        site.cancel_all()
