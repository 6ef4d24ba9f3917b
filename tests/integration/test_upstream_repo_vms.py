"""A repository of the original pcocc (layout version 2), built from scratch by the test in the
original's format, lists, shows, verifies, boots a real VM (local backend, qemu) and takes its
save in place; and an image is a template of its name (the original's per-image templates)."""

import hashlib
import json
import subprocess

import pytest

from local_site import LocalSite
from pcocc.images import upstream

pytestmark = pytest.mark.integration


def original_repo(root, disk):
    """The original's layout, written without pcocc: .config, data/<xx>/<sha>, meta/<name>@<rev> (JSON)."""
    for d in ("data", "meta", ".tmp"):
        (root / d).mkdir(parents=True)
    (root / ".config").write_text("{version: 2}\n")
    tmp = root / ".tmp" / "import"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(tmp)], check=True)  # as its import does
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    (root / "data" / sha[:2]).mkdir()
    blob = root / "data" / sha[:2] / sha
    tmp.rename(blob)
    blob.chmod(0o444)
    meta = {"name": "otiny", "revision": 0, "kind": "vm", "owner": "alice", "timestamp": 1700000000.0,
            "data_blobs": [sha], "custom_meta": {}}
    (root / "meta" / "otiny@0").write_text(json.dumps(meta))
    return sha


def original_layer(root, name, base):
    """A two-layer image NAME@0 in the original's layout, as its save writes one: a qcow2 layer on blob
    base, backed by "../../data/<xx>/<base>", with a few bytes of its own."""
    tmp = root / "data" / base[:2] / f".layer-{name}"  # where the relative backing name resolves
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f"../../data/{base[:2]}/{base}", str(tmp)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(tmp)], check=True, capture_output=True)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    (root / "data" / sha[:2]).mkdir(exist_ok=True)
    blob = root / "data" / sha[:2] / sha
    tmp.rename(blob)
    blob.chmod(0o444)
    meta = {"name": name, "revision": 0, "kind": "vm", "owner": "alice", "timestamp": 1700000001.0,
            "data_blobs": [base, sha], "custom_meta": {}}
    (root / "meta" / f"{name}@0").write_text(json.dumps(meta))
    return sha


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_image):
    s = LocalSite(tmp_path_factory.mktemp("upstream"), tiny_image)
    s.orig = s.root / "orig-repo"
    s.base = original_repo(s.orig, tiny_image.disk)
    s.write(".pcocc/repos.yaml", f"repos:\n  - name: orig\n    path: {s.orig}\n  - name: user\n    path: {s.repo}\n")
    # the original's image has only its disk: the template gives the kernel it boots
    kernel = tiny_image.vmlinux or tiny_image.kernel
    s.write(".pcocc/templates.yaml", f"booted:\n  image: orig:otiny\n  kernel: {kernel}\n  initrd: {tiny_image.initrd}\n"
                                     f"  append: \"{tiny_image.append}\"\n")
    yield s
    s.cleanup()


