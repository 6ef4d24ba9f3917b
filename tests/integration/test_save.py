"""pcocc save on the local backend, with real qemu (TCG here) and the guest agent:
a VM's disk becomes a new image revision (or a new image), which new VMs boot from."""

import json
import os
import time

import pytest
from waiting import wait_for

from local_site import PCOCC, LocalSite, as_a_foreground_job
from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_image):
    s = LocalSite(tmp_path_factory.mktemp("save"), tiny_image)
    s.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\nfull:\n  image: user:full\ncopy:\n  image: user:copy\n")
    yield s
    s.cleanup()


def start(site, definition="tiny:1"):
    r = site.pcocc("batch", "-m", "256", "--wait", definition)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def stop(site, jobid):
    site.pcocc("cancel", "-j", jobid, check=True)


def sh(site, jobid, cmd, vm="vm0"):
    r = site.pcocc("exec", "-j", jobid, "-w", vm, cmd)
    assert r.returncode == 0, f"{cmd}: {r.stdout} {r.stderr}"
    return r.stdout


def image(site, name):
    r = site.pcocc("image", "show", "--json", f"user:{name}", check=True)
    return json.loads(r.stdout)


def test_saved_file_is_in_the_next_cluster_and_the_revision_went_up(site):
    assert image(site, "tiny")["revision"] == 0
    job = start(site)
    sh(site, job, "echo saved-by-vm0 > /root/saved.txt")
    r = site.pcocc("save", "-j", job, "--json", "vm0")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["uri"] == "user:tiny@1" and res["base"] == "user:tiny@0" and res["frozen"] and not res["full"]
    assert res["layer_bytes"] < 32 * 2**20  # only what the VM changed
    stop(site, job)
    rev = image(site, "tiny")
    assert rev["revision"] == 1 and len(rev["layers"]) == 2  # a layer on revision 0
    assert site.pcocc("image", "verify").returncode == 0

    job = start(site)
    assert sh(site, job, "cat /root/saved.txt").strip() == "saved-by-vm0"
    # a second save stacks another revision on the one this VM runs on
    sh(site, job, "echo second > /root/second.txt")
    r = site.pcocc("save", "-j", job)
    assert r.returncode == 0 and r.stdout.strip() == "user:tiny@2", r.stderr
    assert "frozen" in r.stderr and "saved as user:tiny@2" in r.stderr
    stop(site, job)
    assert len(image(site, "tiny")["layers"]) == 3


def test_full_and_dest(site):
    job = start(site)
    sh(site, job, "echo in-copies > /root/copies.txt")
    r = site.pcocc("save", "-j", job, "-d", "copy")  # same repository: a new image sharing the layers
    assert r.returncode == 0 and r.stdout.strip() == "user:copy@0", r.stderr
    r = site.pcocc("save", "-j", job, "--full", "-d", "full")  # standalone: one layer, no backing
    assert r.returncode == 0 and r.stdout.strip() == "user:full@0", r.stderr
    r = site.pcocc("save", "-j", job, "-d", "full")
    assert r.returncode == ExitStatus.USAGE and "already exists" in r.stderr
    r = site.pcocc("save", "-j", job, "-d", "copy@3")
    assert r.returncode == ExitStatus.USAGE and "revision" in r.stderr
    r = site.pcocc("save", "-j", job, "-d", "nosuchrepo:x")
    assert r.returncode == ExitStatus.NOT_FOUND and "nosuchrepo" in r.stderr
    r = site.pcocc("save", "-j", job, "vm3")
    assert r.returncode == ExitStatus.USAGE and "no VM vm3" in r.stderr
    before = image(site, "tiny")["revision"]
    r = site.pcocc("save", "-j", job, "--full", "--json")  # a standalone new revision of tiny
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["full"] and image(site, "tiny")["revision"] == before + 1
    stop(site, job)
    copy, full = image(site, "copy"), image(site, "full")
    assert len(copy["layers"]) >= 2 and len(full["layers"]) == 1
    assert len(image(site, "tiny")["layers"]) == 1
    assert list((site.repo / "tmp").iterdir()) == []  # failed saves left nothing behind
    assert site.pcocc("image", "verify").returncode == 0
    job = start(site, "full:1,copy:1")
    for vm in ("vm0", "vm1"):
        assert sh(site, job, "cat /root/copies.txt", vm).strip() == "in-copies"
    stop(site, job)


