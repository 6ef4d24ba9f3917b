"""Image repositories without qemu: revision numbers, permissions, failed writes, verify, boot data.

Layers here are qcow2 files written by pcocc.images.qcow2 itself (no qemu-img),
so that these run anywhere; tests/integration/test_image_repo.py covers the
same rules through qemu-img and the CLI.
"""

import errno
import json
import os
import stat

import pytest

from pcocc.errors import ExitStatus, NotFoundError
from pcocc.images import qcow2, repo as repo_mod
from pcocc.images.repo import HIGH_WATER, Repository, RepositoryDenied, RepositoryFull
from pcocc.images.store import ImageStore, read_boot_files

MiB = 2**20


class R:
    """Repo config entries as the config loader makes them."""

    def __init__(self, name, path, scope="user"):
        self.name, self.path, self.scope = name, str(path), scope


def base_layer(path, size=16 * MiB):
    """A standalone empty qcow2 (an overlay with its backing name removed)."""
    qcow2.create_overlay(str(path), "x", size)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\0" * 12)  # backing_file_offset, backing_file_size
    return path


def new_image(store, repo, name, boot=None, size=16 * MiB):
    """Revision 0 (or the next number) of a new image in repo, without qemu-img."""
    with repo.transaction("test") as added:
        tmp = repo.tmp_path("t")
        base_layer(tmp, size)
        sha = repo.store_blob(tmp, added)
        boot_blobs = store._store_boot(repo, boot, added)
        return repo.commit(name, [sha], size, "tester", new_image=True, boot=boot_blobs)


def grow(store, rev):
    """The next revision of rev's image: one more (empty) layer."""
    return store.add_layer(rev, lambda p: qcow2.create_overlay(p, f"../blobs/{rev.layers[-1]}", rev.size))


@pytest.fixture
def store(tmp_path):
    return ImageStore([R("user", tmp_path / "home" / ".pcocc" / "repo"), R("site", tmp_path / "site", "system")], "tester")


def clean(repo):
    return repo.verify() == [] and repo.leftovers() == []


# -- revision numbers: never reused


def test_a_deleted_revision_number_is_never_given_again(store):
    repo = store.repo("user")
    r0 = new_image(store, repo, "x")
    r1 = grow(store, r0)
    assert (r0.revision, r1.revision) == (0, 1)
    assert [r.uri for r in store.delete("user:x@1")] == ["user:x@1"]
    r2 = grow(store, r0)
    assert r2.revision == 2, "the latest revision was deleted: its number must not come back"
    with pytest.raises(NotFoundError, match="was deleted"):
        store.find("user:x@1")
    # a deleted middle revision, then the whole image, then the same name again
    grow(store, r2)
    store.delete("user:x@2")
    store.delete("user:x")
    assert store.list() == [] and repo.high_water("x") == 3
    again = new_image(store, repo, "x")
    assert again.revision == 4 and [r.revision for r in repo.revisions("x")] == [4]
    assert repo.gc()[0] >= 1 and clean(repo)
    assert repo.high_water("x") == 3, "gc keeps the mark"


def test_deleting_an_older_revision_keeps_the_mark(store):
    repo = store.repo("user")
    r0 = new_image(store, repo, "y")
    r1 = grow(store, r0)
    grow(store, r1)
    store.delete("user:y@0")
    assert repo.high_water("y") == -1  # 0 is below the latest: no mark needed
    store.delete("user:y@2")
    assert repo.high_water("y") == 2 and grow(store, r1).revision == 3


def test_delete_needs_no_new_inode(store, monkeypatch):
    """Deleting must work on a full file system: the mark is a rename, not a new file."""
    repo = store.repo("user")
    r1 = grow(store, new_image(store, repo, "z"))
    real_open = os.open

    def full(path, flags, *a, **kw):
        if flags & os.O_CREAT and not os.path.exists(path):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(repo_mod.os, "open", full)
    store.delete(r1.uri)
    monkeypatch.undo()
    assert grow(store, repo.get("z")).revision == 2


# -- permissions


