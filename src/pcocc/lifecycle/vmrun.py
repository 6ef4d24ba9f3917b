"""`pcocc internal run`: run one VM of a cluster, serve its control endpoint, clean up.

The VM publishes its state in the store as it goes, one update per phase:
starting (overlay, seed) -> qemu-start (qemu launched) -> booting (the guest wrote
to its console) -> running (its guest agent answered: agent "ready"; or none did
within the bound: agent "none", the VM runs without it, as images without
qemu-guest-agent do), then stopped or failed (with the reason). A restored VM goes
through restoring instead of booting.
"""

import contextlib
import logging
import os
import shutil
import signal
import threading
import time

from pcocc import pathtpl, state
from pcocc.agent.endpoint import ControlServer
from pcocc.agent.qga import GuestAgent
from pcocc.fsutil import not_a_dir
from pcocc.cluster import vm_spec, vm_template
from pcocc.errors import NotFoundError, PcoccError
from pcocc.hypervisor import accel, seed, topology, vm as vmlib
from pcocc.lifecycle import drives
from pcocc.lifecycle.control import ControlHandler
from pcocc.listen import reverse_nat_ranges
from pcocc.networks import jobnet
from pcocc.procs import process_start

log = logging.getLogger("pcocc.run")

AGENT_TIMEOUT = 300  # seconds of console silence before a VM is taken to have no guest agent
AGENT_TIMEOUT_MAX = 3600  # seconds in all: a TCG boot of a large image on a loaded host can be slow
AGENT_RECHECK = 30  # seconds between two looks for the agent of a VM that runs without one
AGENT_PROBE = 2  # seconds one such look may take (the VM's stop waits for it at most that long)
REBOOT_PROBE = 1  # seconds between two looks for the agent of a guest booting again after pcocc reset
RESET_PUBLISH_WAIT = 30  # seconds a reset waits for the VM's record to say booting (the loop looks every 0.2 s, or after a probe)
INFO_TIMEOUT = 120


