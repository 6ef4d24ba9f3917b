"""The history of ended clusters (pcocc.history) and `pcocc history`, without VMs."""

import json
import time
from types import SimpleNamespace

import pytest

from pcocc import history, state
from pcocc.errors import ExitStatus
from pcocc.store.sqlite import SqliteStore


def _info(jobid, **kw):
    return {"jobid": jobid, "uuid": "u" * 32, "name": "vc", "owner": "alice", "definition": "tiny:2", "backend": "local",
            "host": "h1", "created": 1000.0, "started": 1001.0, "vms": [{"rank": 0}, {"rank": 1}], **kw}


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "s.db"))
    yield s
    s.close()


def test_a_record_has_the_end_state_reason_per_vm_and_times():
    vms = [{"rank": 1, "name": "vm1", "state": "failed", "error": "qemu died", "host": "h1"}, {"rank": 0, "name": "vm0", "state": "stopped"}]
    r = history.make_record(_info(4), vms, history.FAILED, "vm1 failed: qemu died", exit_code=None, ended=1010.0)
    assert r["jobid"] == 4 and r["state"] == "FAILED" and r["error"] == r["reason"] == "vm1 failed: qemu died"
    assert [v["name"] for v in r["vms"]] == ["vm0", "vm1"] and r["vms"][1]["error"] == "qemu died"
    assert (r["submitted"], r["started"], r["ended"]) == (1000.0, 1001.0, 1010.0)
    assert history.make_record(_info(4), [], history.COMPLETED, "every VM stopped")["error"] is None
    assert [v["state"] for v in history.make_record(_info(4), [], history.COMPLETED)["vms"]] == ["pending", "pending"]
    with pytest.raises(ValueError):
        history.make_record(_info(4), [], "DONE")


def test_records_live_apart_from_clusters_and_are_listed_by_end(store):
    store.put(state.cluster_prefix("alice", 9) + "info", _info(9))
    for jobid, ended in ((3, 300.0), (1, 100.0), (2, 200.0)):
        history.record(store, "alice", history.make_record(_info(jobid), [], history.COMPLETED, ended=time.time() - 1000 + ended))
    assert [r["jobid"] for r in history.list_records(store, "alice")] == [1, 2, 3]
    assert store.range(state.clusters_prefix("alice")).keys() == {state.cluster_prefix("alice", 9) + "info"}
    assert history.list_records(store, "bob") == []
    assert [r["jobid"] for r in history.list_records(store, "alice", jobids=[2, 3])] == [2, 3]
    assert [r["jobid"] for r in history.list_records(store, "alice", since=time.time() - 750)] == [3]


def test_pruning_at_write_drops_old_records_then_the_oldest_beyond_the_limit(store, monkeypatch):
    now = time.time()
    history.record(store, "alice", history.make_record(_info(1), [], history.COMPLETED, ended=now - history.MAX_AGE - 5))
    history.record(store, "alice", history.make_record(_info(2), [], history.COMPLETED, ended=now - 10))
    assert [r["jobid"] for r in history.list_records(store, "alice")] == [2]  # 1 was older than 7 days
    monkeypatch.setattr(history, "MAX_ENTRIES", 3)
    for jobid in range(3, 7):
        history.record(store, "alice", history.make_record(_info(jobid), [], history.COMPLETED, ended=now - 10 + jobid))
    assert history.prune(store, "alice", max_entries=3) == 0  # pruned at each write already
    assert [r["jobid"] for r in history.list_records(store, "alice")] == [4, 5, 6]


def test_record_cluster_reads_the_live_records_before_they_go(store):
    prefix = state.cluster_prefix("alice", 7)
    store.put(prefix + "info", _info(7))
    store.put(prefix + "vms/0", {"rank": 0, "name": "vm0", "state": "running", "host": "n1"})
    r = history.record_cluster(store, "alice", 7, history.CANCELLED, "cancelled by alice")
    assert r["vms"][0] == {"name": "vm0", "host": "n1", "state": "running", "error": None}
    assert r["vms"][1]["state"] == "pending" and history.get(store, "alice", 7)["reason"] == "cancelled by alice"


# ---- the local backend records every end