def test_a_user_repository_is_private_from_its_creation(store, tmp_path):
    old = os.umask(0o022)
    try:
        repo = store.repo("user")
        rev = new_image(store, repo, "secret", boot={"kernel": str(base_layer(tmp_path / "k")), "append": "x"})
    finally:
        os.umask(old)
    for d in (tmp_path / "home" / ".pcocc", repo.path, repo._p("blobs"), repo._p("meta"), repo._p("tmp")):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    for f in [rev.top, repo.blob_path(rev.boot["kernel"]), repo._p("meta", "secret", "0.json")]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o400, f


def test_a_system_repository_keeps_the_admins_mode(store):
    repo = store.repo("site")
    os.makedirs(repo.path)
    os.chmod(repo.path, 0o750)  # the admin's choice: a group may read
    rev = new_image(store, repo, "shared")
    assert stat.S_IMODE(os.stat(repo.path).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(rev.top).st_mode) == 0o440
    os.chmod(repo.path, 0o755)
    assert stat.S_IMODE(os.stat(grow(store, rev).top).st_mode) == 0o444


def test_verify_warns_about_an_open_user_repository(cli, tmp_path):
    path = tmp_path / "open-repo"
    cli.write("user/repos.yaml", f"repos:\n  - name: u\n    path: {path}\n")
    Repository("u", str(path)).ensure()
    os.chmod(path, 0o755)
    r = cli("image", "verify")
    assert r.status == 0 and "open to other users" in r.stderr and "chmod 700" in r.stderr


# -- failed writes: one line, nothing left


@pytest.mark.parametrize("where", ["meta-file", "link", "fill", "interrupt"])
def test_a_failed_write_leaves_the_repository_as_it_was(store, monkeypatch, where):
    repo = store.repo("user")
    r0 = new_image(store, repo, "img")
    before = sorted(os.listdir(repo._p("blobs")))
    fill = lambda p: qcow2.create_overlay(p, f"../blobs/{r0.layers[-1]}", r0.size)  # noqa: E731
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if where == "meta-file":
        monkeypatch.setattr(Repository, "_write_file", lambda *a: (_ for _ in ()).throw(enospc))
    elif where == "link":
        monkeypatch.setattr(repo_mod.os, "link", lambda *a: (_ for _ in ()).throw(enospc))
    elif where == "fill":
        def fill(p):  # noqa: F811 - qemu-img would write half a layer, then fail
            qcow2.create_overlay(p, f"../blobs/{r0.layers[-1]}", r0.size)
            raise enospc
    else:
        def fill(p):  # noqa: F811
            qcow2.create_overlay(p, f"../blobs/{r0.layers[-1]}", r0.size)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt if where == "interrupt" else RepositoryFull) as exc:
        store.add_layer(r0, fill)
    if where != "interrupt":
        assert exc.value.status == ExitStatus.RESOURCES
        assert "\n" not in exc.value.message and "no space left" in exc.value.message and repo.name in exc.value.message
    monkeypatch.undo()
    assert [r.revision for r in repo.revisions("img")] == [0]
    assert sorted(os.listdir(repo._p("blobs"))) == before, "the new blob is removed"
    assert os.listdir(repo._p("tmp")) == []
    assert clean(repo) and repo.gc() == (0, 0)


