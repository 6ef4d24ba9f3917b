"""Image repositories on real qemu-img: import, revisions, export, copy, delete, gc, verify, crash safety."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcocc.errors import ExitStatus
from pcocc.images import qcow2

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed (scripts/setup installs it)")

SRC = Path(__file__).resolve().parents[2] / "src"


def qemu_io(path, *cmds, fmt="raw"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


@pytest.fixture
def repos(cli):
    cli.write("user/repos.yaml", f"repos:\n  - name: user\n    path: {cli.root}/repo-user\n  - name: shared\n    path: {cli.root}/repo-shared\n")
    return cli


@pytest.fixture
def raw_image(tmp_path):
    path = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "64M"], check=True)
    qemu_io(path, "write -P 0x5a 0 1M", "write -P 0xa5 32M 512k")
    return path


def test_import_list_show(repos, raw_image, tmp_path):
    r = repos("image", "import", raw_image, "alpha")
    assert r.status == 0, r.stderr
    q = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw_image), str(q)], check=True)
    assert repos("image", "import", q, "shared:beta").status == 0
    r = repos("image", "list", "--json")
    got = {(i["repo"], i["name"], i["revision"]) for i in r.json}
    assert got == {("user", "alpha", 0), ("shared", "beta", 0)}
    r = repos("image", "show", "alpha", "--json")
    assert r.json["size"] == 64 * 2**20 and r.json["owner"] == "tester" and len(r.json["layers"]) == 1
    assert repos("image", "list", "-R", "shared", "--json").json[0]["name"] == "beta"
    assert [i["name"] for i in repos("image", "list", "--json", "^al").json] == ["alpha"]


def test_import_refuses_existing_name_and_bad_input(repos, raw_image, tmp_path):
    assert repos("image", "import", raw_image, "alpha").status == 0
    r = repos("image", "import", raw_image, "alpha")
    assert r.status == ExitStatus.USAGE and "already exists" in r.stderr
    r = repos("image", "import", tmp_path / "missing.raw", "gamma")
    assert r.status == ExitStatus.NOT_FOUND
    r = repos("image", "import", "-t", "floppy", raw_image, "gamma")
    assert r.status == ExitStatus.USAGE and "unknown image format" in r.stderr
    r = repos("image", "import", raw_image, "bad/name")
    assert r.status == ExitStatus.USAGE and "invalid image name" in r.stderr


def test_revisions_resize_and_export_roundtrip(repos, raw_image, tmp_path):
    assert repos("image", "import", raw_image, "alpha").status == 0
    r = repos("image", "resize", "alpha", "128M")
    assert r.status == 0, r.stderr
    show = repos("image", "show", "alpha", "--json").json
    assert show["revision"] == 1 and len(show["layers"]) == 2 and show["size"] == 128 * 2**20
    assert [x["revision"] for x in show["revisions"]] == [0, 1]
    # revision 0 is still there, unchanged
    assert repos("image", "show", "alpha@0", "--json").json["size"] == 64 * 2**20
    out = tmp_path / "out.raw"
    r = repos("image", "export", "alpha@0", out)
    assert r.status == 0, r.stderr
    assert out.read_bytes() == raw_image.read_bytes()
    out1 = tmp_path / "out1.raw"
    assert repos("image", "export", "alpha", out1).status == 0
    assert out1.stat().st_size == 128 * 2**20
    assert out1.read_bytes()[: 64 * 2**20] == raw_image.read_bytes()
    r = repos("image", "resize", "alpha", "1M")
    assert r.status == ExitStatus.USAGE and "cannot shrink" in r.stderr
    # the layer chain is relative: the repository still works after a move
    shutil.move(repos.root / "repo-user", repos.root / "moved")
    repos.write("user/repos.yaml", f"repos:\n  - name: user\n    path: {repos.root}/moved\n")
    out2 = tmp_path / "out2.raw"
    assert repos("image", "export", "alpha", out2).status == 0
    assert out2.read_bytes() == out1.read_bytes()


def test_copy_delete_gc(repos, raw_image):
    assert repos("image", "import", raw_image, "alpha").status == 0
    assert repos("image", "resize", "alpha", "80M").status == 0
    r = repos("image", "copy", "alpha", "shared:alpha2")
    assert r.status == 0, r.stderr
    copied = repos("image", "show", "shared:alpha2", "--json").json
    assert copied["revision"] == 0 and len(copied["layers"]) == 2 and copied["size"] == 80 * 2**20
    assert repos("image", "delete", "alpha@0").status == 0
    assert [x["revision"] for x in repos("image", "show", "alpha", "--json").json["revisions"]] == [1]
    assert repos("image", "delete", "user:alpha").status == 0
    assert repos("image", "show", "user:alpha").status == ExitStatus.NOT_FOUND
    blobs = repos.root / "repo-user" / "blobs"
    assert len(list(blobs.iterdir())) == 2
    assert repos("image", "repo", "gc", "user").status == 0
    assert list(blobs.iterdir()) == []
    assert repos("image", "verify").status == 0
    # the copy does not depend on the deleted original
    assert repos("image", "export", "shared:alpha2", repos.root / "x.qcow2").status == 0


def test_verify_finds_corruption(repos, raw_image):
    assert repos("image", "import", raw_image, "alpha").status == 0
    assert repos("image", "verify").status == 0
    blob = next((repos.root / "repo-user" / "blobs").iterdir())
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(100000)
        f.write(b"corrupt")
    r = repos("image", "verify", "--json")
    assert r.status != 0
    assert any("corrupt" in p for p in r.json["problems"])


def _cli_proc(cli, *argv):
    env = dict(cli.environ, PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, "-m", "pcocc", *map(str, argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_import_leaves_nothing_partial(repos, tmp_path):
    big = tmp_path / "big.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(big), "512M"], check=True)
    qemu_io(big, *[f"write -P {i} {i * 8}M 4M" for i in range(1, 60)])
    for delay in (0.05, 0.2, 0.4, 0.8):
        proc = _cli_proc(repos, "image", "import", big, f"img{int(delay * 100)}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = repos("image", "verify")
        assert r.status == 0, r.stdout + r.stderr
        listed = repos("image", "list", "--json").json
        for img in listed:  # whatever is visible is complete
            assert repos("image", "export", img["name"], tmp_path / f"{img['name']}.raw").status == 0
    assert repos("image", "repo", "gc").status == 0
    assert list((repos.root / "repo-user" / "tmp").iterdir()) == []


def test_concurrent_imports_of_one_name(repos, raw_image):
    procs = [_cli_proc(repos, "image", "import", raw_image, "same") for _ in range(2)]
    results = [(p.wait(), p.communicate()[1]) for p in procs]
    statuses = sorted(rc for rc, _ in results)
    assert statuses == [0, ExitStatus.USAGE], results
    assert "already exists" in [err for rc, err in results if rc][0]
    assert [i["revision"] for i in repos("image", "list", "--json").json] == [0]
    assert repos("image", "verify").status == 0


def test_overlay_is_a_valid_qcow2_on_the_top_layer(repos, raw_image, tmp_path):
    from pcocc.images.store import ImageStore, create_overlay

    assert repos("image", "import", raw_image, "alpha").status == 0
    assert repos("image", "resize", "alpha", "96M").status == 0
    from pcocc.config.loader import load_config

    store = ImageStore(load_config(repos.env()).repos, "tester")
    rev = store.find("alpha")
    ov = tmp_path / "vm0.qcow2"
    create_overlay(rev, str(ov))
    assert qcow2.read_header(ov) == (96 * 2**20, os.path.abspath(rev.top))
    subprocess.run(["qemu-img", "check", str(ov)], check=True, capture_output=True)
    qemu_io(ov, "read -P 0x5a 0 1M", "write -P 0x11 2M 1M", "read -P 0x11 2M 1M", fmt="qcow2")
    # writes go to the overlay, never to the repository
    assert repos("image", "verify").status == 0


# -- export/import keep what an image boots with (repro 01)


def _boot_image(repos, raw_image, tmp_path, name="booting"):
    """An image that boots its own kernel, as `image build` makes them (fake kernel and initrd files)."""
    from pcocc.config.loader import load_config
    from pcocc.images.store import ImageStore

    (tmp_path / "vmlinuz").write_bytes(os.urandom(4096))
    (tmp_path / "initrd.img").write_bytes(os.urandom(2048))
    store = ImageStore(load_config(repos.env()).repos, "tester")
    boot = {"kernel": str(tmp_path / "vmlinuz"), "initrd": str(tmp_path / "initrd.img"), "append": "root=/dev/vda console=ttyS0"}
    return store.import_(str(raw_image), name, "raw", boot=boot)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_export_writes_the_boot_files_and_import_reads_them_back(repos, raw_image, tmp_path, fmt):
    orig = _boot_image(repos, raw_image, tmp_path)
    out = tmp_path / f"out.{fmt}"
    r = repos("image", "export", "-t", fmt, "booting", out)
    assert r.status == 0, r.stderr
    assert subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True, text=True, check=True).stdout.count(f'"format": "{fmt}"') == 1
    assert sorted(p.name for p in tmp_path.glob("out.*")) == [f"out.{fmt}", f"out.{fmt}.boot.json", f"out.{fmt}.initrd", f"out.{fmt}.kernel"]
    assert (tmp_path / f"out.{fmt}.kernel").read_bytes() == (tmp_path / "vmlinuz").read_bytes()
    r = repos("image", "import", out, "back")
    assert r.status == 0 and "with its boot files" in r.stderr, r.stderr
    back = repos("image", "show", "back", "--json").json
    assert back["boot"] == orig.boot
    # an export that would overwrite any of its files is refused, and writes nothing
    (tmp_path / f"again.{fmt}.kernel").write_bytes(b"mine")
    r = repos("image", "export", "-t", fmt, "booting", tmp_path / f"again.{fmt}")
    assert r.status == ExitStatus.USAGE and "already exists" in r.stderr
    assert [p.name for p in tmp_path.glob("again.*")] == [f"again.{fmt}.kernel"]
    # --no-boot-files: the disk only (and a warning that it cannot boot by itself)
    r = repos("image", "import", "--no-boot-files", out, "diskonly")
    assert r.status == 0 and "cannot boot" in r.stderr
    assert repos("image", "show", "diskonly", "--json").json["boot"] == {}


def test_import_refuses_tampered_boot_files_and_leaves_nothing(repos, raw_image, tmp_path):
    _boot_image(repos, raw_image, tmp_path)
    out = tmp_path / "out.qcow2"
    assert repos("image", "export", "booting", out).status == 0
    (tmp_path / "out.qcow2.kernel").write_bytes(b"not the kernel")
    r = repos("image", "import", out, "back")
    assert r.status == ExitStatus.USAGE and "does not match its sha256" in r.stderr and len(r.stderr.splitlines()) == 2
    assert repos("image", "show", "back").status == ExitStatus.NOT_FOUND
    r = repos("image", "verify", "--json")
    assert r.status == 0 and r.json["leftovers"] == []


def test_an_interrupted_export_leaves_no_file(repos, raw_image, tmp_path, monkeypatch):
    from pcocc.images import qemuimg

    _boot_image(repos, raw_image, tmp_path)

    def fails(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(qemuimg, "convert", fails)
    r = repos("image", "export", "booting", tmp_path / "out.qcow2")
    assert r.status == ExitStatus.INTERRUPTED
    assert list(tmp_path.glob("out.*")) == []


# -- a full file system (repro r17): one line, and a clean repository


@pytest.fixture
def full_fs(tmp_path):
    """A small tmpfs with few inodes (root only: mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,nr_inodes=12", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_out_of_inodes_and_space_is_one_line_and_leaves_the_repository_clean(cli, full_fs, tmp_path):
    cli.write("user/repos.yaml", f"repos:\n  - name: f\n    path: {full_fs}/repo\n")
    small = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(small), "16M"], check=True)
    outcomes = []
    for i in range(6):  # until the inodes run out
        r = cli("image", "import", small, f"x{i}")
        outcomes.append(r.status)
        if r.status:
            assert r.status == ExitStatus.RESOURCES, r.stderr
            assert "internal error" not in r.stderr and "no space left" in r.stderr
            assert len(r.stderr.splitlines()) == 2  # the error and its hint
            break
    assert outcomes[-1] == ExitStatus.RESOURCES, outcomes
    v = cli("image", "verify", "--json")
    assert v.status == 0 and v.json["problems"] == [] and v.json["leftovers"] == [], v.json
    assert not [d for d in (full_fs / "repo" / "meta").iterdir() if not any(d.iterdir())]
    # deleting works on the full file system, and keeps the numbers
    assert cli("image", "delete", "x0").status == 0
    assert cli("image", "repo", "gc").status == 0
    # the disk itself too large for the space left: qemu-img's failure is the same one line
    big = tmp_path / "big.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(big), "64M"], check=True)
    qemu_io(big, "write -P 0x33 0 60M")
    r = cli("image", "import", big, "big")
    assert r.status == ExitStatus.RESOURCES and "no space left" in r.stderr, r.stderr
    v = cli("image", "verify", "--json")
    assert v.status == 0 and v.json["leftovers"] == [], v.json


