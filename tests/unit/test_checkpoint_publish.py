"""Publishing a checkpoint: -F replaces only a pcocc checkpoint, atomically; the manifest is
written last and whole; nothing is lost when a write fails (no VM needed)."""

import errno
import json
import os

import pytest

from pcocc.errors import UsageError
from pcocc.lifecycle import checkpoint

INFO = {"jobid": 7, "name": "c", "definition": "tiny:1",
        "vms": [{"rank": 0, "template": "tiny", "settings": {"image": "r:tiny"}}]}


def saved(tag="new"):
    return {0: {"name": "vm0", "vcpus": 1, "memory_mb": 256, "disk": "disk-vm0.qcow2", "memory": "memory-vm0.zst",
                "compress": "zstd", "drives": [], "tag": tag}}


def write_checkpoint(tmp_path, name, tag):
    """A checkpoint as the CLI writes one: files in a staging dir, the manifest, then published."""
    directory = str(tmp_path / name)
    staging = checkpoint.staging_dir(directory)
    for f in ("disk-vm0.qcow2", "memory-vm0.zst"):
        with open(os.path.join(staging, f), "w") as fh:
            fh.write(tag)
    checkpoint.write_manifest(staging, INFO, saved(tag))
    return directory, staging


def test_a_checkpoint_is_published_whole(tmp_path):
    directory, staging = write_checkpoint(tmp_path, "ck", "one")
    checkpoint.publish(staging, directory, force=False)
    assert sorted(os.listdir(directory)) == ["ckpt.json", "disk-vm0.qcow2", "memory-vm0.zst"]
    assert checkpoint.load(directory)["vms"][0]["tag"] == "one"
    assert os.listdir(tmp_path) == ["ck"]  # no staging dir, no temporary manifest left


def test_force_replaces_a_checkpoint_and_removes_only_its_files(tmp_path):
    directory, staging = write_checkpoint(tmp_path, "ck", "one")
    checkpoint.publish(staging, directory, force=False)
    directory, staging = write_checkpoint(tmp_path, "ck", "two")
    with pytest.raises(UsageError, match="exists already"):
        checkpoint.publish(staging, directory, force=False)
    checkpoint.publish(staging, directory, force=True)
    assert checkpoint.load(directory)["vms"][0]["tag"] == "two"
    assert open(os.path.join(directory, "disk-vm0.qcow2")).read() == "two"
    assert os.listdir(tmp_path) == ["ck"]


@pytest.mark.parametrize("kind", ["plain directory", "extra file", "bad manifest", "file", "symlink"])
def test_force_never_replaces_what_is_not_only_a_checkpoint(tmp_path, kind):
    target = tmp_path / "precious"
    if kind == "plain directory":
        (target / "sub").mkdir(parents=True)
        (target / "thesis.txt").write_text("two years of work")
        (target / "sub" / "data").write_text("x")
    elif kind == "extra file":
        directory, staging = write_checkpoint(tmp_path, "precious", "one")
        checkpoint.publish(staging, directory, force=False)
        (target / "thesis.txt").write_text("two years of work")
    elif kind == "bad manifest":
        target.mkdir()
        (target / "ckpt.json").write_text(json.dumps({"format": 99}))
        (target / "thesis.txt").write_text("two years of work")
    elif kind == "file":
        target.write_text("two years of work")
    else:
        real = tmp_path / "real"
        directory, staging = write_checkpoint(tmp_path, "real", "one")
        checkpoint.publish(staging, directory, force=False)
        target.symlink_to(real)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match="-F will not replace it"):
        checkpoint.check_replaceable(str(target))
    directory, staging = write_checkpoint(tmp_path, "precious", "new")
    with pytest.raises(UsageError, match="-F will not replace it"):
        checkpoint.publish(staging, directory, force=True)  # checked again at the last moment
    checkpoint.discard_staging(staging)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_manifest_that_cannot_be_written_leaves_no_manifest(tmp_path, monkeypatch):
    directory = str(tmp_path / "ck")
    staging = checkpoint.staging_dir(directory)
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.write_manifest(staging, INFO, saved())
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert os.listdir(staging) == []  # neither a manifest nor its temporary file
    checkpoint.discard_staging(staging)
    assert os.listdir(tmp_path) == []


def test_publish_does_not_replace_a_directory_created_meanwhile(tmp_path):
    directory, staging = write_checkpoint(tmp_path, "ck", "one")
    os.mkdir(directory)  # empty: a plain rename(2) would silently replace it
    with pytest.raises(UsageError, match="exists already"):
        checkpoint.publish(staging, directory, force=False)
    assert os.listdir(directory) == []
    checkpoint._rename(staging, directory + "2", checkpoint._RENAME_NOREPLACE)
    with pytest.raises(OSError) as info:
        checkpoint._rename(directory + "2", directory, checkpoint._RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST


def test_a_restart_record_holds_the_manifest_s_digest_not_the_manifest(tmp_path):
    """At 16,000 VMs the manifest is megabytes: the cluster's record keeps DIR and the digest,
    each VM reads its entry from DIR, and a checkpoint replaced since (-F) is not restored."""
    directory, staging = write_checkpoint(tmp_path, "ck", "one")
    checkpoint.publish(staging, directory, force=False)
    manifest = checkpoint.load(directory)
    record = checkpoint.restart_record(directory, manifest)
    assert set(record) == {"dir", "manifest_sha256"} and len(json.dumps(record)) < 200
    assert checkpoint.restart_vm(record, 0) == {"dir": directory, "vm": manifest["vms"][0]}
    assert checkpoint.restart_vm({"dir": directory, "manifest": manifest}, 0)["vm"] == manifest["vms"][0]  # an older record
    with pytest.raises(checkpoint.CheckpointError, match="no VM of rank 1"):
        checkpoint.restart_vm(record, 1)
    again, staging = write_checkpoint(tmp_path, "ck", "two")
    checkpoint.publish(staging, again, force=True)
    with pytest.raises(checkpoint.CheckpointError, match="changed since this restart was submitted"):
        checkpoint.restart_vm(record, 0)
