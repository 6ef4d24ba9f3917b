"""The cluster record's VMs: each template's settings once and runs of ranks (the size grows with
the templates, not the VMs), and the one set of readers, which also read an older pcocc's
records (per-VM settings), live or in checkpoints."""

import json
from types import SimpleNamespace

import pytest

from pcocc import cluster, state
from pcocc.batch.slurm import SlurmBackend
from pcocc.cluster import VMSpec
from pcocc.errors import NotFoundError
from pcocc.lifecycle import checkpoint
from pcocc.networks import jobnet
from pcocc.store.sqlite import SqliteStore

A = {"image": "user:a", "resource-set": None, "mount-points": {}, "description": "a"}
B = {"image": "user:b", "resource-set": None, "mount-points": {"h": {"path": "/x", "type": "9p"}}}


def _vms(*parts):
    out = []
    for name, count in parts:
        out += [VMSpec(len(out) + i, name) for i in range(count)]
    return out


def _resolved():
    return {"a": SimpleNamespace(values=A), "b": SimpleNamespace(values=B)}


def _backend(tmp_path):
    ctx = SimpleNamespace(env=SimpleNamespace(user="alice"), store=SqliteStore(str(tmp_path / "s.db")),
                          config=SimpleNamespace(batch=SimpleNamespace(settings={"batch-args": []})))
    return SlurmBackend(ctx)


def _new(tmp_path, vms):
    opts = {"name": "c", "definition": "a:3,b:2,a:1", "cwd": "/"}
    return _backend(tmp_path).cluster_info(7, vms, _resolved(), opts, backend="slurm", rundir=None)


def _old(vms):
    """The record an older pcocc wrote: one entry per VM, each with its template's settings."""
    return {"jobid": 7, "name": "c", "definition": "a:3,b:2,a:1", "uuid": "u", "owner": "alice", "state": "running",
            "vms": [{"rank": v.rank, "template": v.template, "settings": _resolved()[v.template].values} for v in vms]}


def test_the_record_names_each_template_once_and_runs_of_ranks(tmp_path):
    info = _new(tmp_path, _vms(("a", 3), ("b", 2), ("a", 1)))
    assert info["templates"] == {"a": A, "b": B}
    assert info["layout"] == [["a", 3], ["b", 2], ["a", 1]]
    assert "vms" not in info
    small = len(json.dumps(_new(tmp_path, _vms(("a", 16)))))
    big = len(json.dumps(_new(tmp_path, _vms(("a", 16000)))))
    assert big - small < 64  # uuid and created differ by nothing; only the count's digits grow


@pytest.mark.parametrize("shape", ["new", "old"])
def test_readers_give_the_same_answers_for_both_shapes(tmp_path, shape):
    vms = _vms(("a", 3), ("b", 2), ("a", 1))
    info = _new(tmp_path, vms) if shape == "new" else _old(vms)
    assert cluster.vm_count(info) == 6
    assert [cluster.vm_template(info, r) for r in range(6)] == ["a", "a", "a", "b", "b", "a"]
    assert cluster.vm_settings(info, 4) == B and cluster.vm_settings(info, 5) == A
    assert cluster.vm_spec(info, 3) == {"rank": 3, "template": "b", "settings": B}
    assert cluster.settings_runs(info) == [("a", A, 0, 3), ("b", B, 3, 2), ("a", A, 5, 1)]
    for rank in (-1, 6):
        with pytest.raises(NotFoundError, match=f"VM rank {rank} is not in the cluster's record \\(6 VMs\\)"):
            cluster.vm_spec(info, rank)
    # what ckpt checks: each VM of a template with a 9p mount, by rank
    with pytest.raises(checkpoint.CheckpointError, match=r"cluster 7: vm3: it has 9p mounts \(h\).*\(and 1 more\)"):
        checkpoint.check_cluster(None, info)
    # the node's plan: no network here, every rank known, an unknown one refused
    assert jobnet.plan(None, info, [0, 5], {}, "n1").networks == {}
    with pytest.raises(Exception, match="VM rank 6 is not in the cluster's record"):
        jobnet.plan(None, info, [6], {}, "n1")


def test_a_checkpoint_manifest_is_the_same_from_either_shape(tmp_path):
    vms = _vms(("a", 2), ("b", 1))
    saved = {r: {"name": f"vm{r}", "vcpus": 1, "memory_mb": 64, "drives": []} for r in range(3)}
    manifests = []
    for shape, info in (("old", _old(vms)), ("new", {**_new(tmp_path, vms), "uuid": "u"})):
        d = tmp_path / shape
        d.mkdir()
        m = checkpoint.write_manifest(str(d), info, saved)
        manifests.append({k: v for k, v in m.items() if k != "created"})
    assert manifests[0] == manifests[1]
    assert [(v["rank"], v["template"], v["settings_digest"]) for v in manifests[1]["vms"]] == [
        (0, "a", checkpoint.settings_digest(A)), (1, "a", checkpoint.settings_digest(A)), (2, "b", checkpoint.settings_digest(B))]


@pytest.mark.parametrize("shape", ["new", "old"])
def test_a_live_record_of_either_shape_is_listed_by_job(tmp_path, shape):
    backend = _backend(tmp_path)
    vms = _vms(("a", 2), ("b", 1))
    info = _new(tmp_path, vms) if shape == "new" else _old(vms)
    prefix = state.cluster_prefix("alice", 7)
    backend.ctx.store.put(prefix + "info", info)
    backend.ctx.store.put(prefix + "vms/1", {"rank": 1, "name": "vm1", "state": "running"})
    got, states = backend.job(7)
    assert [v["state"] for v in states] == ["pending", "running", "pending"]
    assert cluster.vm_count(got) == 3


def test_per_vm_placement_of_one_host(tmp_path):
    vms = _vms(("a", 2))
    # a per-VM list next to the layout (as the local backend wrote it for a while) is read too
    info = {**_new(tmp_path, vms), "vms": [{"rank": 0}, {"rank": 1, "cores": [3], "memory_mb": 512, "pin": False}]}
    assert cluster.vm_spec(info, 1) == {"rank": 1, "template": "a", "settings": A, "cores": [3], "memory_mb": 512, "pin": False}
    # the local backend's placement of the whole cluster (batch/local.py, submit): no per-VM list
    info = _backend(tmp_path).cluster_info(7, vms, _resolved(), {"name": "c", "definition": "a:2"}, backend="local")
    assert "vms" not in info and info["layout"] == [["a", 2]]
    info = {**info, "placement": {"cores": [[0], [1]], "memory_mb": 256, "pin": True}}
    assert cluster.vm_spec(info, 1) == {"rank": 1, "template": "a", "settings": A, "cores": [1], "memory_mb": 256, "pin": True}


def test_record_vms_wants_ranks_in_order():
    with pytest.raises(ValueError):
        cluster.record_vms([VMSpec(1, "a")], _resolved())
