"""User-given strings and files as data, with a real VM (issue 12, sections 4 and 5): exec -u names,
scripts at private paths in the guest, a fresh cloud-init instance-id, user-data refused on the VM side, and each kind of input only the VM can check failing it in one line."""

import json
import re

import pytest

from local_site import LocalSite
from waiting import wait_for
from pcocc.errors import ExitStatus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_image):
    site = LocalSite(tmp_path_factory.mktemp("untrusted"), tiny_image)
    # the late* templates name the job id in a path: only the VM's side can check them ('late':
    # binary user-data files there; the others, one kind of such input each)
    site.write(".pcocc/templates.yaml", f"""\
tiny:
  image: user:tiny
late:
  image: user:tiny
  user-data: {site.home}/ud-%{{jobid}}.bin
late-user-data-missing:
  image: user:tiny
  user-data: {site.home}/none-%{{jobid}}.yaml
late-image:
  image: user:tiny-%{{jobid}}
late-kernel:
  image: user:tiny
  kernel: {site.home}/vmlinuz-%{{jobid}}
late-mount:
  image: user:tiny
  mount-points:
    share:
      path: {site.home}/share-%{{jobid}}
""")
    for jobid in range(1, 8):
        (site.home / f"ud-{jobid}.bin").write_bytes(b"\x9d\xff\x00binary" * 64)
    yield site
    site.cleanup()


@pytest.fixture(scope="module")
def cluster(site):
    r = site.pcocc("batch", "-m", "256", "--wait", "tiny:1", check=True)
    yield r.stdout.split()[0]
    site.pcocc("cancel", "-j", r.stdout.split()[0])


def test_exec_user_is_a_name_never_an_option_of_su(site, cluster):
    r = site.pcocc("exec", "-j", cluster, "-u", "-c id", "id")
    assert r.returncode == ExitStatus.USAGE and "uid=0" not in r.stdout
    assert "invalid user name" in r.stderr
    r = site.pcocc("exec", "-j", cluster, "-u", "nobody", "id -u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "65534"


def test_exec_script_runs_from_a_private_random_dir_then_goes(site, cluster):
    script = site.root / "where.sh"
    script.write_text('d=$(dirname "$0"); echo "$d"; ls -ld "$d" | cut -c1-10; echo "args: $*"\n')
    # a guest user's links at the old predictable paths must not matter
    site.pcocc("exec", "-j", cluster, "for p in 1 2 3 4 5; do ln -sf /etc/passwd /tmp/pcocc-exec-$p; done", check=True)
    r = site.pcocc("exec", "-j", cluster, "-s", script, "a b", check=True)
    where, mode, args = r.stdout.splitlines()
    assert re.fullmatch(r"/tmp/pcocc-script\.[A-Za-z0-9]{10}", where), where
    assert mode == "drwx------" and args == "args: a b"
    gone = site.pcocc("exec", "-j", cluster, f"test -e {where} && echo left || echo gone", check=True)
    assert gone.stdout.strip() == "gone"
    assert "root:" in site.pcocc("exec", "-j", cluster, "head -1 /etc/passwd", check=True).stdout


def test_instance_id_is_the_clusters_uuid(site, cluster):
    info = next(json.loads(v) for k, v in site.store_items().items() if k.endswith(f"/{cluster}/info"))
    assert re.fullmatch(r"[0-9a-f]{32}", info["uuid"])
    meta = site.pcocc("exec", "-j", cluster, "cat /run/pcocc/seed-data/meta-data", check=True).stdout
    assert f"instance-id: pcocc-{info['uuid']}-vm0" in meta


def test_binary_user_data_found_by_the_vm_fails_it_in_one_line(site):
    r = site.pcocc("batch", "-m", "256", "--wait", "late:1", timeout=300)
    assert r.stdout.strip(), r.stderr
    jobid = r.stdout.split()[0]
    try:
        assert r.returncode == ExitStatus.ERROR, r.stderr
        errors = [l for l in r.stderr.splitlines() if l.startswith("pcocc: error:")]
        assert len(errors) == 1 and "user-data" in errors[0] and "binary data" in errors[0], r.stderr
        assert "codec" not in r.stderr and "Traceback" not in r.stderr
    finally:
        site.pcocc("cancel", "-j", jobid)


@pytest.mark.parametrize("template, says", [
    ("late-user-data-missing", "user-data"),
    ("late-image", "tiny-"),
    ("late-kernel", "vmlinuz-"),
    ("late-mount", "share-"),
])
def test_what_only_the_vm_can_check_fails_it_in_one_line(site, template, says):
    """Issue 12, section 5: an `internal run` failure reaches batch --wait and ps as one line."""
    r = site.pcocc("batch", "-m", "256", "--wait", f"{template}:1", timeout=300)
    assert r.stdout.strip(), r.stderr  # submitted: only its VM finds the fault
    jobid = r.stdout.split()[0]
    try:
        assert r.returncode == ExitStatus.ERROR, r.stderr
        errors = [l for l in r.stderr.splitlines() if l.startswith("pcocc: error:")]
        assert len(errors) == 1 and says in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        # its only VM failed, so the cluster ends (a moment after batch --wait has said why): ps
        # then sends to the history, which says why in one line
        r = wait_for(lambda: (p := site.pcocc("ps", "-j", jobid)).returncode == ExitStatus.NOT_FOUND and p,
                     what="the cluster's end")
        assert f"pcocc history -j {jobid}" in r.stderr, r.stderr
        r = site.pcocc("history", "-j", jobid, "--json")
        assert r.returncode == 0, r.stderr
        (ended,) = json.loads(r.stdout)
        assert ended["state"] == "FAILED" and says in ended["reason"] and "\n" not in ended["reason"], ended
    finally:
        site.pcocc("cancel", "-j", jobid)
