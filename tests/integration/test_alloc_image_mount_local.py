"""batch -E and batch -b with -E on the local backend, with real qemu (issue 13): both run, the
cluster ends with -b (else with -E), the host command gets the cluster in its environment and is
stopped with the cluster. The SLURM side is in test_alloc_image_mount.py."""

import json
import os
import shlex

import pytest
from waiting import wait_for

from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration


def _ended(site, jobid):
    r = site.pcocc("history", "--json", "-j", jobid)
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_batch_b_and_e_both_run_and_the_cluster_ends_with_b(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    pidfile = site.root / "host.pid"
    host = site.root / "host.sh"  # not executable: run by its #! line, as the original ran its copy
    host.write_text(f"#!/bin/sh\necho \"host in $PCOCC_JOB_ID: $PCOCC_VMS ($PCOCC_VM_COUNT)\"\necho $$ > {pidfile}\nexec sleep 100000\n")
    job = site.root / "job.sh"
    job.write_text("#!/bin/sh\necho \"script on $(hostname) in $PCOCC_JOB_ID: $PCOCC_VMS\"\n")
    r = site.pcocc("batch", "-m", "256", "-b", job, "-E", host, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout)
    (rec,) = wait_for(lambda: _ended(site, jobid), timeout=600, what="the cluster to end with its batch script")
    assert (rec["state"], rec["reason"]) == ("COMPLETED", "the batch script exited with status 0"), rec
    out = (site.root / f"pcocc_{jobid}.out").read_text()
    lines = out.splitlines()
    assert f"host in {jobid}: vm0 (1)" in lines and f"script on vm0 in {jobid}: vm0" in lines, out
    assert lines[-1] == f"pcocc: cluster {jobid} ended: COMPLETED (the batch script exited with status 0)", out
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # stopped with the cluster (its group: sleep too)
        os.kill(pid, 0)


def test_batch_e_alone_ends_the_cluster_with_its_status(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    host = site.root / "host2.sh"
    host.write_text("#!/bin/sh\npcocc exec hostname\nexit 3\n")
    host.chmod(0o755)
    r = site.pcocc("batch", "-m", "256", "-E", host, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout)
    (rec,) = wait_for(lambda: _ended(site, jobid), timeout=600, what="the cluster to end with its host command")
    assert (rec["state"], rec["exit_code"], rec["reason"]) == ("FAILED", 3, "the host script exited with status 3"), rec
    out = (site.root / f"pcocc_{jobid}.out").read_text().splitlines()
    # -E starts once qemu runs (as in the original): exec may first say that it waits for the guest
    out = [line for line in out if not line.startswith("pcocc: waiting for VMs still starting: ")]
    assert out == ["vm0", f"pcocc: cluster {jobid} ended: FAILED (the host script exited with status 3)"], out


MARK = "pcocc_test_image=other"


def test_a_cluster_with_image_is_not_saved_and_restarts_on_its_checkpoint_s_image(site, tiny_image):
    """--image (issue 13) through ckpt and a restart given only -r DIR (issue 14): the checkpoint's
    definition, cores, memory and image; save refused before and after."""
    from pcocc.config.models import Repo
    from pcocc.images.store import ImageStore

    store = ImageStore([Repo("user", str(site.repo), "user")], site.environ["USER"])
    boot = {"kernel": str(tiny_image.vmlinux or tiny_image.kernel), "initrd": str(tiny_image.initrd),
            "append": f"{tiny_image.append} {MARK}"}
    store.import_(str(tiny_image.disk), "other", "qcow2", boot=boot)  # the same disk, told apart by its kernel line
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    r = site.pcocc("batch", "-m", "256", "--image", "user:other", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.split()[0])
    assert MARK in site.pcocc("exec", "-j", job, "cat /proc/cmdline", check=True).stdout
    r = site.pcocc("save", "-j", job)
    assert r.returncode == ExitStatus.ERROR and "its disks cannot be saved" in r.stderr, r.stderr
    ck = site.root / "ck img"
    r = site.pcocc("ckpt", "-j", job, ck)
    assert r.returncode == 0, r.stderr
    hint = [line for line in r.stderr.splitlines() if line.startswith("restart it with: ")]
    assert hint == [f"restart it with: pcocc batch -r '{ck}'"], r.stderr
    r = site.pcocc(*shlex.split(hint[0].split(": ", 1)[1])[1:], "--wait")  # as pasted (plus --wait)
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.split()[0])
    assert MARK in site.pcocc("exec", "-j", job, "cat /proc/cmdline", check=True).stdout  # the checkpoint's image
    r = site.pcocc("save", "-j", job)
    assert r.returncode == ExitStatus.ERROR and "its disks cannot be saved" in r.stderr, r.stderr
    site.pcocc("cancel", "-j", job, check=True)
