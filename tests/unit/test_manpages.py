"""Man pages and `pcocc help NAME` (issue 13): a command's page is its help, as in the original
(`help batch` is pcocc-batch(1)); configuration files are `help FILE.yaml` and pcocc-FILE(5)."""

import os
import subprocess

from pcocc.cli import manpages
from pcocc.cli.core import COMMANDS, HIDDEN


def test_help_of_a_command_is_its_page_and_files_are_their_own(cli):
    r = cli("help", "batch")
    assert r.status == 0 and r.stdout.startswith("Usage: pcocc batch")
    r = cli("help", "image", "list")
    assert r.status == 0 and r.stdout.startswith("Usage: pcocc image list")
    r = cli("help", "batch.yaml")
    assert r.status == 0 and "batch.yaml" in r.stdout.splitlines()[0]
    assert cli("help", "templates").stdout == cli("help", "templates.yaml").stdout  # not a command: its short name too
    for bad in (["nope"], ["internal"], ["image", "nope"]):
        r = cli("help", *bad)
        assert r.status == 4 and r.stderr.startswith("pcocc: error: no command or help topic"), r.stderr


def test_every_command_and_file_has_a_man_page_that_man_reads(tmp_path):
    written = {os.path.basename(p) for p in manpages.write(str(tmp_path))}
    for name in COMMANDS:
        if name not in HIDDEN:
            assert f"pcocc-{name}.1" in written, name
    assert {"pcocc.1", "pcocc-image-list.1", "pcocc-templates.yaml.5", "pcocc-batch.yaml.5", "pcocc-resources.yaml.5",
            "pcocc-newvm-tutorial.7", "pcocc-cloudconfig-tutorial.7", "pcocc-9pmount-tutorial.7"} <= written
    # man(1) finds them through PATH (manpath(5): <bin>/../share/man), as after scripts/setup
    bin_dir = tmp_path.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path.parent / "share").mkdir(exist_ok=True)
    os.symlink(tmp_path, tmp_path.parent / "share" / "man")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MANPAGER": "cat", "MANWIDTH": "100", "LANG": "C.UTF-8"}
    r = subprocess.run(["man", "pcocc-alloc"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "pcocc alloc [OPTIONS]" in r.stdout, r.stderr
    r = subprocess.run(["man", "5", "pcocc-templates.yaml"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "inherits" in r.stdout, r.stderr
    r = subprocess.run(["man", "pcocc-9pmount-tutorial"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mount -t 9p -o trans=virtio" in r.stdout, r.stderr


def test_the_original_s_three_tutorials_are_help_topics(cli):
    """pcocc help newvm-tutorial, as the original's pcocc(1) shows; listed by `pcocc help`."""
    listing = cli("help").stdout
    for name, words in (("newvm-tutorial", "pcocc image import"), ("cloudconfig-tutorial", "#cloud-config"),
                        ("9pmount-tutorial", "mount-points:")):
        r = cli("help", name)
        assert r.status == 0 and words in r.stdout, (name, r.stderr)
        assert f"  {name} " in listing
