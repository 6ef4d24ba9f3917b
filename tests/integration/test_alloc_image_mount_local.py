"""batch -E and batch -b with -E on the local backend, with real qemu (issue 13): both run, the
cluster ends with -b (else with -E), the host command gets the cluster in its environment and is
stopped with the cluster. The SLURM side is in test_alloc_image_mount.py."""

import json
import os

import pytest
from waiting import wait_for

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
    job.write_text("#!/bin/sh\necho \"script on $(hostname)\"\n")
    r = site.pcocc("batch", "-m", "256", "-b", job, "-E", host, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout)
    (rec,) = wait_for(lambda: _ended(site, jobid), timeout=600, what="the cluster to end with its batch script")
    assert (rec["state"], rec["reason"]) == ("COMPLETED", "the batch script exited with status 0"), rec
    out = (site.root / f"pcocc_{jobid}.out").read_text()
    lines = out.splitlines()
    assert f"host in {jobid}: vm0 (1)" in lines and "script on vm0" in lines, out
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
    assert out == ["vm0", f"pcocc: cluster {jobid} ended: FAILED (the host script exited with status 3)"], out