def start(site, definition):
    r = site.pcocc("batch", "-m", "256", "--wait", definition, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def sh(site, jobid, cmd):
    r = site.pcocc("exec", "-j", jobid, "-w", "vm0", cmd)
    assert r.returncode == 0, f"{cmd}: {r.stdout} {r.stderr}"
    return r.stdout


def test_the_original_repository_lists_shows_and_verifies(site):
    r = site.pcocc("image", "list", "--json", check=True)
    assert ("orig", "otiny", 0) in {(i["repo"], i["name"], i["revision"]) for i in json.loads(r.stdout)}
    show = json.loads(site.pcocc("image", "show", "--json", "orig:otiny", check=True).stdout)
    assert show["layers"] == [site.base] and show["owner"] == "alice" and show["size"] > 0
    assert "original pcocc" in site.pcocc("image", "show", "orig:otiny", check=True).stdout
    r = site.pcocc("image", "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_vm_boots_from_it_and_its_save_is_the_next_revision_in_the_original_format(site):
    job = start(site, "booted:1")
    try:
        sh(site, job, "echo saved-in-the-original > /root/orig.txt && sync")
        r = site.pcocc("save", "-j", job, "--json", "vm0", timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["uri"] == "orig:otiny@1"
    finally:
        site.pcocc("cancel", "-j", job)
    raw = json.loads((site.orig / "meta" / "otiny@1").read_text())
    assert upstream.schema_problem(raw) is None and raw["revision"] == 1 and raw["kind"] == "vm"
    assert raw["data_blobs"][0] == site.base and len(raw["data_blobs"]) == 2
    assert not list((site.orig / "meta").glob(".*")) and sorted(p.name for p in (site.orig / "meta").glob("otiny@*")) == ["otiny@0", "otiny@1"]
    r = site.pcocc("image", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    job = start(site, "booted:1")  # the next VM boots revision 1
    try:
        assert sh(site, job, "cat /root/orig.txt").strip() == "saved-in-the-original"
    finally:
        site.pcocc("cancel", "-j", job)
    r = site.pcocc("image", "repo", "gc", "orig", check=True)
    assert site.pcocc("image", "show", "--json", "orig:otiny@0", check=True).returncode == 0


def test_an_image_is_a_template_of_its_name_with_no_templates_entry(site):
    """`pcocc image import disk user:NAME` then `pcocc batch NAME:1`: the embedded default has a default resource set."""
    r = site.pcocc("template", "show", "tiny", "--json", check=True)
    assert json.loads(r.stdout)["scope"] == "image"
    job = start(site, "tiny:1")
    try:
        assert sh(site, job, "hostname").strip() == "vm0"
    finally:
        site.pcocc("cancel", "-j", job)


def test_a_layered_image_copies_between_the_two_layouts(site):
    """Backing names differ (../blobs/H, ../../data/xx/H): each copied layer is rebased, and both repositories verify."""
    original_layer(site.orig, "olayered", site.base)  # its own image: tests of a module may run in different workers
    top = json.loads(site.pcocc("image", "show", "--json", "orig:olayered", check=True).stdout)
    assert len(top["layers"]) == 2 and top["layers"][0] == site.base
    site.pcocc("image", "copy", "orig:olayered", "user:ocopy", check=True)
    mine = json.loads(site.pcocc("image", "show", "--json", "user:ocopy", check=True).stdout)
    assert mine["layers"][0] == top["layers"][0] and mine["layers"][1] != top["layers"][1] and mine["revision"] == 0
    site.pcocc("image", "copy", "user:ocopy", "orig:back", check=True)
    back = json.loads(site.pcocc("image", "show", "--json", "orig:back", check=True).stdout)
    assert back["layers"][0] == top["layers"][0] and len(back["layers"]) == 2
    tops = [site.orig / "data" / top["layers"][1][:2] / top["layers"][1], site.repo / "blobs" / mine["layers"][1],
            site.orig / "data" / back["layers"][1][:2] / back["layers"][1]]
    for other in tops[1:]:
        r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(tops[0]), str(other)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr  # the same guest content through either chain
    r = site.pcocc("image", "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_resize_and_delete_follow_the_originals_numbering(site):
    site.pcocc("image", "import", "-t", "qcow2", site.orig / "data" / site.base[:2] / site.base, "orig:sized", check=True)
    size = json.loads(site.pcocc("image", "show", "--json", "orig:sized", check=True).stdout)["size"]
    site.pcocc("image", "resize", "orig:sized", size + 2**30, check=True)
    show = json.loads(site.pcocc("image", "show", "--json", "orig:sized", check=True).stdout)
    assert show["revision"] == 1 and show["size"] == size + 2**30 and len(show["layers"]) == 2
    site.pcocc("image", "delete", "orig:sized@1", check=True)
    site.pcocc("image", "resize", "orig:sized", size + 2**31, check=True)  # the original gives number 1 again
    assert sorted(p.name for p in (site.orig / "meta").glob("sized@*")) == ["sized@0", "sized@1"]
    r = site.pcocc("image", "verify")
    assert r.returncode == 0, r.stdout + r.stderr