def test_a_failed_first_revision_leaves_no_image_directory(store, monkeypatch):
    repo = store.repo("user")
    repo.ensure()
    monkeypatch.setattr(repo_mod.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(RepositoryFull, match="disk quota exceeded"):
        new_image(store, repo, "fresh")
    monkeypatch.undo()
    assert os.listdir(repo._p("meta")) == [] and os.listdir(repo._p("blobs")) == []
    assert clean(repo)


def test_a_read_only_file_system_is_a_permission_error(store, monkeypatch):
    repo = store.repo("user")
    r0 = new_image(store, repo, "ro")
    monkeypatch.setattr(repo_mod.os, "rename", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(RepositoryDenied, match="read-only file system") as exc:
        store.delete(r0.uri)
    assert exc.value.status == ExitStatus.PERMISSION
    monkeypatch.undo()
    assert repo.get("ro").revision == 0


def test_a_blob_removed_before_the_commit_is_refused(store):
    repo = store.repo("user")
    r0 = new_image(store, repo, "g")
    with pytest.raises(repo_mod.RepositoryError, match="vanished"):
        repo.commit("g", r0.layers + ("0" * 64,), r0.size, "tester")
    assert [r.revision for r in repo.revisions("g")] == [0]


def test_the_blob_of_a_failed_write_stays_if_another_write_uses_it(store, monkeypatch):
    """_discard never removes a blob a revision uses (here: the same content stored twice)."""
    repo = store.repo("user")
    r0 = new_image(store, repo, "a")
    with pytest.raises(RuntimeError):
        with repo.transaction("test") as added:
            added.append(r0.layers[0])  # as if this write had stored it
            raise RuntimeError("boom")
    assert os.path.exists(r0.top) and clean(repo)


# -- verify


def test_verify_skips_revisions_deleted_while_it_reads(store, monkeypatch):
    repo = store.repo("user")
    r0 = new_image(store, repo, "v")
    grow(store, grow(store, r0))
    real = Repository._load_meta

    def load(self, path):
        if path.endswith("/v/0.json"):  # another process deletes @1 and @2 meanwhile
            for n in (1, 2):
                os.unlink(repo._p("meta", "v", f"{n}.json"))
        return real(self, path)

    monkeypatch.setattr(Repository, "_load_meta", load)
    assert repo.verify() == []


def test_verify_reports_missing_and_corrupt_blobs_and_gc_agrees(store):
    repo = store.repo("user")
    r1 = grow(store, new_image(store, repo, "w"))
    os.chmod(repo._p("blobs"), 0o700)
    os.unlink(r1.top)
    problems = repo.verify()
    assert len(problems) == 1 and "missing blob" in problems[0]
    assert repo.leftovers() == []  # nothing unused: gc has nothing to do either
    assert repo.gc() == (0, 0)


def test_leftovers_are_what_gc_removes(store):
    repo = store.repo("user")
    r0 = new_image(store, repo, "l")
    store.delete(r0.uri)
    open(repo.tmp_path("stale"), "w").close()
    os.mkdir(repo._p("meta", "empty"))
    left = repo.leftovers()
    assert len(left) == 3 and any(x.startswith("blobs/") for x in left) and "meta/empty/" in left
    assert repo.gc()[0] == 3 and repo.leftovers() == [] and repo.verify() == []


# -- boot data


def test_boot_problem_names_what_is_missing(store, tmp_path):
    repo = store.repo("user")
    plain = new_image(store, repo, "plain")
    assert "cannot boot" in plain.boot_problem() and "\n" not in plain.boot_problem()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel" * 100)
    booting = new_image(store, repo, "booting", boot={"kernel": str(kernel), "append": "console=ttyS0"})
    assert booting.boot_problem() is None
    assert booting.boot_files() == (repo.blob_path(booting.boot["kernel"]), None, "console=ttyS0")
    os.chmod(repo._p("blobs"), 0o700)
    os.unlink(repo.blob_path(booting.boot["kernel"]))
    assert "kernel" in booting.boot_problem() and "missing" in booting.boot_problem()
    with pytest.raises(repo_mod.RepositoryError, match="missing"):
        booting.boot_files()


def _mbr(code):
    sector = bytearray(512)
    sector[:len(code)] = code
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_boot_sector_read_through_a_layer_chain(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(_mbr(b"\xeb\x63\x90") + b"\0" * (MiB - 512))
    top = tmp_path / "top.qcow2"
    qcow2.create_overlay(str(top), "base.raw", MiB, backing_format="raw")
    assert qcow2.read_guest(str(top), 0, 512) == raw.read_bytes()[:512]
    assert qcow2.has_boot_code(str(top)) is True
    raw.write_bytes(_mbr(b"") + b"\0" * (MiB - 512))  # a partition table without boot code
    assert qcow2.has_boot_code(str(top)) is False
    assert qcow2.has_boot_code(str(base_layer(tmp_path / "empty.qcow2"))) is False
    with pytest.raises(ValueError):
        qcow2.read_guest(str(raw), 0, 512)


# -- the boot files beside an exported disk


def _exported(tmp_path, **over):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"disk")
    (tmp_path / "d.qcow2.kernel").write_bytes(b"K")
    (tmp_path / "d.qcow2.initrd").write_bytes(b"I")
    manifest = {"format": 1, "kernel": "d.qcow2.kernel", "initrd": "d.qcow2.initrd", "append": "root=/dev/vda",
                "sha256": {"kernel": repo_mod.sha256_file(tmp_path / "d.qcow2.kernel")}}
    manifest.update(over)
    (tmp_path / "d.qcow2.boot.json").write_text(json.dumps(manifest))
    return str(disk)


def test_boot_files_beside_a_disk_are_read_back(tmp_path):
    disk = _exported(tmp_path)
    assert read_boot_files(disk) == {"kernel": str(tmp_path / "d.qcow2.kernel"), "initrd": str(tmp_path / "d.qcow2.initrd"), "append": "root=/dev/vda"}
    assert read_boot_files(str(tmp_path / "other.qcow2")) is None


@pytest.mark.parametrize("over, text", [
    ({"kernel": "../../etc/shadow"}, "beside the disk"),
    ({"kernel": "/boot/vmlinuz"}, "beside the disk"),
    ({"kernel": "missing"}, "No such file"),
    ({"format": 7}, "not a pcocc boot manifest"),
    ({"append": ["x"]}, "'append' must be a string"),
    ({"sha256": {"kernel": "0" * 64}}, "does not match its sha256"),
])
def test_bad_boot_files_are_one_line_errors(tmp_path, over, text):
    disk = _exported(tmp_path, **over)
    with pytest.raises(repo_mod.UsageError) as exc:
        read_boot_files(disk)
    assert text in exc.value.message and "\n" not in exc.value.message


def test_a_fifo_as_boot_file_is_refused_without_blocking(tmp_path):
    disk = _exported(tmp_path)
    os.unlink(tmp_path / "d.qcow2.initrd")
    os.mkfifo(tmp_path / "d.qcow2.initrd")
    with pytest.raises(repo_mod.UsageError, match="not a regular file"):
        read_boot_files(disk)


def test_an_unreadable_repository_is_one_line(store, monkeypatch):
    repo = store.repo("user")
    new_image(store, repo, "u")
    real = os.listdir
    monkeypatch.setattr(repo_mod.os, "listdir", lambda p: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied", p)) if p.endswith("meta") else real(p))
    with pytest.raises(RepositoryDenied, match="permission denied .*meta.* while listing its images"):
        store.list()


def test_export_to_a_place_it_cannot_write_is_one_line(store, tmp_path, monkeypatch):
    from pcocc.images import store as store_mod
    from pcocc.errors import PermissionDenied

    repo = store.repo("user")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    new_image(store, repo, "e", boot={"kernel": str(kernel), "append": ""})
    monkeypatch.setattr(store_mod.shutil, "copyfile", lambda a, b: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", b)))
    with pytest.raises(PermissionDenied, match="cannot write .*out.qcow2.kernel.part: permission denied"):
        store.export("user:e", str(tmp_path / "out.qcow2"))
    assert list(tmp_path.glob("out*")) == []


def test_a_save_refused_just_before_its_commit_publishes_nothing(store):
    """before_commit (the VM side: is the client of `pcocc save` still there?) aborts the save."""
    rev = new_image(store, store.target("user:img")[0], "img")

    class Left(Exception):
        pass

    def fill(path, backing):
        qcow2.create_overlay(path, backing, rev.size)

    def gone():
        raise Left()

    with pytest.raises(Left):
        store.save_layer(rev, fill, before_commit=gone)
    repo = rev.repo
    assert [r.revision for r in repo.revisions("img")] == [rev.revision]
    assert clean(repo)
    new = store.save_layer(rev, fill, before_commit=lambda: None)
    assert new.revision == rev.revision + 1


def test_a_recipe_edited_after_it_was_loaded_keeps_the_key_of_what_was_loaded(tmp_path):
    """The image cache key is of the recipe files as loaded: an edit during a build (a long
    debootstrap) must not file the image of the former text under the new text's key."""
    import shutil

    from pcocc.images import build

    recipe_dir = tmp_path / "tiny"
    shutil.copytree(build.RECIPES_DIR / "tiny", recipe_dir)
    loaded = build.load_recipe(str(recipe_dir))
    before = build.build_key(loaded, "linux-image-x", "1")
    (recipe_dir / "recipe.yaml").write_text((recipe_dir / "recipe.yaml").read_text().replace("9pnet_virtio", "9pnet_virtio, fuse"))
    assert build.build_key(loaded, "linux-image-x", "1") == before
    assert build.build_key(build.load_recipe(str(recipe_dir)), "linux-image-x", "1") != before
    assert build.recipe_digest(recipe_dir) != loaded.digest  # what the check after a build sees