def run_vm(ctx, jobid, rank):
    """Run VM `rank` of job `jobid` until it stops or we are told to stop; return an exit status."""
    user = ctx.env.user
    store = ctx.store
    # Under SLURM the launcher writes the record while this task starts: wait for it.
    info = store.wait(state.cluster_prefix(user, jobid) + "info", lambda items: bool(items), INFO_TIMEOUT)
    if not info:
        raise NotFoundError(f"no cluster {jobid} in the store")
    info = next(iter(info.values()))
    key = state.vm_key(user, jobid, rank)
    spec = vm_spec(info, rank)  # its template settings, and its cores on one host
    jobdir = rundir = None
    vm = server = agent = relay = None
    locked = []
    stop = threading.Event()
    outcome = {"state": "stopped"}

    me = os.getpid()
    me_start = process_start(me)

    def record(status, **extra):
        return {"rank": rank, "name": f"vm{rank}", "state": status, "since": round(time.time(), 3), "host": ctx.hostname,
                "pid": me, "pid_start": me_start, **extra}

    def publish(status, **extra):
        store.put(key, record(status, **extra))

    def amend(change):
        # while the VM runs: only into a record that still exists (a cluster reclaimed meanwhile
        # keeps no trace of it), and a store that does not answer (an etcd outage) does not fail the VM
        try:
            store.update(key, lambda cur: cur and change(cur))
        except PcoccError as exc:
            log.warning("vm%d: its record could not be updated: %s", rank, exc.message)

    def republish(status, **extra):
        amend(lambda cur: record(status, **extra))

    def publish_end(status, **extra):
        # Only into a record that still exists: a cluster reclaimed meanwhile keeps no trace of its VMs.
        store.update(key, lambda cur: cur and {**cur, "state": status, **extra})

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        publish("starting")
        # in the try: a run dir pcocc refuses (another user's /tmp/pcocc-<uid>, a link) fails
        # this VM with its reason, which ps and batch --wait show
        jobdir = info.get("rundir") or os.path.join(ctx.env.run_dir, f"job_{jobid}")  # SLURM: this node's
        rundir = os.path.join(jobdir, f"vm{rank}")
        _check_socket_room(rundir)
        for d in (jobdir, rundir):  # each private (makedirs would give the job's dir the umask's mode)
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
        cfg, rev = _vm_config(ctx, info, spec, rank, rundir, jobdir)
        vm = vmlib.VM(cfg)
        if stop.is_set():
            return 0
        # its persistent drives, protected against a second attachment (mmp) before qemu opens them
        locked = drives.take(store, user, jobid, rank, [(path, d.get("mmp", True)) for (path, _, _), d in
                                                        zip(cfg.drives, spec["settings"]["persistent-drives"])],
                             ctx.backend().job_alive)
        if cfg.incoming:
            publish("restoring")
        spice_password = _spice_password(spec["settings"], rundir)
        vm.start(pin=spec["settings"]["bind-vcpus"] and spec.get("pin", True))
        qemu = {"qemu_pid": vm.proc.pid, "qemu_pid_start": process_start(vm.proc.pid)}
        if spice_password:  # pcocc display: a TCP port of this node's, relayed to qemu's socket
            from pcocc.hypervisor import spice

            relay = spice.Relay(ctx.control_host, cfg.path(spice.SOCKET), avoid=reverse_nat_ranges(ctx.config)).start()
            qemu["display"] = spice.display_record(relay.host, relay.port, spice_password)
        publish("qemu-start", **qemu)
        agent = GuestAgent(vm.qga_path, timeout=30)
        ca = store.get(state.cluster_prefix(user, jobid) + "ca")
        reset, reset_published, watching = threading.Event(), threading.Event(), threading.Event()

        def on_reset():  # pcocc reset: the guest boots again; the record says so before reset returns
            if not watching.is_set():  # its first boot (the record says booting), or it stops
                return
            reset_published.clear()
            reset.set()
            if watching.is_set():
                reset_published.wait(RESET_PUBLISH_WAIT)

        # the host's relay (agent.relay) uses the owner's client credentials, read as the CLI reads them
        handler = ControlHandler(vm, agent, rev, ctx.images, cfg.drives, on_reset=on_reset,
                                 relay_credentials=lambda: store.get(state.cluster_prefix(user, jobid) + "client"))
        server = ControlServer(handler, ca_pem=ca["cert"], cert_pem=ca["server_cert"], key_pem=ca["server_key"],
                               owner=info["owner"], host=ctx.control_host, avoid=reverse_nat_ranges(ctx.config),
                               unix_path=cfg.path("control.sock")).start()
        # the relay's way in (agent.relay): in the records beside the TLS address, when it could be bound
        endpoints = {"control": list(server.address), **({"relay": server.unix_path} if server.unix_path else {})}
        restored = _restart_of(info, rank) if cfg.incoming else None
        agent_state = {"agent": "ready"}
        try:
            # the endpoint answers from now on: console (pcocc console from another host) works while it boots
            booting = {**qemu, **endpoints}
            _wait_agent(agent, vm, stop, booting=not cfg.incoming, on_console=lambda: publish("booting", **booting))
        except AgentAbsent as exc:
            if restored and restored.get("identity"):
                raise  # an instant VM gets its own identity through its agent: without it, it would be a twin
            # images with no qemu-guest-agent (or only the original's agent) run all the same, as in
            # the original; what needs the agent (exec, save's freeze, ckpt) says it is missing
            log.warning("vm%d: %s: it runs without it", rank, exc.message)
            agent_state = {"agent": "none", "agent_error": exc.message}
        if restored and restored.get("identity") and not stop.is_set():
            from pcocc.lifecycle import instant

            instant.give_identity(agent, f"vm{rank}", jobnet.vm_macs(ctx.config, spec["settings"], jobid, rank))
        watching.set()  # a reset from now on is the loop's below (one just before is seen there: booting after running)
        if not stop.is_set() and vm.proc.poll() is None:
            publish("running", **qemu, **agent_state, **endpoints, rundir=rundir)
        # an agent that starts late (a slow boot, or started by hand) is still found: looked
        # for every AGENT_RECHECK s, and the VM's record then says it has one
        recheck = time.monotonic() + AGENT_RECHECK if agent_state["agent"] == "none" else None
        reboot = None  # a _Reboot while the guest boots again after a reset

        def running_again():  # the record of a VM that runs, from now (agent_state as it is then)
            republish("running", **qemu, **agent_state, **endpoints, rundir=rundir)

        while not stop.is_set() and vm.proc.poll() is None:
            stop.wait(0.2)
            if reset.is_set() and not stop.is_set():
                # ps tells the truth: booting (since the reset) until the agent answers again
                reset.clear()
                if agent_state["agent"] == "ready":
                    reboot = _Reboot(vm)
                    republish("booting", **qemu, **endpoints, rundir=rundir)
                else:  # no agent to tell when it is up: running again from now
                    running_again()
                reset_published.set()
            if reboot is not None and reboot.due() and not stop.is_set():
                if _agent_answers(agent):
                    reboot = None
                    running_again()
                elif reboot.expired():
                    reboot = None
                    agent_state = {"agent": "none", "agent_error": f"the guest agent of vm{rank} did not answer after a reset "
                                   f"(the console was silent for {AGENT_TIMEOUT} s, or {AGENT_TIMEOUT_MAX} s in all)"}
                    log.warning("vm%d: %s: it runs without it", rank, agent_state["agent_error"])
                    running_again()
                    recheck = time.monotonic() + AGENT_RECHECK
            if recheck is not None and time.monotonic() >= recheck and not stop.is_set():
                if _agent_answers(agent):
                    log.info("vm%d: its guest agent answers now", rank)
                    agent_state, recheck = {"agent": "ready"}, None
                    amend(lambda cur: {**{k: v for k, v in cur.items() if k != "agent_error"}, "agent": "ready"})
                else:
                    recheck = time.monotonic() + AGENT_RECHECK
        watching.clear()
        reset_published.set()  # a reset waiting for the loop: it has ended
        if vm.proc.poll() is not None and not stop.is_set():
            code = vm.proc.returncode
            if code != 0:
                reason = f"qemu killed by signal {-code}" if code < 0 else f"qemu exited with status {code}: {vm.qemu_error()}"
                outcome = {"state": "failed", "error": reason}
                log.error("vm%d: %s", rank, reason)
        return 0 if outcome["state"] == "stopped" else 1
    except PcoccError as exc:
        outcome = {"state": "failed", "error": exc.message}
        log.error("vm%d: %s", rank, exc.message)
        return 1
    except Exception as exc:  # a bug, or an OS error we did not foresee: the VM failed, say why
        outcome = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        log.exception("vm%d", rank)
        return 1
    finally:
        # Each step on its own: a failure in one must not skip the others.
        if server is not None:
            _quietly(server.stop, drain=handler.drain_time())
        if relay is not None:
            _quietly(relay.stop)
        if vm is not None:
            _quietly(vm.stop, graceful=bool(spec["settings"]["persistent-drives"]))
            _quietly(vm.close)
        if agent is not None:
            _quietly(agent.close)
        if locked:  # once qemu is gone: the drives are closed
            _quietly(drives.release, store, user, jobid, rank, locked)
        if rundir:
            shutil.rmtree(rundir, ignore_errors=True)
        if jobdir and not info.get("rundir"):  # SLURM: the last VM of the job on this node removes the job's dir
            with contextlib.suppress(OSError):
                os.rmdir(jobdir)
        _quietly(publish_end, outcome["state"], **({"error": outcome["error"]} if "error" in outcome else {}))


