"""Repositories of the original pcocc (layout version 2), read and written in place, and per-image templates.

Each test builds its repository from scratch in the original's format, as its
documentation and code describe it: `.config` (YAML, version 2), blobs in
data/<xx>/<sha256>, one JSON file per revision in meta/<name>@<rev> with
exactly the keys its schema allows, layers chained by "../../data/<xx>/<sha>".
Layers are written by pcocc.images.qcow2 (no qemu-img): tests/integration/
test_upstream_repo.py boots and saves a real VM in such a repository.
"""

import hashlib
import json
import os
import shutil
import time

import pytest

from pcocc.errors import ExitStatus, NotFoundError, UsageError
from pcocc.images import qcow2, upstream
from pcocc.images.repo import ImageExists, RepositoryError
from pcocc.images.store import ImageStore, open_repository
from pcocc.templates import IMAGE_SCOPE, Template, TemplateSet

from test_images_repo import MiB, R, base_layer  # noqa: E402,F401 - one helper for both layouts' tests


class Original:
    """Writes a repository as the original pcocc (v0.7) does, without any pcocc code."""

    def __init__(self, root, version=2):
        self.root = root
        for d in ("data", "meta", ".tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / ".config").write_text(f"{{version: {version}}}\n")  # PyYAML's flow style, as the original dumps it

    def blob(self, src):
        data = src.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        dest = self.root / "data" / sha[:2] / sha
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(data)
        dest.chmod(0o444)
        return sha

    def layer(self, tmp, parent=None, size=16 * MiB):
        path = tmp / f"layer-{time.monotonic_ns()}"
        if parent:
            qcow2.create_overlay(str(path), f"../../data/{parent[:2]}/{parent}", size)
        else:
            base_layer(path, size)
        return self.blob(path)

    def meta(self, name, rev, blobs, kind="vm", custom=None, owner="alice", **extra):
        meta = {"name": name, "revision": rev, "kind": kind, "owner": owner, "timestamp": 1700000000.5,
                "data_blobs": blobs, "custom_meta": {} if custom is None else custom, **extra}
        (self.root / "meta" / f"{name}@{rev}").write_text(json.dumps(meta))
        return meta


@pytest.fixture
def orig(tmp_path):
    """An original repository with centos@0 (one layer) and centos@1 (a layer on it)."""
    o = Original(tmp_path / "orig")
    work = tmp_path / "work"
    work.mkdir()
    o.work = work
    o.l0 = o.layer(work)
    o.l1 = o.layer(work, o.l0)
    o.meta("centos", 0, [o.l0])
    o.meta("centos", 1, [o.l0, o.l1], custom={"site-note": "kept"}, description="CentOS 7")
    return o


@pytest.fixture
def store(orig, tmp_path):
    return ImageStore([R("orig", orig.root), R("own", tmp_path / "own")], "tester")


def tree(root):
    """{relative path: (mode, bytes)} of every file, for 'left as it was' checks (pcocc's lock files aside)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if rel.startswith(".lock-"):
                continue
            with open(p, "rb") as fh:
                out[rel] = (os.stat(p).st_mode, fh.read())
    return out


def test_the_layout_is_detected_and_listed(store, orig):
    repo = store.repo("orig")
    assert repo.layout == "pcocc-0.7" and store.repo("own").layout == "pcocc"
    assert [(r.repo.name, r.name, r.revision) for r in store.list()] == [("orig", "centos", 1)]
    rev = store.find("centos")
    assert rev.layers == (orig.l0, orig.l1) and rev.size == 16 * MiB and rev.owner == "alice"
    assert rev.description == "CentOS 7" and rev.timestamp.startswith("2023-11-14T22:13:20")
    assert rev.top == str(orig.root / "data" / orig.l1[:2] / orig.l1)
    assert [r.revision for r in repo.revisions("centos")] == [0, 1]
    assert store.find("orig:centos@0").layers == (orig.l0,)
    with pytest.raises(NotFoundError, match="revision 7"):
        store.find("centos@7")


def test_verify_passes_and_gc_has_nothing_to_remove(store):
    repo = store.repo("orig")
    assert repo.verify() == [] and repo.leftovers() == []


def test_version_1_is_refused_naming_the_originals_upgrade(tmp_path):
    Original(tmp_path / "old", version=1)
    s = ImageStore([R("old", tmp_path / "old")], "tester")
    with pytest.raises(RepositoryError) as exc:
        s.find("centos")
    assert "version-1" in exc.value.message and "pcocc image repo gc old" in exc.value.hint
    problems = []
    assert s.list(problems=problems) == [] and "version-1" in problems[0].message


def test_an_unknown_version_is_refused(tmp_path):
    Original(tmp_path / "new", version=3)
    with pytest.raises(RepositoryError, match="version 3"):
        ImageStore([R("new", tmp_path / "new")], "tester").repo().image_names()


def grow(store, rev):
    """The next revision of rev's image: one more empty layer, written as a save does (backing from the repository)."""
    return store.save_layer(rev, lambda path, backing: qcow2.create_overlay(path, backing, rev.size))


def test_a_save_follows_the_originals_numbering_schema_and_chain(store, orig):
    rev = grow(store, store.find("centos"))
    assert rev.revision == 2 and rev.layers[:2] == (orig.l0, orig.l1)
    raw = json.loads((orig.root / "meta" / "centos@2").read_text())
    assert upstream.schema_problem(raw) is None
    assert set(raw) <= {"name", "revision", "data_blobs", "description", "kind", "owner", "timestamp", "custom_meta"}
    assert raw["kind"] == "vm" and raw["owner"] == "tester" and isinstance(raw["timestamp"], float)
    assert raw["data_blobs"] == list(rev.layers) and raw["custom_meta"] == {"site-note": "kept"}  # carried, as the original does
    assert qcow2.read_header(rev.top)[1] == f"../../data/{orig.l1[:2]}/{orig.l1}"
    assert store.repo("orig").verify() == []
    # the original's numbering: a deleted top revision's number is given again
    store.delete("orig:centos@2")
    assert grow(store, store.find("centos")).revision == 2
    assert not list((orig.root / ".tmp" / upstream.OWN_TMP).iterdir())


def test_boot_files_go_in_custom_meta_and_first_in_data_blobs(store, orig, tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"kernel" * 100)
    initrd.write_bytes(b"initrd" * 100)
    disk = tmp_path / "disk.qcow2"
    base_layer(disk)
    repo = store.repo("orig")
    with repo.transaction("test") as added:
        tmp = repo.tmp_path("t")
        shutil.copyfile(disk, tmp)
        sha = repo.store_blob(tmp, added)
        boot = store._store_boot(repo, {"kernel": str(kernel), "initrd": str(initrd), "append": "console=ttyS0"}, added)
        rev = repo.commit("tiny", [sha], 0, "tester", new_image=True, boot=boot)
    raw = json.loads((orig.root / "meta" / "tiny@0").read_text())
    assert raw["data_blobs"] == [boot["kernel"], boot["initrd"], sha]  # the original boots the last one
    assert raw["custom_meta"] == {upstream.BOOT_KEY: boot}
    assert rev.layers == (sha,) and rev.boot_files()[2] == "console=ttyS0"
    assert rev.boot_files()[0] == str(orig.root / "data" / boot["kernel"][:2] / boot["kernel"])
    assert repo.verify() == []
    # a new revision keeps them
    assert grow(store, rev).boot == rev.boot


def test_a_failed_save_leaves_the_repository_as_it_was(store, orig):
    before = tree(orig.root)

    def fails(path, backing):
        qcow2.create_overlay(path, backing, 16 * MiB)
        raise OSError(28, "No space left on device")

    with pytest.raises(Exception) as exc:
        store.save_layer(store.find("centos"), fails)
    assert "no space" in str(exc.value).lower()
    assert tree(orig.root) == before

    def published_late():  # the last check before the commit fails: the stored blob is removed again
        raise UsageError("abandoned")

    with pytest.raises(UsageError):
        store.save_layer(store.find("centos"), lambda p, b: qcow2.create_overlay(p, b, 16 * MiB), before_commit=published_late)
    assert tree(orig.root) == before
    assert store.repo("orig").verify() == []


def test_import_copy_and_delete_in_place(store, orig, tmp_path):
    own = store.repo("own")
    store.copy("orig:centos@0", "own:c0")  # one layer: the same blob in either layout
    assert own.get("c0").layers == (orig.l0,)
    with pytest.raises(ImageExists):
        store.copy("own:c0", "orig:centos")
    store.copy("own:c0", "orig:c0")
    raw = json.loads((orig.root / "meta" / "c0@0").read_text())
    assert raw["revision"] == 0 and upstream.schema_problem(raw) is None
    deleted = store.delete("orig:c0")
    assert [r.revision for r in deleted] == [0] and not (orig.root / "meta" / "c0@0").exists()


def test_gc_spares_young_unreferenced_blobs_and_others_tmp_files(store, orig, monkeypatch):
    """The original writes data before meta and takes no lock: a young unreferenced blob may be its write in flight."""
    in_flight = orig.layer(orig.work, orig.l1)  # its metadata is not written yet
    their_tmp = orig.root / ".tmp" / "tmpabc123"
    their_tmp.write_bytes(b"converting")
    repo = store.repo("orig")
    assert repo.gc() == (0, 0)
    assert (orig.root / "data" / in_flight[:2] / in_flight).exists() and their_tmp.exists()
    assert repo.leftovers() == []
    monkeypatch.setattr(upstream, "YOUNG_SECONDS", 0)  # as if a day went by
    assert sorted(repo.leftovers()) == sorted([f"data/{in_flight[:2]}/{in_flight}", ".tmp/tmpabc123"])
    files, _ = repo.gc()
    assert files == 2 and not (orig.root / "data" / in_flight[:2] / in_flight).exists()
    assert store.find("centos@1").layers == (orig.l0, orig.l1) and repo.verify() == []


def test_container_images_are_not_listed_nor_booted_but_their_blobs_are_kept(store, orig, monkeypatch):
    (orig.work / "ctr-layer").write_bytes(b"a tar layer")
    blob = orig.blob(orig.work / "ctr-layer")
    orig.meta("busybox", 0, [f"sha256:{blob}"], kind="ctr", custom={"oci_index": {}})
    assert [r.name for r in store.list()] == ["centos"]
    with pytest.raises(UsageError, match="container"):
        store.find("orig:busybox")
    with pytest.raises(UsageError, match="container"):
        store.repo("orig").commit("busybox", [orig.l0], 0, "tester")
    monkeypatch.setattr(upstream, "YOUNG_SECONDS", 0)
    store.repo("orig").gc()
    assert (orig.root / "data" / blob[:2] / blob).exists()


def test_metadata_the_original_refuses_is_skipped_and_reported(store, orig):
    orig.meta("odd", 0, [orig.l0], pcocc_size=1)  # a key outside the original's schema
    (orig.root / "meta" / "half@0").write_text('{"name": "half", "revis')  # the original writes in place
    assert [r.name for r in store.list()] == ["centos"]
    problems = store.repo("orig").verify()
    assert any("odd@0" in p and "unknown key" in p for p in problems) and any("half@0" in p and "JSON" in p for p in problems)
    with pytest.raises(RepositoryError, match="cannot be read"):  # their blobs would look unused
        store.repo("orig").gc()


def test_verify_finds_a_corrupt_blob_and_a_broken_chain(store, orig):
    bad = orig.layer(orig.work, "0" * 64)
    orig.meta("broken", 0, [orig.l0, bad])
    path = orig.root / "data" / orig.l1[:2] / orig.l1
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"corrupt")
    problems = store.repo("orig").verify()
    assert any("corrupt" in p and orig.l1 in p for p in problems)
    assert any("broken@0" in p and "backed by" in p for p in problems)