def _local(tmp_path, monkeypatch):
    from pcocc.batch.local import LocalBackend

    settings = {"cpu-overcommit": 2, "reservation-dir": str(tmp_path)}
    ctx = SimpleNamespace(env=SimpleNamespace(user="alice"), store=SqliteStore(str(tmp_path / "s.db")),
                          config=SimpleNamespace(batch=SimpleNamespace(settings=settings)))
    backend = LocalBackend(ctx)
    monkeypatch.setattr(backend, "_undo_setup", lambda jobid: None)
    return backend


@pytest.mark.parametrize("case", ["completed", "vm-failed", "cancel-request", "reclaim", "reclaim-after-end", "script"])
def test_the_local_backend_records_each_end(tmp_path, monkeypatch, case):
    backend = _local(tmp_path, monkeypatch)
    store, prefix = backend.ctx.store, state.cluster_prefix("alice", 3)
    info = _info(3, rundir=str(tmp_path / "job_3"), cwd=str(tmp_path), script="/s.sh" if case == "script" else None)
    if case == "cancel-request":
        info["end_request"] = {"state": "COMPLETED", "reason": "the allocation's shell exited with status 0", "exit_code": 0}
    store.put(prefix + "info", info)
    store.put(prefix + "vms/0", {"rank": 0, "name": "vm0", "state": "failed" if case == "vm-failed" else "stopped", "error": "boom"})
    if case == "reclaim-after-end":  # the supervisor decided its end (kept by _stop_vms), then died cleaning
        info.update(state="ending", end={"state": "FAILED", "reason": "the batch script exited with status 3", "exit_code": 3})
        store.put(prefix + "info", info)
    if case.startswith("reclaim"):
        backend._reclaim(3, info)
    elif case == "script":
        (tmp_path / "pcocc_3.out").write_text("hello\n")
        backend._cleanup(3, info["rundir"], reason="the batch script exited with status 3", end_state=history.FAILED, exit_code=3)
    else:
        backend._cleanup(3, info["rundir"], reason="every VM stopped" if case != "cancel-request" else None,
                         end_state=history.CANCELLED if case == "cancel-request" else history.COMPLETED)
    r = history.get(store, "alice", 3)
    expected = {"completed": ("COMPLETED", "every VM stopped"), "vm-failed": ("FAILED", "vm0 failed: boom"),
                "cancel-request": ("COMPLETED", "the allocation's shell exited with status 0"),
                "reclaim": ("FAILED", "its supervisor (or the process submitting it) ended without cleaning up"),
                "reclaim-after-end": ("FAILED", "the batch script exited with status 3"),
                "script": ("FAILED", "the batch script exited with status 3")}[case]
    assert (r["state"], r["reason"]) == expected
    assert store.range(prefix) == {}
    assert backend.ended(3)["jobid"] == 3  # what batch --wait reads
    if case == "reclaim-after-end":
        assert r["exit_code"] == 3
    if case == "script":  # the output file keeps the script's output, then the end
        assert (tmp_path / "pcocc_3.out").read_text() == "hello\npcocc: cluster 3 ended: FAILED (the batch script exited with status 3)\n"
        assert r["exit_code"] == 3
    else:
        assert not (tmp_path / "pcocc_3.out").exists()


def test_the_end_line_is_never_written_through_a_link(tmp_path, monkeypatch):
    backend = _local(tmp_path, monkeypatch)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "pcocc_3.out").symlink_to(victim)
    backend.ctx.store.put(state.cluster_prefix("alice", 3) + "info", _info(3, cwd=str(tmp_path), script="/s.sh"))
    backend._cleanup(3, None, end_state=history.CANCELLED, reason="cancelled by alice")
    assert victim.read_text() == "keep\n" and history.get(backend.ctx.store, "alice", 3)["state"] == "CANCELLED"


def test_the_end_state_of_a_supervisor_loop():
    from pcocc.batch.local import _end_of

    script = SimpleNamespace(done=True, error=None, code=0, status=0)
    assert _end_of([], script, {1: 0}) == ("COMPLETED", "the batch script exited with status 0", 0)
    assert _end_of([], SimpleNamespace(done=True, error=None, code=2, status=2), {})[0] == "FAILED"
    assert _end_of([], SimpleNamespace(done=True, error=None, code=None, status=1), {})[0] == "FAILED"
    assert _end_of([15], None, {1: 0})[:2] == ("CANCELLED", "its supervisor got SIGTERM")
    assert _end_of([], None, {}) == ("COMPLETED", "every VM stopped", None)


