"""The SLURM backend's logic that needs no SLURM: argument building, reclaiming records."""

from types import SimpleNamespace

from pcocc import state
from pcocc.batch.slurm import SlurmBackend, launcher_argv
from pcocc.store.sqlite import SqliteStore


def backend(tmp_path, batch_args=()):
    settings = {"batch-args": list(batch_args)}
    ctx = SimpleNamespace(env=SimpleNamespace(user="alice"), store=SqliteStore(str(tmp_path / "s.db")),
                          config=SimpleNamespace(batch=SimpleNamespace(settings=settings)))
    return SlurmBackend(ctx)


def test_records_of_dead_jobs_are_reclaimed(tmp_path):
    b = backend(tmp_path)
    for jobid in (5, 6):
        b.ctx.store.put(state.cluster_prefix("alice", jobid) + "info", {"jobid": jobid})
        b.ctx.store.put(state.cluster_prefix("alice", jobid) + "vms/0", {"state": "running"})
    b.ctx.store.put(state.cluster_prefix("bob", 5) + "info", {"jobid": 5})
    b.reclaim({6: {"state": "RUNNING"}})
    assert sorted(b.ctx.store.range("/pcocc/users/")) == [
        state.cluster_prefix("alice", 6) + "info", state.cluster_prefix("alice", 6) + "vms/0", state.history_key("alice", 5),
        state.cluster_prefix("bob", 5) + "info"]
    ended = b.ctx.store.get(state.history_key("alice", 5))  # a killed launcher's cluster: in the history, FAILED
    assert ended["state"] == "FAILED" and ended["jobid"] == 5 and ended["vms"][0]["state"] == "running"


def test_allocation_arguments(tmp_path):
    b = backend(tmp_path, batch_args=["--exclusive"])
    argv = b.allocation_argv("sbatch", 4, {"name": "vc", "licenses": ["pkey"]}, ["-p", "debug", "--mem-per-cpu=256"])
    assert argv == ["sbatch", "-J", "vc", "--comment=pcocc", "--exclusive", "-p", "debug", "--mem-per-cpu=256", "-n", "4", "-L", "pkey"]
    argv = launcher_argv("/usr/bin/pcocc", "tiny:4", {"name": "vc", "script": "/s.sh", "user_data": "/u.yaml"})
    assert argv == ["/usr/bin/pcocc", "internal", "launcher", "--definition", "tiny:4", "--name", "vc", "--user-data", "/u.yaml", "--batch-script", "/s.sh"]


def test_a_pcocc_job_not_yet_recorded_is_listed_and_can_be_named(tmp_path, monkeypatch):
    """The faults bench: cancel of a pending job said 'no virtual cluster with job id N'."""
    import pytest

    from pcocc.errors import NotFoundError

    b = backend(tmp_path)
    queue = {7: {"name": "vc", "user": "alice", "state": "PENDING", "pcocc": True},
             8: {"name": "other", "user": "alice", "state": "RUNNING", "pcocc": False}}
    monkeypatch.setattr(b, "squeue", lambda jobid=None, user=None: {j: v for j, v in queue.items() if jobid in (None, j)})
    assert [(i["jobid"], i["state"]) for i, _ in b.jobs()] == [(7, "pending")]
    assert b.find(7) == 7
    with pytest.raises(NotFoundError):
        b.find(8)  # not a pcocc job
    with pytest.raises(NotFoundError):
        b.find(9)


def test_before_the_first_node_setup_the_queue_is_shown(tmp_path, monkeypatch):
    """The faults bench: ps and cancel failed with 'etcd rejected the password' until the user's
    first job registered his account; SLURM's view is shown, and the job can be named."""
    from pcocc.errors import PermissionDenied

    b = backend(tmp_path)

    class NoAccount:
        def range(self, prefix):
            raise PermissionDenied("etcd at x rejected the password of user alice")

        get = range

    b.ctx.store = NoAccount()
    monkeypatch.setattr(b, "squeue", lambda jobid=None, user=None: {7: {"name": "vc", "user": "alice", "state": "RUNNING", "pcocc": True}})
    assert [(i["jobid"], i["state"]) for i, _ in b.jobs()] == [(7, "running")]
    assert b.find(7) == 7


def test_ps_all_shows_every_users_pcocc_jobs_as_squeue_does(tmp_path, monkeypatch):
    b = backend(tmp_path)
    queue = {7: {"name": "mine", "user": "alice", "state": "RUNNING", "nodes": "n1", "pcocc": True},
             8: {"name": "theirs", "user": "bob", "state": "PENDING", "nodes": "", "pcocc": True},
             9: {"name": "plain", "user": "bob", "state": "RUNNING", "nodes": "n2", "pcocc": False}}

    def squeue(jobid=None, user=None, all_users=False):
        return {j: v for j, v in queue.items() if (jobid in (None, j)) and (all_users or jobid or v["user"] == (user or "alice"))}

    monkeypatch.setattr(b, "squeue", squeue)
    got = [(i["jobid"], i["owner"], i["state"]) for i, _ in b.all_jobs()]
    assert got == [(7, "alice", "running"), (8, "bob", "pending")]  # not 9: not a virtual cluster


def test_cancel_many_scancels_each_then_waits(tmp_path, monkeypatch):
    import pcocc.batch.slurm as slurm

    b = backend(tmp_path)
    calls = []
    monkeypatch.setattr(slurm, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setattr(b, "wait_gone", lambda jobid: calls.append(["wait", jobid]))
    assert b.cancel_many([5, 6]) == {5: None, 6: None}
    assert calls == [["scancel", "5"], ["scancel", "6"], ["wait", 5], ["wait", 6]]


def test_the_image_check_skips_repositories_this_host_cannot_see(tmp_path):
    """Repositories may be mounted on the compute nodes only: an image there is left to the job."""
    import pytest

    from pcocc.config.models import Repo
    from pcocc.errors import NotFoundError
    from pcocc.images.store import ImageStore

    b = backend(tmp_path)
    (tmp_path / "seen").mkdir()
    repos = [Repo("seen", str(tmp_path / "seen"), "user"), Repo("far", str(tmp_path / "far"), "user")]
    b.ctx.images = lambda: ImageStore(repos, "alice")
    b.ctx.env = SimpleNamespace(user="alice", home=str(tmp_path), environ={})
    vm = SimpleNamespace(template="t")

    def check(image):
        b.check_images([vm], {"t": SimpleNamespace(values={"image": image})}, visible_only=True)

    check("far:img")  # not checked: its repository is not here
    check("img")  # not checked: it may be in 'far'
    with pytest.raises(NotFoundError, match="template t: image seen:img"):
        check("seen:img")
