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
