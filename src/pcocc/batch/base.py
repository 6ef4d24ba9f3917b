"""What every batch backend shares: cluster state in the store, credentials, waiting."""

import time
import uuid

from pcocc import state
from pcocc.cluster import record_vms, vm_count
from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, TimeoutExpired, UsageError
from pcocc.names import one_line, parse_job_id

POLL = 0.2  # seconds between two looks at the store while waiting


def agent_missing(vm):
    """The warning for a VM record whose guest agent never answered (vmrun: agent "none")."""
    return (f"{vm.get('name')} runs without a guest agent (exec, save's freeze and ckpt need qemu-guest-agent "
            f"in the image): {vm.get('agent_error') or 'it did not answer'}")
ALIVE_CHECK = 5.0  # seconds between two questions to the batch system


class Backend:
    def __init__(self, ctx):
        self.ctx = ctx
        self.user = ctx.env.user

    # -- to implement
    def jobs(self):
        """[(info, vms)] of the user's clusters, by job id."""
        raise NotImplementedError

    def cancel(self, jobid, wait=True, end_state="CANCELLED", reason=None, exit_code=None):
        """Stop a cluster; with wait, until it is gone. end_state, reason, exit_code: how its
        history records the end (request_end)."""
        raise NotImplementedError

    def request_end(self, jobid, end_state="CANCELLED", reason=None, exit_code=None):
        """Writes how the cluster's history is to record the end that is being asked
        (info["end_request"]: end_state one of history.END_STATES, reason, exit_code; default
        CANCELLED, "cancelled by <user>"). The first request wins; the cleanup (local supervisor)
        or the launcher (SLURM) reads it, and it wins over the plain CANCELLED of the signal that
        stops the cluster. Best effort: a store error leaves that plain CANCELLED."""
        import contextlib

        request = {"state": end_state, "reason": reason or f"cancelled by {self.user}", "exit_code": exit_code}
        with contextlib.suppress(Exception):
            self.ctx.store.update(state.cluster_prefix(self.user, jobid) + "info",
                                  lambda i: i and (i if i.get("end_request") else {**i, "end_request": request}))

    def wait_gone(self, jobid):
        """Wait until a cluster asked to stop (cancel(wait=False)) is gone; NotFoundError if it was."""
        self.cancel(jobid)

    def cancel_many(self, jobids):
        """Stop several clusters at once, as scancel(1) with several job ids: ask each to stop,
        then wait for each. Returns {jobid: None when stopped, or the PcoccError it raised}."""
        out = {}
        for jobid in jobids:
            try:
                self.cancel(jobid, wait=False)
                out[jobid] = None
            except PcoccError as exc:
                out[jobid] = exc
        for jobid in [j for j, e in out.items() if e is None]:
            try:
                self.wait_gone(jobid)
            except NotFoundError:
                pass  # gone already: what was asked
            except PcoccError as exc:
                out[jobid] = exc
        return out

    def job_alive(self, jobid):
        """Whether the job still runs (its supervisor, or its SLURM job)."""
        raise NotImplementedError

    def where_to_look(self, jobid):
        """A hint naming the logs of a job that failed to start, or None."""
        return None

    # -- shared
    def cluster_info(self, jobid, vms, resolved, opts, **extra):
        """The cluster's record in the store: definition, owner, its templates' settings (each
        once) and which template each rank runs (pcocc.cluster.record_vms; read them through
        pcocc.cluster.vm_spec and its neighbours, which also read an older pcocc's records).

        "uuid" names this cluster among all clusters ever started, whatever
        their job ids (which repeat: a new SLURM controller, another site): 32
        hex digits, random; the VMs' default cloud-init instance-id is
        pcocc-<uuid>-vm<rank>. A checkpoint restart is the same cluster: it
        keeps the uuid of its checkpoint's manifest (one written before the
        manifest had it: "<old job id>", the instance-id its VMs were born
        with). An instant cluster is a new one (its VMs come from a template's
        snapshot, not from this cluster): a new uuid.
        """
        return {
            "jobid": jobid, "uuid": _cluster_uuid(opts.get("restart")), "name": opts["name"], "owner": self.user,
            "definition": opts["definition"],
            "created": time.time(), "state": "submitted", "user_data": opts.get("user_data"),
            "script": opts.get("script"), "cwd": opts.get("cwd"),
            "host_script": opts.get("host_script"),  # batch -E's command line (local backend; SLURM's launcher runs it)
            # the checkpoint to restart from: {dir, manifest_sha256}, each VM reads its entry in DIR
            "restart": _restart_record(opts.get("restart")),
            "instant": opts.get("instant"),  # {template: {dir, vm}}: VMs restored from their template's snapshot
            # {"images": {template: image}, "mounts": {tag: mount}} of alloc/batch --image/--mount, or None:
            # already in the VMs' settings; kept for save (refused with images) and checkpoints (restarts keep them)
            "overrides": opts.get("overrides"),
            # each template's settings once, and the rank -> template runs (pcocc.cluster.record_vms):
            # read through pcocc.cluster's vm_spec, vm_settings, vm_count...
            **record_vms(vms, resolved),
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
        # The CA key is not kept: nothing needs to issue certificates for this cluster again.
        self.ctx.store.put(prefix + "ca", {"cert": text(ca_cert), "server_cert": text(server_cert), "server_key": text(server_key)})
        self.ctx.store.put(prefix + "client", {"ca": text(ca_cert), "cert": text(client_cert), "key": text(client_key)})

    def ended(self, jobid):
        """How a cluster ended: its history record (pcocc.history: state, reason, error, ...), or None."""
        from pcocc import history

        return history.get(self.ctx.store, self.user, jobid)

    def record_end(self, jobid, end_state, reason=None, exit_code=None):
        """Record the end of a cluster in the user's history (pcocc.history.record_cluster), from its
        live records, which must still exist. Never raises: a history that cannot be written is
        logged, the cluster's end goes on. Returns the record, or None."""
        from pcocc import history

        try:
            return history.record_cluster(self.ctx.store, self.user, jobid, end_state, reason, exit_code)
        except Exception as exc:  # noqa: BLE001 - the end of a cluster must not fail for its history
            import logging

            logging.getLogger("pcocc.history").warning("cluster %s: its end was not recorded in the history: %s",
                                                       jobid, getattr(exc, "message", exc))
            return None

    def check_images(self, vms, resolved, visible_only=False):
        """Check, at submission, that the image of every VM's template exists (what the VM would
        fail on once started). Images whose name holds a path template (%{...}) known only in the
        job are left to the VM. visible_only (SLURM: repositories may be mounted on the compute
        nodes only): an image is checked only when every repository it may be in exists on this
        host. Raises NotFoundError naming the template (exit status 4)."""
        import os

        from pcocc import pathtpl
        from pcocc.errors import ConfigError, UsageError
        from pcocc.images import legacy_dir, uri

        images = self.ctx.images()
        env = self.ctx.env
        for name in sorted({v.template for v in vms}):
            image = resolved[name].values.get("image")
            if not isinstance(image, str) or not image:
                continue
            values = {"homedir": env.home, "user": env.user, "vm_rank": 0, "clusterdir": None, "jobid": None}
            try:
                text = os.path.expanduser(pathtpl.expand(image, values, env.environ))
            except ConfigError:
                continue  # known only once the cluster runs
            if visible_only and not legacy_dir.is_dir_form(text):
                try:
                    repo = uri.parse(text).repo
                except UsageError:
                    repo = None
                where = [r for r in images.repos if repo is None or r.name == repo]
                if not where or not all(os.path.isdir(r.path) for r in where):
                    continue
            try:
                images.find(text)
            except NotFoundError as exc:
                raise NotFoundError(f"template {name}: image {text}: {exc.message}", "See 'pcocc image list'.") from None

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
        nodes_prefix = state.nodes_prefix(self.user, jobid)
        nodes = {k[len(nodes_prefix):]: v for k, v in items.items() if k.startswith(nodes_prefix)}
        info = {**info, "nodes": nodes}
        return info, [vms.get(i, {"rank": i, "name": f"vm{i}", "state": "pending"}) for i in range(vm_count(info))]

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
        env_id = self.ctx.env.environ.get("PCOCC_JOB_ID")
        if env_id:
            return self.find(parse_job_id(env_id, "$PCOCC_JOB_ID"))
        slurm_id = self.ctx.env.environ.get("SLURM_JOB_ID")  # inside an allocation: if it is a cluster
        if slurm_id and any(i["jobid"] == parse_job_id(slurm_id, "$SLURM_JOB_ID") for i, _ in jobs):
            return parse_job_id(slurm_id, "$SLURM_JOB_ID")
        if len(jobs) == 1:
            return jobs[0][0]["jobid"]
        if not jobs:
            raise NotFoundError("you have no running virtual cluster", "Start one with 'pcocc batch' or 'pcocc alloc'.")
        listed = ", ".join(f"{i['jobid']} ({one_line(i['name'])})" for i, _ in jobs[:20]) + (", ..." if len(jobs) > 20 else "")
        raise UsageError(f"you have {len(jobs)} virtual clusters: {listed}: choose one with -j JOBID or -J NAME")

    def wait_ready(self, jobid, progress=None, timeout=3600, alive=None, warn=None, until="running"):
        """Wait until every VM runs; raise with the first node's or VM's failure.

        until: "running" (every guest agent answered, or the VM runs without one: batch
        --wait, a batch script) or "qemu" (every qemu runs: the alloc shell and -E start
        then, as in the original pcocc; pcocc.phases.started). progress(n, total, vms): n VMs
        there, and the VM records ([record] in rank order), at the first look and after each
        change the watch brings (at most once per POLL): the caller draws the phases from them
        and reads nothing itself. warn(line): told of each VM that runs without a guest agent (agent "none": an
        image without qemu-guest-agent; exec, save's freeze and ckpt need one). The cluster's
        records are followed through the store (JobView): read once, then only what changes.
        """
        alive = alive or self.job_alive
        deadline = time.monotonic() + timeout
        seen, checked_alive = False, 0.0
        changed = True  # since progress was last told
        view = None

        def still_alive():  # asking the batch system is not free: at most every few seconds
            nonlocal checked_alive
            if time.monotonic() - checked_alive < ALIVE_CHECK:
                return True
            checked_alive = time.monotonic()
            return alive(jobid)

        try:
            while True:
                look = time.monotonic()
                if view is None:
                    try:
                        view = self.watch_job(jobid)
                    except PermissionDenied:  # no account yet (a first job)
                        pass
                info = view.info if view is not None else None
                if info is None:  # not recorded yet, or gone
                    if not alive(jobid):
                        ended = self.ended(jobid)
                        if ended and (ended.get("error") or ended.get("state") == "CANCELLED"):
                            why = ended.get("error") or ended.get("reason") or "cancelled"
                            why = why[len(f"cluster {jobid}: "):] if why.startswith(f"cluster {jobid}: ") else why  # the launcher's own words
                            raise PcoccError(f"cluster {jobid}: {why}",
                                             f"See 'pcocc history -j {jobid}'.") from None
                        what = "ended before all its VMs ran" if seen else "ended before it started"
                        raise PcoccError(f"cluster {jobid} {what}", self.where_to_look(jobid)) from None
                else:
                    seen = True
                    failed_node = view.failed_node()
                    if failed_node:
                        node, st = failed_node
                        raise PcoccError(f"cluster {jobid}: node setup failed on {node}: {st.get('error', 'unknown reason')}")
                    v = view.first_vm(("failed", "stopped"))
                    if v:
                        raise PcoccError(f"cluster {jobid}: {v['name']} {v['state']}: {v.get('error', 'before it ran')}")
                    if info["state"] in ("ending", "ended") or not still_alive():
                        raise PcoccError(f"cluster {jobid} ended before all its VMs ran")
                    running, total = view.started(until), view.count()
                    if progress and changed:
                        progress(running, total, view.vms())
                        changed = False
                    if running == total:
                        for v in view.vms():
                            if warn and v.get("agent") == "none":
                                warn(agent_missing(v))
                        return
                if time.monotonic() > deadline:
                    raise TimeoutExpired(f"cluster {jobid}: not every VM runs after {timeout} s (it goes on: see 'pcocc ps')")
                if view is not None:
                    changed = bool(view.refresh(POLL)) or changed  # back at the first change
                time.sleep(max(0.0, look + POLL - time.monotonic()))  # at most one look per POLL

        finally:
            if view is not None:
                view.close()

    def watch_job(self, jobid):
        """A JobView of one of the user's clusters (read once, then followed); close it after.
        Raises what the store raises (PermissionDenied before the user's first job)."""
        return JobView(self.ctx.store, self.user, jobid)

    def run_script_in_vm(self, jobid, script_path, rank=0):
        """Copy a script into a VM, run it there; (exit status, stdout bytes, stderr bytes).

        The script gets the cluster in its environment, as a host command does
        (pcocc.lifecycle.allocshell): PCOCC_JOB_ID, PCOCC_JOB_NAME, PCOCC_VMS,
        PCOCC_VM_COUNT (no ssh config: it names host ports, for the hosts).
        """
        from pcocc.agent.endpoint import ControlClient, decode_bytes, encode_bytes
        from pcocc.agent.qga import MAX_SCRIPT, run_script_argv

        info, vms = self.job(jobid)
        creds = self.credentials(jobid)
        with open(script_path, "rb") as f:
            data = f.read()
        if len(data) > MAX_SCRIPT:
            raise PcoccError(f"{script_path}: larger than {MAX_SCRIPT} bytes: copy big files with 'pcocc scp' and run a small script")
        with ControlClient(tuple(vms[rank]["control"]), ca_pem=creds["ca"], cert_pem=creds["cert"], key_pem=creds["key"], timeout=None) as client:
            # run from a private directory of a random name in the guest (a guest user could plant
            # a link at a predictable path in /tmp), executed as a file (its #! line), then removed
            result = client.call("exec", argv=script_argv(jobid, info, vms, run_script_argv(interpreter=None)),
                                 input_b64=encode_bytes(data), timeout=10**9)
        return result["exit"], decode_bytes(result["stdout_b64"]), decode_bytes(result["stderr_b64"])


class JobView:
    """One cluster's records followed through the store (Store.follow): read once, then kept up
    to date from the changes alone, with the VMs' states counted as they change, so that a
    wait on a 16,000-VM cluster costs what changes, not the cluster's size at each look.

    info: the cluster's record (None until written, or once gone); nodes: {node: record};
    vm_records: {rank: record} of the VMs that published one. refresh(timeout) waits for
    changes (Follower.changes) and applies them.
    """

    def __init__(self, store, user, jobid):
        self.jobid = jobid
        self.prefix = state.cluster_prefix(user, jobid)
        self._info_key, self._vms, self._nodes = self.prefix + "info", self.prefix + "vms/", state.nodes_prefix(user, jobid)
        self.info, self.nodes, self.vm_records = None, {}, {}
        self._states = {}  # state -> how many VM records are in it
        self._failed_nodes = set()
        self._count = None
        self.follower = store.follow(self.prefix) if store is not None else _Fixed()
        self._apply(self.follower.items)

    @classmethod
    def of(cls, info, vms):
        """A view of records at hand that never change ((info with its "nodes", [VM record])
        as Backend.job gives them), for a backend without a store to follow (tests' fakes)."""
        view = cls(None, "-", 0)
        view.info = {k: v for k, v in info.items() if k != "nodes"}
        view._count = len(vms)
        view._apply({view._nodes + name: record for name, record in (info.get("nodes") or {}).items()})
        view._apply({f"{view._vms}{v.get('rank', i)}": v for i, v in enumerate(vms) if v.get("state") != "pending"})
        return view

    def _apply(self, changed):
        for key, value in changed.items():
            if key == self._info_key:
                self.info = value
            elif key.startswith(self._nodes):
                name = key[len(self._nodes):]
                self.nodes.pop(name, None)
                self._failed_nodes.discard(name)
                if value is not None:
                    self.nodes[name] = value
                    if value.get("state") == "failed":
                        self._failed_nodes.add(name)
            elif key.startswith(self._vms) and key[len(self._vms):].isdigit():
                rank = int(key[len(self._vms):])
                old = self.vm_records.pop(rank, None)
                if old is not None:
                    self._states[old.get("state")] -= 1
                if value is not None:
                    self.vm_records[rank] = value
                    self._states[value.get("state")] = self._states.get(value.get("state"), 0) + 1
        return changed

    def refresh(self, timeout):
        """Wait up to timeout s for changes, apply them; {key: value or None} of what changed."""
        return self._apply(self.follower.changes(timeout))

    def count(self):
        """How many VMs the cluster has (0 before its record)."""
        if self._count is not None:
            return self._count
        return vm_count(self.info) if self.info else 0

    def counts(self):
        """{state: how many VMs are in it}, "pending" for those without a record yet."""
        out = {s: n for s, n in self._states.items() if n}
        pending = self.count() - sum(out.values())
        if pending > 0:
            out["pending"] = out.get("pending", 0) + pending
        return out

    def started(self, until="running"):
        """How many VMs reached `until` (pcocc.phases.started), from the counts."""
        from pcocc.phases import started

        return sum(n for s, n in self._states.items() if n and started({"state": s}, until))

    def failed_node(self):
        """(node, record) of the first node (by name) whose setup failed, or None."""
        if not self._failed_nodes:
            return None
        name = min(self._failed_nodes)
        return name, self.nodes[name]

    def first_vm(self, states):
        """The record of the lowest-ranked VM in one of `states`, or None (cheap when none is)."""
        if not any(self._states.get(s) for s in states):
            return None
        return next(v for _, v in sorted(self.vm_records.items()) if v.get("state") in states)

    def vms(self):
        """[VM record] in rank order, as Backend.job gives them (a pending one for a VM without)."""
        return [self.vm_records.get(i) or {"rank": i, "name": f"vm{i}", "state": "pending"} for i in range(self.count())]

    def close(self):
        self.follower.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Fixed:
    """The follower of JobView.of: nothing ever changes."""

    items = {}

    def changes(self, timeout):
        time.sleep(timeout)
        return {}

    def close(self):
        pass


def script_argv(jobid, info, vms, argv):
    """argv (/bin/sh -c SCRIPT ..., pcocc.agent.qga.run_script_argv) whose script first exports the
    cluster's variables (Backend.run_script_in_vm), each value quoted for the shell."""
    import shlex

    names = [v.get("name") or f"vm{v['rank']}" for v in sorted(vms, key=lambda v: v["rank"])]
    values = {"PCOCC_JOB_ID": str(jobid), "PCOCC_JOB_NAME": str(info.get("name") or ""), "PCOCC_VMS": " ".join(names),
              "PCOCC_VM_COUNT": str(len(names))}
    exports = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items()) + "; "
    return [*argv[:2], exports + argv[2], *argv[3:]]


def _restart_record(restart):
    """What the cluster's record keeps of opts["restart"] ({dir, manifest}): checkpoint.restart_record."""
    if not restart:
        return None
    from pcocc.lifecycle import checkpoint

    return checkpoint.restart_record(restart["dir"], restart["manifest"])


def _cluster_uuid(restart):
    """The uuid of a new cluster (random), or of the checkpointed cluster it restarts (see cluster_info)."""
    manifest = (restart or {}).get("manifest") or {}
    if manifest.get("uuid"):
        return str(manifest["uuid"])
    if restart and manifest.get("jobid") is not None:
        return str(manifest["jobid"])
    return uuid.uuid4().hex
