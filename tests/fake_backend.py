"""An in-memory batch backend for in-process CLI tests: it records what the CLI asks and starts nothing.

It follows the interface of pcocc.batch.base.Backend: submit() returns a new
job id, find() and job() raise NotFoundError for an unknown cluster, cancel()
forgets it. install() patches Context.backend and the instant-cluster lookup
(which reads image repositories) for the duration of a with block.
"""

import contextlib
from unittest import mock

from pcocc.errors import NotFoundError


class FakeBackend:
    def __init__(self, ctx=None):
        self.ctx = ctx
        self.submitted = []  # (number of VMs, opts) of each submission
        self.clusters = {}  # jobid -> info
        self.cancelled = []

    def submit(self, vms, resolved, opts):
        jobid = len(self.submitted) + 1
        self.submitted.append((len(vms), opts))
        self.clusters[jobid] = {"jobid": jobid, "name": opts["name"], "owner": "tester", "definition": opts["definition"],
                                "state": "running", "vms": [{"rank": v.rank} for v in vms]}
        return jobid

    def submit_batch(self, n_vms, definition, opts, batch_opts):
        return self.submit([type("V", (), {"rank": i})() for i in range(n_vms)], {}, {**opts, "definition": definition})

    def wait_ready(self, jobid, progress=None, timeout=3600, alive=None, warn=None, until="running"):
        self.waited_until = until
        return None

    def jobs(self, user=None):
        return [(info, []) for info in self.clusters.values()]

    def job(self, jobid):
        if jobid not in self.clusters:
            raise NotFoundError(f"no virtual cluster with job id {jobid}", "See 'pcocc ps'.")
        info = self.clusters[jobid]
        return info, [{"rank": v["rank"], "name": f"vm{v['rank']}", "state": "pending"} for v in info["vms"]]

    def find(self, jobid=None, name=None):
        if jobid is not None:
            self.job(jobid)
            return jobid
        ids = [i for i, info in self.clusters.items() if name is None or info["name"] == name]
        if not ids:
            raise NotFoundError("you have no running virtual cluster" if name is None else f"no virtual cluster named '{name}'")
        return ids[0]

    def credentials(self, jobid):
        return {"ca": "", "cert": "", "key": ""}

    def cancel(self, jobid, wait=True, **end):
        self.job(jobid)
        self.cancelled.append(jobid)
        del self.clusters[jobid]


@contextlib.contextmanager
def install():
    """Use one FakeBackend for every command run in the block; yields it."""
    backend = FakeBackend()
    with mock.patch("pcocc.context.Context.backend", lambda self: backend), \
            mock.patch("pcocc.cli.cluster._instant", lambda *a, **k: None):
        yield backend


def local_site(cli, root):
    """A local-backend config with templates tiny and other (image r:tiny), for in-process CLI tests."""
    cli.write("etc/batch.yaml", f"type: local\nsettings: {{store: sqlite, store-path: {root}/state.db}}\n")
    cli.write("user/repos.yaml", f"repos:\n  - name: r\n    path: {root}/repo\n")
    cli.write("user/templates.yaml", "tiny:\n  image: r:tiny\nother:\n  image: r:tiny\n")