# ---- the command

@pytest.fixture
def site(cli, tmp_path):
    cli.write("etc/batch.yaml", f"type: local\nsettings: {{store: sqlite, store-path: {tmp_path}/state.db}}\n")
    cli.write("user/templates.yaml", "tiny:\n  image: r:tiny\n")
    s = SqliteStore(str(tmp_path / "state.db"))
    now = time.time()
    vms = [{"rank": 0, "name": "vm0", "state": "failed", "error": "qemu: no image", "host": "h1"}]
    history.record(s, "tester", history.make_record(_info(1, owner="tester", name="first"), vms, history.FAILED, "vm0 failed: qemu: no image", ended=now - 7200))
    history.record(s, "tester", history.make_record(_info(2, owner="tester", name="second"), [], history.COMPLETED, "every VM stopped", exit_code=0, ended=now - 60))
    s.close()
    return cli


def test_history_lists_ended_clusters_like_sacct(site):
    r = site("history")
    assert r.status == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["JOBID", "NAME", "DEFINITION", "STATE", "EXITCODE"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:4] == ["1", "first", "tiny:2", "FAILED"] and "vm0 failed: qemu: no image" in lines[2]
    assert lines[3].split()[:5] == ["2", "second", "tiny:2", "COMPLETED", "0"]
    assert site("ps", "--json").json == []  # ended clusters are never in ps


def test_history_json_filters_and_format(site):
    r = site("history", "--json", "-j", "2")
    assert r.status == 0 and [x["jobid"] for x in r.json] == [2] and r.json[0]["state"] == "COMPLETED"
    assert [x["jobid"] for x in site("history", "--json", "-j", "1,2").json] == [1, 2]
    assert [x["jobid"] for x in site("history", "--json", "-S", "now-1h").json] == [2]
    assert [x["jobid"] for x in site("history", "--json", "-s", "failed").json] == [1]
    assert [x["jobid"] for x in site("history", "--json", "--name", "second").json] == [2]
    r = site("history", "-n", "-o", "jobid,state")
    assert r.stdout.split() == ["1", "FAILED", "2", "COMPLETED"]
    r = site("history", "-l", "-j", "1")
    assert "1/vm0: h1 failed: qemu: no image" in r.stdout
    keys = set(json.loads(site("history", "--json").stdout)[0])
    assert {"jobid", "name", "definition", "state", "reason", "exit_code", "vms", "submitted", "started", "ended"} <= keys


@pytest.mark.parametrize("argv,status", [
    (("history", "-j", "99"), ExitStatus.NOT_FOUND), (("history", "-S", "yesterday-ish"), ExitStatus.USAGE),
    (("history", "-o", "jobid,stat"), ExitStatus.USAGE), (("history", "-j", "x"), ExitStatus.USAGE),
])
def test_history_errors(site, argv, status):
    r = site(*argv)
    assert r.status == status, r.stderr
    assert r.stderr.startswith("pcocc: error: ") and "Traceback" not in r.stderr
    if argv[1] == "-o":
        assert "did you mean 'state'" in r.stderr


def test_history_h_is_help(site):
    r = site("history", "-h")
    assert r.status == 0 and r.stdout.startswith("Usage:")


def test_the_end_a_launcher_records():
    assert history.launcher_end(signals=[15]) == ("CANCELLED", "its launcher got SIGTERM (scancel, the time limit, or Ctrl-C)", None)
    assert history.launcher_end(error="vm1 failed: boom")[:2] == ("FAILED", "vm1 failed: boom")
    assert history.launcher_end(script="batch script", status=0) == ("COMPLETED", "the batch script exited with status 0", 0)
    assert history.launcher_end(script="host script", status=2)[0] == "FAILED"
    assert history.launcher_end(script="allocation's shell", status=-9)[1] == "the allocation's shell was killed by signal 9"
    assert history.launcher_end(status=0) == ("COMPLETED", "every VM stopped", None)
    assert history.launcher_end(status=1)[0] == "FAILED"