WRITER = (
    "i=0; while :; do dd if=/dev/urandom of=/root/w/f$((i % 8)) bs=64k count=2 2>/dev/null; "
    "echo $i > /root/seq.tmp; mv /root/seq.tmp /root/seq; i=$((i+1)); done"
)


def test_save_while_the_guest_writes_is_consistent(site):
    job = start(site)
    sh(site, job, f"mkdir -p /root/w; nohup sh -c '{WRITER}' >/dev/null 2>&1 </dev/null & echo started")
    wait_for(lambda: sh(site, job, "cat /root/seq 2>/dev/null || echo -1").strip() not in ("-1", "0"), timeout=60, what="the guest writer")
    r = site.pcocc("save", "-j", job, "-d", "busy", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["frozen"] and res["frozen_filesystems"] >= 1 and not res["warnings"]
    # the writer goes on after the save: the file systems were thawed
    seq = int(sh(site, job, "cat /root/seq"))
    wait_for(lambda: int(sh(site, job, "cat /root/seq")) > seq, timeout=60, what="the guest writer")
    stop(site, job)
    site.write(".pcocc/templates.yaml", (site.home / ".pcocc/templates.yaml").read_text() + "busy:\n  image: user:busy\n")
    job = start(site, "busy:1")
    # a frozen ext4 is clean: it mounts without replaying its journal, and its files are whole
    dmesg = sh(site, job, "dmesg")
    assert "recovery complete" not in dmesg and "mounted filesystem" in dmesg
    assert sh(site, job, "cat /root/seq").strip().isdigit()
    stop(site, job)


def test_an_interrupted_save_publishes_nothing(site):
    """repro r24: Ctrl-C on pcocc save while the VM copies the disk."""
    import signal
    import subprocess

    job = start(site)
    sh(site, job, "head -c 40M /dev/urandom > /root/r; for i in 1 2 3 4 5; do cat /root/r; done > /root/big; rm /root/r; sync")
    tmp = site.repo / "tmp"
    qemu = json.loads(site.store_items()[f"/pcocc/users/{site.environ['USER']}/clusters/{job}/vms/0"])["qemu_pid"]
    for attempt in range(3):  # a host slower than the copy is short may see it end before the Ctrl-C lands: again then
        dest = f"interrupted{attempt}"
        proc = subprocess.Popen([str(PCOCC), "save", "-j", str(job), "-d", dest, "--full"],
                                env=site.environ, cwd=site.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=as_a_foreground_job)
        held = False
        try:
            wait_for(lambda: tmp.exists() and list(tmp.iterdir()), timeout=120, interval=0.01, what="the VM writing the layer")
            # qemu held as soon as the copy starts (as on a host overloaded for a while): the copy
            # cannot end before the Ctrl-C, however slow this test is to send it
            os.kill(qemu, signal.SIGSTOP)
            held = True
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            if held:
                os.kill(qemu, signal.SIGCONT)
        if not (proc.returncode == 0 and f"user:{dest}@0" in err):
            break
    assert proc.returncode == ExitStatus.INTERRUPTED, err
    assert "Traceback" not in err and "interrupted" in err

    def probe():  # the VM takes one save at a time: once this one runs, the interrupted one is over
        r = site.pcocc("save", "-j", job, "-d", "probe")
        assert r.returncode == 0 or "already in progress" in r.stderr, r.stderr
        return r.returncode == 0

    wait_for(probe, timeout=300, what="the interrupted save to end")
    names = site.pcocc("image", "list", check=True).stdout
    assert dest not in names and "probe" in names
    assert list(tmp.iterdir()) == []
    assert site.pcocc("image", "verify").returncode == 0
    assert sh(site, job, "ls -l /root/big | wc -l").strip() == "1"  # the VM goes on, its disk whole
    stop(site, job)
