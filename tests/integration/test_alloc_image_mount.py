"""alloc --image, --mount and -E on the SLURM test cluster: the VM boots the image given, not its
template's, and sees the directory given (issue 13). In-process checks of the same options are in
tests/unit/test_alloc_options.py.

Two images that a guest tells apart: user:tiny (the template's) and user:other, the same disk
imported with one more kernel argument (pcocc_test_image=other), which the guest shows in
/proc/cmdline. If the template's image boots instead, the argument is missing.
"""

import shlex
import subprocess

import pytest
from waiting import wait_for

from test_slurm_cluster import SlurmSite


pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm")]

MARK = "pcocc_test_image=other"


@pytest.fixture(scope="module")
def site(testcluster, slurm_user, tiny_image):
    from pcocc.config.models import Repo
    from pcocc.images.store import ImageStore

    s = SlurmSite.with_image(testcluster, slurm_user, tiny_image, "repo-imgmount", "tiny:\n  image: user:tiny\n")
    store = ImageStore([Repo("user", str(s.home / "repo-imgmount"), "user")], slurm_user)
    if not store.repos[0].revisions("other"):
        boot = {"kernel": str(tiny_image.vmlinux or tiny_image.kernel), "initrd": str(tiny_image.initrd),
                "append": f"{tiny_image.append} {MARK}"}
        store.import_(str(tiny_image.disk), "other", "qcow2", boot=boot)
    share = s.home / "shared"
    share.mkdir(exist_ok=True)
    (share / "marker").write_text("from the host's shared directory\n")
    subprocess.run(["chown", "-R", f"{s.pw.pw_uid}:{s.pw.pw_gid}", str(s.home)], check=True)
    yield s
    s.cancel_all()


def _write(site, name, text, mode=0o644):
    path = site.home / name
    path.write_text(text)
    path.chmod(mode)
    subprocess.run(["chown", site.user, str(path)], check=True)
    return path


def test_alloc_image_user_data_and_e_boot_the_image_given(site):
    # user-data of our own (the tiny image's init reads its #cloud-config): mount the --mount share
    ud = _write(site, "ud.yaml", "#cloud-config\nmounts:\n  - [data, /mnt/data, 9p, 'trans=virtio,version=9p2000.L,ro']\n")
    script = _write(site, "host-e.sh", "#!/bin/sh\n"
                    "echo \"job=$PCOCC_JOB_ID args=$* vms=$PCOCC_VMS count=$PCOCC_VM_COUNT\"\n"
                    "pcocc exec -w vm0 'cat /proc/cmdline; cat /mnt/data/marker' || exit 10\n"
                    "pcocc save vm0 2>&1 && exit 11\n"
                    "exit 0\n", 0o755)
    r = site.pcocc("alloc", "-N", "1", "--mem-per-cpu=256", "--image", "user:other", "--user-data", ud,
                   "--mount", f"data={site.home}/shared,readonly=true", "-E", f"{shlex.quote(str(script))} 'one arg' two",
                   "tiny:1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "args=one arg two vms=vm0 count=1" in r.stdout, r.stdout  # -E is a command line, split as a shell does
    assert MARK in r.stdout, f"the template's image booted, not user:other:\n{r.stdout}"
    assert "from the host's shared directory" in r.stdout, r.stdout
    assert "was started with --image (tiny=user:other): its disks cannot be saved" in r.stdout, r.stdout
    wait_for(lambda: not site.squeue(), what="the allocation to end")


def test_alloc_without_image_boots_the_template_s_image(site):
    """The control: the same check fails the other way, so it tells the images apart."""
    script = _write(site, "host-plain.sh", "#!/bin/sh\npcocc exec -w vm0 'cat /proc/cmdline'\n", 0o755)
    r = site.pcocc("alloc", "-N", "1", "--mem-per-cpu=256", "-E", script, "tiny:1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "console=" in r.stdout and MARK not in r.stdout, r.stdout
    wait_for(lambda: not site.squeue(), what="the allocation to end")


def test_batch_b_and_e_both_run_and_the_job_ends_with_b(site):
    host = _write(site, "host-b.sh", "#!/bin/sh\necho \"host command in job $PCOCC_JOB_ID\"\nexec sleep 100000\n", 0o755)
    job = _write(site, "job-b.sh", "#!/bin/sh\necho \"batch script on $(hostname) in $PCOCC_JOB_ID\"\n")
    r = site.pcocc("batch", "-N", "1", "--mem-per-cpu=256", "-b", job, "-E", host, "tiny:1")
    assert r.returncode == 0, r.stderr
    jobid = int(r.stdout.strip())
    wait_for(lambda: not site.squeue(), timeout=600, what="the batch job to end with its -b script")
    out = (site.home / f"pcocc_{jobid}.out").read_text()
    assert f"host command in job {jobid}" in out and f"batch script on vm0 in {jobid}" in out, out
    assert f"pcocc: cluster {jobid} ended: COMPLETED (the batch script exited with status 0)" in out, out