def test_a_blob_name_that_is_not_a_digest_is_never_used(store, orig):
    orig.meta("escape", 0, [orig.l0, "../../../../etc/passwd"])
    orig.meta("kern", 0, [orig.l0], custom={upstream.BOOT_KEY: {"kernel": "../../x", "append": ""}})
    for name in ("escape", "kern"):
        with pytest.raises(NotFoundError):
            store.find(f"orig:{name}")
    problems = store.repo("orig").verify()
    assert any("escape@0" in p and "not a sha256" in p for p in problems) and any("kern@0" in p for p in problems)


def test_a_repository_path_that_does_not_exist_stays_pcocc_s_own_layout(tmp_path):
    assert open_repository("x", str(tmp_path / "none")).layout == "pcocc"


# -- per-image templates (the original's rule: every image is a template when a resource set is the default)


def tset(store_repos, default="default", templates=None):
    return TemplateSet(templates or {}, default, store_repos)


def test_every_image_is_a_template_of_its_name_with_a_default_resource_set(orig):
    repos = [R("orig", orig.root)]
    t = tset(repos)
    assert t.names() == [] and t.names(images=True) == ["centos"]
    r = t.resolve("centos")
    assert r["image"] == "orig:centos" and r["resource-set"] == "default" and r.scope == IMAGE_SCOPE
    assert "centos" in t and "nothing" not in t
    with pytest.raises(NotFoundError):
        t.get("nothing")