@pytest.mark.integration
def test_an_exported_built_image_boots_again_after_import(site):
    """Repro 01: export (-t qcow2) then import of a built image, and a VM of the copy runs and answers."""
    out = site.root / "tiny.qcow2"
    site.pcocc("image", "export", "-t", "qcow2", "user:tiny", out, check=True)
    site.pcocc("image", "import", "-t", "qcow2", out, "user:tiny-back", check=True)
    site.write(".pcocc/templates.yaml", "back:\n  image: user:tiny-back\n")
    r = site.pcocc("batch", "-m", "256", "--wait", "back:1", timeout=300)
    assert r.returncode == 0, r.stderr
    r = site.pcocc("exec", "hostname", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "vm0", r.stderr


def test_boot_sector_detection_on_qemu_img_files(tmp_path):
    raw = tmp_path / "mbr.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "8M"], check=True)
    with open(raw, "r+b") as f:
        f.write(b"\xeb\x63\x90" + b"\x11" * 200)
        f.seek(510)
        f.write(b"\x55\xaa")
    plain, packed = tmp_path / "plain.qcow2", tmp_path / "packed.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(plain)], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(packed)], check=True)
    assert qcow2.read_guest(str(plain), 0, 512) == raw.read_bytes()[:512]
    assert qcow2.has_boot_code(str(plain)) is True
    assert qcow2.has_boot_code(str(packed)) is None  # compressed: cannot tell, so no false alarm
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "plain.qcow2", str(top)], check=True)
    qemu_io(top, "write -P 0 0 512", fmt="qcow2")  # the top layer wipes the boot sector
    assert qcow2.has_boot_code(str(top)) is False
    assert qcow2.read_guest(str(top), 4096, 512) == raw.read_bytes()[4096:4608]  # the rest still from below