def _quietly(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - cleanup goes on, and says what failed
        log.warning("cleanup: %s: %s: %s", getattr(fn, "__qualname__", fn), type(exc).__name__, exc)


def _spice_password(settings, rundir):
    """A new password for the VM's SPICE display, in its private run dir for qemu, when its
    template sets `remote-display: spice`; else None."""
    if settings.get("remote-display") != "spice":
        return None
    from pcocc.hypervisor import spice

    return spice.write_password(rundir)


class AgentAbsent(PcoccError):
    """No guest agent answered within the bound (an image without qemu-guest-agent)."""


def _wait_agent(agent, vm, stop, booting=True, on_console=None):
    """Wait until the guest agent answers. The bound adapts to a slow host: AgentAbsent after
    AGENT_TIMEOUT s during which the guest printed nothing on its console, or after
    AGENT_TIMEOUT_MAX s in all (a guest that prints for ever but never starts its agent).

    on_console(): called once, when the guest first writes to its console (the kernel
    boots): the VM's "booting" phase, one store update.
    """
    quiet = _ConsoleQuiet(vm.config.path("console.log"), on_first_output=on_console if booting else None)
    hard = time.monotonic() + AGENT_TIMEOUT_MAX

    def deadline():
        return min(hard, quiet.since() + AGENT_TIMEOUT)

    # qemu tells when the guest opens the agent's port: talk to the agent from then on
    # (a request sent before is lost), with polling only as a fallback. A restored
    # guest has its port open already.
    while booting and not stop.is_set() and vm.proc.poll() is None and time.monotonic() < deadline():
        if vm.monitor.wait_event("VSERPORT_CHANGE", lambda d: d.get("id") == "qga0port" and d.get("open"), min(deadline(), time.monotonic() + 1)):
            break
    while not stop.is_set() and vm.proc.poll() is None:
        try:
            agent.connect(min(deadline(), time.monotonic() + 1.0))
            agent.ping()
            return
        except PcoccError:
            if time.monotonic() > deadline():
                raise AgentAbsent(f"the guest agent of {vm.config.name} did not answer (the console was silent for "
                                  f"{AGENT_TIMEOUT} s, or {AGENT_TIMEOUT_MAX} s in all: see its console log)") from None


SOCKET_PATH_MAX = 107  # bytes of a unix socket's path (unix(7): sun_path, with its NUL)
LONGEST_SOCKET = "console.sock"  # the longest of the VM's sockets' names in its run dir (qemu.py, control.sock)


def _check_socket_room(rundir):
    """PcoccError, with the fix, when the VM's sockets would not fit under rundir (a long home
    in the ~/.cache fallback, a long PCOCC_RUN_DIR): one line, before qemu says it its way."""
    longest = os.path.join(rundir, LONGEST_SOCKET)
    if len(longest.encode()) > SOCKET_PATH_MAX:
        raise PcoccError(f"the VM's run directory {rundir} is too long for its sockets ({len(longest.encode())} bytes "
                         f"for {LONGEST_SOCKET}, {SOCKET_PATH_MAX} at most: unix(7))",
                         "Set PCOCC_RUN_DIR to a shorter private directory.")


def _agent_answers(agent, timeout=AGENT_PROBE):
    """Whether the guest agent answers a ping within about `timeout` s (a short look, done
    while the VM runs without one)."""
    try:
        agent.connect(timeout=timeout)
        agent.ping(timeout=timeout)
        return True
    except PcoccError:
        return False


class _Reboot:
    """A guest booting again after pcocc reset: its agent is looked for every REBOOT_PROBE s,
    within the bounds of a first boot (AGENT_TIMEOUT s of console silence, AGENT_TIMEOUT_MAX s in all)."""

    def __init__(self, vm):
        self.quiet = _ConsoleQuiet(vm.config.path("console.log"))
        now = time.monotonic()
        self.hard = now + AGENT_TIMEOUT_MAX
        self.next = now + REBOOT_PROBE

    def due(self):
        """Whether it is time for the next look (and the one after is planned)."""
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + REBOOT_PROBE
        return True

    def expired(self):
        return time.monotonic() > min(self.hard, self.quiet.since() + AGENT_TIMEOUT)


class _ConsoleQuiet:
    """Since when (time.monotonic()) a console log has not grown; on_first_output() is called
    once, at the first look that finds it not empty."""

    def __init__(self, path, on_first_output=None):
        self.path, self.size, self.last = path, -1, time.monotonic()
        self.on_first_output = on_first_output

    def since(self):
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = -1
        if size != self.size:
            self.size, self.last = size, time.monotonic()
        if size > 0 and self.on_first_output is not None:
            first, self.on_first_output = self.on_first_output, None
            first()
        return self.last


def _vm_config(ctx, info, spec, rank, rundir, jobdir):
    """Everything qemu needs for this VM: image overlay, seed, mounts, drives, topology."""
    settings = spec["settings"]
    values = {"homedir": ctx.env.home, "user": ctx.env.user, "clusterdir": jobdir, "vm_rank": rank, "jobid": info["jobid"]}

    def expand(text):
        return os.path.expanduser(pathtpl.expand(text, values, ctx.env.environ))

    image = settings["image"]
    cores, memory_mb = spec.get("cores"), spec.get("memory_mb")
    if cores is None:  # a SLURM task: the slice SLURM gave it
        cores, memory_mb = topology.task_slice(ctx.env.environ)
    if settings["full-node"]:
        cores = sorted(os.sched_getaffinity(0))
    topo = topology.plan(cores, memory_mb, emulator_cores=settings["emulator-cores"])
    restart = _restart_of(info, rank)
    if restart and restart.get("identity") and (topo.vcpus, topo.memory_mb) != (restart["vm"]["vcpus"], restart["vm"]["memory_mb"]):
        # under SLURM only the task knows its slice: a snapshot of another size is not for it
        log.info("vm%d: its template's snapshot has %s vCPU(s) and %s MiB, this VM %s and %s MiB: it boots", rank,
                 restart["vm"]["vcpus"], restart["vm"]["memory_mb"], topo.vcpus, topo.memory_mb)
        restart = None
    if restart:  # the very revision the checkpoint was taken on, whatever the latest is now
        from pcocc.lifecycle import checkpoint

        rev = checkpoint.restart_revision(ctx.images(), restart["vm"])
    else:
        rev = ctx.images().find(expand(image)) if image else None
    for key in ("kernel", "initrd"):  # paths like any other: ~ and path templates
        if settings.get(key):
            settings = {**settings, key: expand(settings[key])}
    if any(d.get("backup") for d in settings["persistent-drives"]):  # save -i's targets, likewise
        settings = {**settings, "persistent-drives": [{**d, "backup": expand(d["backup"]) if d.get("backup") else None}
                                                      for d in settings["persistent-drives"]]}
    kernel = settings.get("kernel") or (rev.boot_files()[0] if rev and rev.boot_files() else None)
    # the answer holds for this host until it reboots: cached in the user's private run dir
    chosen = accel.choose(ctx.env.run_dir, settings["qemu-bin"], kernel=kernel, forced=ctx.env.environ.get("PCOCC_ACCEL"))
    if chosen == "tcg" and not ctx.env.environ.get("PCOCC_ACCEL"):
        log.info("vm%d: KVM is not usable here: using TCG (software emulation, slower)", rank)
    if restart:
        from pcocc.lifecycle import checkpoint

        checkpoint.check_vm(restart["vm"], topo.vcpus, topo.memory_mb)
    user_data = _user_data(settings, info, expand)
    keys = seed.user_ssh_keys(ctx.env.home, [os.path.join(ctx.env.user_conf_dir, "ssh")])
    meta, user = seed.render(f"vm{rank}", settings.get("instance-id") or f"pcocc-{info.get('uuid') or info['jobid']}-vm{rank}", user_data, keys)
    mounts, fs_shares = [], []
    for tag, m in settings["mount-points"].items():
        path = expand(m["path"])
        if why := not_a_dir(path):
            raise PcoccError(f"mount point '{tag}': {why}: {path}")
        (fs_shares if m["type"] == "virtio-fs" else mounts).append((tag, path, m["readonly"]))
    if fs_shares:
        from pcocc.hypervisor.virtiofs import check_sound, virtiofsd_path

        check_sound()  # before anything starts: root, or a user virtiofsd cannot run for
        virtiofsd_path()
    cfg_args = dict(
        name=f"vm{rank}", rundir=rundir, settings=settings, accel=chosen, topology=topo, mounts=mounts, virtiofs=fs_shares,
        drives=vmlib.drive_list(settings["persistent-drives"], expand), nics=_nics(ctx, info, settings, rank),
    )
    disk_from = None
    if restart:
        from pcocc.lifecycle import checkpoint

        checkpoint.check_drives(restart["vm"], cfg_args["drives"])
        cfg_args["incoming"] = checkpoint.incoming_uri(restart["dir"], restart["vm"])
        disk_from = checkpoint.disk_path(restart["dir"], restart["vm"])
    return vmlib.prepare(cfg_args, rev, os.path.join(rundir, "disk.qcow2"), (meta, user), rundir, disk_from=disk_from), rev


def _restart_of(info, rank):
    """{dir, vm} when this VM restarts from a checkpoint, else None."""
    restart = info.get("restart")
    if restart:  # its entry read from the checkpoint's manifest in DIR (the record keeps its digest)
        from pcocc.lifecycle import checkpoint

        return checkpoint.restart_vm(restart, rank)
    snap = (info.get("instant") or {}).get(vm_template(info, rank))
    if snap:  # an instant cluster: restored from its template's snapshot, then given its own identity
        return {"dir": snap["dir"], "vm": {**snap["vm"], "name": f"vm{rank}"}, "identity": True}
    return None


def _nics(ctx, info, settings, rank):
    """The NICs of the VM's resource set, in order; their host side was made by node setup."""
    objects = None
    if jobnet.needs_node_objects(ctx.config, settings):  # which VF or PCI device node setup gave this VM
        objects = (ctx.store.get(state.node_key(ctx.env.user, info["jobid"], ctx.hostname)) or {}).get("objects")
    return jobnet.nic_args(ctx.config, settings, info["jobid"], rank, objects)


def _user_data(settings, info, expand):
    """The VM's user-data: a template's inline mapping, the checked bytes of a file (pcocc.userdata), or None."""
    from pcocc import userdata

    if info.get("user_data"):
        path = info["user_data"]
    elif isinstance(settings.get("user-data"), dict):
        return settings["user-data"]
    elif settings.get("user-data"):
        path = expand(settings["user-data"])
    else:
        return None
    return userdata.read(path)  # never blocks (a FIFO), never decodes: one-line UserDataError