def test_a_written_template_wins_and_no_default_set_means_no_image_templates(orig):
    repos = [R("orig", orig.root)]
    written = Template("centos", "user", "templates.yaml", 1, {"image": "orig:centos@0"})
    assert tset(repos, templates={"centos": written}).resolve("centos")["image"] == "orig:centos@0"
    with pytest.raises(NotFoundError) as exc:
        tset(repos, default=None).get("centos")
    assert "default: true" in exc.value.hint
    assert tset(repos, default=None).names(images=True) == []


def test_the_first_repository_holding_the_image_gives_it(orig, tmp_path):
    other = Original(tmp_path / "other")
    other.meta("centos", 0, [other.layer(orig.work)])
    t = tset([R("first", other.root), R("orig", orig.root)])
    assert t.resolve("centos")["image"] == "first:centos"


def test_an_unreadable_repository_before_the_image_says_so_rather_than_skipping_it(orig, tmp_path):
    Original(tmp_path / "old", version=1)
    t = tset([R("old", tmp_path / "old"), R("orig", orig.root)])
    with pytest.raises(RepositoryError, match="version-1"):
        t.get("centos")
    assert t.names(images=True) == []


def test_image_templates_are_looked_up_only_when_resolved(orig, monkeypatch):
    calls = []
    real = ImageStore.find_image
    monkeypatch.setattr(ImageStore, "find_image", lambda self, name: calls.append(name) or real(self, name))
    written = Template("tpl", "user", "templates.yaml", 1, {"image": "orig:centos"})
    t = tset([R("orig", orig.root)], templates={"tpl": written})
    t.resolve("tpl")
    assert t.names() == ["tpl"] and calls == []
    t.resolve("centos")
    t.resolve("centos")
    assert calls == ["centos"]


