"""What every batch backend shares: cluster state in the store, credentials, waiting."""

import time

from pcocc import state
from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, TimeoutExpired


class Backend:
    def __init__(self, ctx):
        self.ctx = ctx
        self.user = ctx.env.user

    # -- to implement
    def jobs(self):
        """[(info, vms)] of the user's clusters, by job id."""
        raise NotImplementedError

    def cancel(self, jobid, wait=True):
        raise NotImplementedError

    def job_alive(self, jobid):
        """Whether the job still runs (its supervisor, or its SLURM job)."""
        raise NotImplementedError

    # -- shared
    def cluster_info(self, jobid, vms, resolved, opts, **extra):
        """The cluster's record in the store: definition, owner, VMs with their settings."""
        return {
            "jobid": jobid, "name": opts["name"], "owner": self.user, "definition": opts["definition"],
            "created": time.time(), "state": "submitted", "user_data": opts.get("user_data"),
            "script": opts.get("script"), "cwd": opts.get("cwd"),
            "vms": [{"rank": v.rank, "template": v.template, "settings": resolved[v.template].values} for v in vms],
            **extra,
        }

    def write_credentials(self, jobid, server_ips):
        """A CA for the cluster, a server certificate for its VMs, a client one for its owner."""
        from pcocc.agent import pki

        ca_cert, ca_key = pki.make_ca(f"pcocc cluster {jobid}")
        server_cert, server_key = pki.issue(ca_cert, ca_key, f"pcocc-{jobid}", server=True, ips=server_ips)
        client_cert, client_key = pki.issue(ca_cert, ca_key, self.user)
        text = lambda b: b.decode() if isinstance(b, bytes) else b  # noqa: E731
        prefix = state.cluster_prefix(self.user, jobid)
        self.ctx.store.put(prefix + "ca", {"cert": text(ca_cert), "key": text(ca_key), "server_cert": text(server_cert), "server_key": text(server_key)})
        self.ctx.store.put(prefix + "client", {"ca": text(ca_cert), "cert": text(client_cert), "key": text(client_key)})

    def credentials(self, jobid):
        return self.ctx.store.get(state.cluster_prefix(self.user, jobid) + "client")

    def job(self, jobid):
        """(info, [vm state]) of a cluster; NotFoundError when the store has none."""
        prefix = state.cluster_prefix(self.user, jobid)
        items = self.ctx.store.range(prefix)
        info = items.get(prefix + "info")
        if info is None:
            raise NotFoundError(f"no virtual cluster with job id {jobid}", "See 'pcocc ps'.")
        vms = {v["rank"]: v for k, v in items.items() if k.startswith(prefix + "vms/")}
        nodes = {k[len(prefix + "nodes/"):]: v for k, v in items.items() if k.startswith(prefix + "nodes/")}
        info = {**info, "nodes": nodes}
        return info, [vms.get(i, {"rank": i, "name": f"vm{i}", "state": "pending"}) for i in range(len(info["vms"]))]

    def find(self, jobid=None, name=None):
        """The job a command acts on: -j, -J, $PCOCC_JOB_ID/$SLURM_JOB_ID, or the only cluster."""
        if jobid is not None:
            self.job(jobid)
            return jobid
        jobs = self.jobs()
        if name is not None:
            ids = [i["jobid"] for i, _ in jobs if i["name"] == name]
            if not ids:
                raise NotFoundError(f"no virtual cluster named '{name}'", "See 'pcocc ps'.")
            if len(ids) > 1:
                raise PcoccError(f"several clusters are named '{name}' (jobs {', '.join(map(str, ids))}): use -j")
            return ids[0]
        env_id = self.ctx.env.environ.get("PCOCC_JOB_ID") or self.ctx.env.environ.get("SLURM_JOB_ID")
        if env_id:
            return self.find(int(env_id))
        if len(jobs) == 1:
            return jobs[0][0]["jobid"]
        if not jobs:
            raise NotFoundError("you have no running virtual cluster", "Start one with 'pcocc batch' or 'pcocc alloc'.")
        raise PcoccError(f"you have {len(jobs)} virtual clusters: choose one with -j JOBID or -J NAME")

    def wait_ready(self, jobid, progress=None, timeout=None, alive=None):
        """Wait until every VM runs; raise with the first node's or VM's failure."""
        alive = alive or self.job_alive
        deadline = time.monotonic() + (timeout or 3600)
        last, seen = None, False
        while True:
            try:
                info, vms = self.job(jobid)
                seen = True
            except (NotFoundError, PermissionDenied):  # not recorded yet, no account yet (a first job), or gone
                if not alive(jobid):
                    raise PcoccError(f"cluster {jobid} ended before all its VMs ran" if seen else f"cluster {jobid} ended before it started") from None
                info, vms = None, []
            if info is not None:
                failed_nodes = [(n, s) for n, s in info["nodes"].items() if s.get("state") == "failed"]
                if failed_nodes:
                    node, st = failed_nodes[0]
                    raise PcoccError(f"node setup failed on {node}: {st.get('error', 'unknown reason')}")
                failed = [v for v in vms if v["state"] == "failed"]
                if failed:
                    raise PcoccError(f"{failed[0]['name']} failed: {failed[0].get('error', 'unknown reason')}")
                if info["state"] in ("ending", "ended") or not alive(jobid):
                    raise PcoccError(f"cluster {jobid} ended before all its VMs ran")
                running = sum(v["state"] == "running" for v in vms)
                if progress and running != last:
                    progress(running, len(vms))
                    last = running
                if running == len(vms):
                    return
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"cluster {jobid}: not every VM runs after {timeout} s")
            try:
                self.ctx.store.wait(state.cluster_prefix(self.user, jobid), lambda items: True, 0.5)
            except PermissionDenied:  # no account yet: its node setup makes it
                time.sleep(0.5)
            time.sleep(0.1)

    def run_script_in_vm(self, jobid, script_path, rank=0):
        """Copy a script into a VM, run it there; (exit status, stdout bytes, stderr bytes)."""
        from pcocc.agent.endpoint import ControlClient, decode_bytes, encode_bytes

        _, vms = self.job(jobid)
        creds = self.credentials(jobid)
        with open(script_path, "rb") as f:
            data = f.read()
        with ControlClient(tuple(vms[rank]["control"]), ca_pem=creds["ca"], cert_pem=creds["cert"], key_pem=creds["key"], timeout=None) as client:
            client.call("writefile", path="/tmp/pcocc-batch-script", data_b64=encode_bytes(data), mode=0o755)
            result = client.call("exec", argv=["/bin/sh", "/tmp/pcocc-batch-script"], timeout=10**7)
        return result["exit"], decode_bytes(result["stdout_b64"]), decode_bytes(result["stderr_b64"])