def test_a_second_cleanup_of_the_same_cluster_records_nothing(tmp_path, monkeypatch):
    """A reclaim that races the supervisor's own end must not add a second end line nor replace the record."""
    backend = _local(tmp_path, monkeypatch)
    store, prefix = backend.ctx.store, state.cluster_prefix("alice", 3)
    info = _info(3, cwd=str(tmp_path), script="/s.sh")
    store.put(prefix + "info", info)
    backend._cleanup(3, None, reason="the batch script exited with status 0", end_state=history.COMPLETED, exit_code=0)
    store.put(prefix + "info", info)  # still there for the second one
    backend._cleanup(3, None, reason="its supervisor (or the process submitting it) ended without cleaning up")
    assert history.get(store, "alice", 3)["state"] == "COMPLETED"
    assert (tmp_path / "pcocc_3.out").read_text().count("ended:") == 1
    assert store.range(prefix) == {}
    store.put(prefix + "info", {**info, "uuid": "v" * 32})  # a new cluster of the same job id is recorded
    backend._cleanup(3, None, end_state=history.CANCELLED, reason="cancelled by alice")
    assert history.get(store, "alice", 3)["state"] == "CANCELLED"


def test_a_reclaim_tells_why_the_supervisor_s_cleanup_failed(tmp_path, monkeypatch, caplog):
    """The supervisor's log goes with the run dir that the reclaim removes: the cause of a cleanup
    that failed is kept in the cluster's record, and the reclaim that finishes it says it."""
    backend = _local(tmp_path, monkeypatch)
    store, prefix = backend.ctx.store, state.cluster_prefix("alice", 3)
    info = _info(3, rundir=str(tmp_path / "job_3"), cwd=str(tmp_path), state="ending",
                 end={"state": "COMPLETED", "reason": "every VM stopped", "exit_code": None},
                 cleanup_error="StoreError: state store s.db: still locked")
    store.put(prefix + "info", info)
    with caplog.at_level("WARNING", logger="pcocc.local"):
        backend._reclaim(3, info)
    assert "cluster 3: its supervisor's cleanup failed (StoreError: state store s.db: still locked): finished now" in caplog.text
    assert history.get(store, "alice", 3)["state"] == "COMPLETED" and store.range(prefix) == {}


@pytest.mark.parametrize("signals,status", [([15], None), ([], 0)])
def test_a_slurm_cluster_stopped_by_ckpt_is_recorded_as_checkpointed(store, monkeypatch, signals, status):
    """pcocc ckpt stops the cluster with scancel once the checkpoint is on disk: its history
    says so (COMPLETED, checkpointed to DIR), not CANCELLED, whether the launcher got scancel's
    SIGTERM or saw its VMs stop first."""
    from pcocc.batch.slurm import SlurmBackend
    from pcocc.lifecycle import launcher

    ctx = SimpleNamespace(env=SimpleNamespace(user="alice"), store=store)
    prefix = state.cluster_prefix("alice", 9)
    store.put(prefix + "info", _info(9, backend="slurm"))
    ran = []
    monkeypatch.setattr("pcocc.batch.slurm.run", lambda argv, **kw: ran.append(argv))
    SlurmBackend(ctx).cancel(9, wait=False, end_state="COMPLETED", reason="checkpointed to /ck/1")
    assert ran == [["scancel", "9"]]
    launcher._record_end(ctx, 9, signals, {"error": None, "script": None, "status": status})
    r = history.get(store, "alice", 9)
    assert (r["state"], r["reason"]) == ("COMPLETED", "checkpointed to /ck/1")


def test_a_plain_scancel_stays_cancelled(store):
    from pcocc.lifecycle import launcher

    ctx = SimpleNamespace(env=SimpleNamespace(user="alice"), store=store)
    store.put(state.cluster_prefix("alice", 10) + "info", _info(10, backend="slurm"))
    launcher._record_end(ctx, 10, [15], {"error": None, "script": None, "status": None})
    assert history.get(store, "alice", 10)["state"] == "CANCELLED"
