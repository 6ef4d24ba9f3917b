"""The history of ended clusters on the local backend, with real qemu: every way a cluster ends is recorded."""

import json

import pytest
from waiting import wait_for

from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration


def ps(site):
    return json.loads(site.pcocc("ps", "--json", check=True).stdout)


def history(site, *argv):
    return json.loads(site.pcocc("history", "--json", *argv, check=True).stdout)


def test_what_cannot_start_is_refused_at_submission(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\nnoimg:\n  image: user:nothere\n")
    r = site.pcocc("batch", "-m", "256", "noimg:1")
    assert r.returncode == ExitStatus.NOT_FOUND, r.stderr
    assert r.stderr.startswith("pcocc: error: template noimg: image user:nothere: ") and r.stdout == ""
    r = site.pcocc("batch", "-m", "256", "tny:1")
    assert r.returncode == ExitStatus.NOT_FOUND and "did you mean 'tiny'" in r.stderr, r.stderr
    r = site.pcocc("batch", "-m", "256", "-c", "1000", "tiny:1")
    assert r.returncode == ExitStatus.RESOURCES, r.stderr
    assert ps(site) == [] and history(site) == []


def test_a_batch_script_s_end_is_in_the_history_and_its_output_file(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    script = site.root / "job.sh"
    script.write_text("#!/bin/sh\necho \"script on $(hostname)\"\nexit 3\n")
    r = site.pcocc("batch", "-m", "256", "-J", "scripted", "-b", script, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout)
    wait_for(lambda: ps(site) == [], timeout=300, what="the batch cluster to end")
    (rec,) = history(site, "-j", jobid)
    assert (rec["state"], rec["exit_code"], rec["name"], rec["reason"]) == \
        ("FAILED", 3, "scripted", "the batch script exited with status 3"), rec
    assert rec["submitted"] <= rec["started"] <= rec["ended"] and rec["vms"][0]["name"] == "vm0"
    out = (site.root / f"pcocc_{jobid}.out").read_text().splitlines()
    assert out == ["script on vm0", f"pcocc: cluster {jobid} ended: FAILED (the batch script exited with status 3)"]
    table = site.pcocc("history", check=True).stdout
    assert [line.split()[:4] for line in table.splitlines()[2:]] == [[str(jobid), "scripted", "tiny:1", "FAILED"]]


def test_a_cancelled_cluster_and_an_alloc_are_in_the_history(site):
    site.write(".pcocc/templates.yaml", "tiny:\n  image: user:tiny\n")
    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.split()[0])
    site.pcocc("cancel", "-j", jobid, check=True)
    (rec,) = history(site, "-j", jobid)
    assert rec["state"] == "CANCELLED" and rec["reason"].startswith("cancelled by ") and rec["vms"][0]["state"] == "stopped"
    script = site.root / "alloc.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    r = site.pcocc("alloc", "-m", "256", "-E", script, "tiny:1")
    assert r.returncode == 0, r.stderr
    (rec,) = [x for x in history(site) if x["jobid"] != jobid]
    assert rec["state"] == "COMPLETED" and rec["reason"] == "the allocation's script exited with status 0" and rec["exit_code"] == 0
    assert ps(site) == []