def test_cli_alloc_definition_and_template_show_of_an_image(cli, orig):
    cli.write("user/repos.yaml", f"repos:\n  - name: orig\n    path: {orig.root}\n")
    r = cli("template", "show", "centos", "--json")
    assert r.status == 0, r.stderr
    assert r.json["scope"] == IMAGE_SCOPE and {s["key"]: s["value"] for s in r.json["settings"]}["image"] == "orig:centos"
    assert cli("template", "list", "--json").json == []
    listed = cli("template", "list", "--all", "--json").json
    assert [(x["name"], x["image"]) for x in listed] == [("centos", "orig:centos")]
    r = cli("image", "list", "--json")
    assert [(x["repo"], x["name"], x["revision"]) for x in r.json] == [("orig", "centos", 1)]
    assert cli("image", "verify").status == 0
    r = cli("image", "repo", "list", "--json")
    assert r.json[0]["format"] == "pcocc-0.7" and r.json[0]["images"] == 1


def test_cli_lists_other_repositories_when_one_is_version_1(cli, orig, tmp_path):
    Original(tmp_path / "old", version=1)
    cli.write("user/repos.yaml", f"repos:\n  - name: old\n    path: {tmp_path / 'old'}\n  - name: orig\n    path: {orig.root}\n")
    r = cli("image", "list", "--json")
    assert r.status == 0 and [x["name"] for x in r.json] == ["centos"] and "pcocc image repo gc old" in r.stderr
    r = cli("image", "show", "centos")
    assert r.status == ExitStatus.ERROR and "version-1" in r.stderr and "Traceback" not in r.stderr


def test_verify_works_where_the_lock_files_cannot_be_created(store, monkeypatch):
    """A repository the user may only read (a site's shared one): no lock file of pcocc there, none creatable."""
    from pcocc.errors import PermissionDenied

    repo = store.repo("orig")

    def denied(which):
        raise PermissionDenied(f"repository '{repo.name}' is read-only for you")

    monkeypatch.setattr(repo, "_lock_fd", denied)
    assert repo.verify() == [] and repo.leftovers() == []
    with pytest.raises(PermissionDenied):
        repo.delete("centos", 1)
    assert [r.revision for r in repo.revisions("centos")] == [0, 1]
