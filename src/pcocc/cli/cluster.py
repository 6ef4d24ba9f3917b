"""pcocc alloc, batch, ps, cancel: start, list and stop virtual clusters."""

import contextlib
import os
import time

import click

from pcocc.cli import params
from pcocc.cli.core import pass_app
from pcocc.cli.render import colour, colour_enabled, dump_json, table, table_lines
from pcocc.errors import ConfigError, NotFoundError, PcoccError, UsageError
from pcocc.fsutil import not_a_dir


_COMMON = [
    click.option("-r", "--restart-ckpt", metavar="DIR", type=params.Path(file_okay=False),
                 help="Restart the cluster checkpointed in DIR by 'pcocc ckpt'; DEFINITION, and the cores and memory per VM, "
                      "are the checkpoint's unless given."),
    click.option("--boot", is_flag=True, help="Boot every VM, even those whose template has a snapshot ('pcocc template snapshot')."),
    click.option("--user-data", type=params.Path(exists=True, dir_okay=False),
                 help="cloud-init user-data file for every VM (overrides the templates'): text, MIME multipart or gzip, at most 1 MiB."),
    click.option("--image", "images", multiple=True, metavar="[TPL=]IMAGE",
                 help="Boot the VMs of template TPL (without TPL=, of the definition's only template) from IMAGE "
                      "([REPO:]NAME[@REV]) instead of the template's image; repeatable. Such a cluster cannot be saved "
                      "('pcocc save'), its templates' snapshots are not used, and a restart (-r) keeps the checkpoint's images."),
    click.option("--mount", "mounts", multiple=True, metavar="TAG=PATH[,type=virtio-9p|virtio-fs][,readonly=true|false]",
                 help="Share the host directory PATH with every VM under TAG, as a template's mount-points entry "
                      "(default: virtio-9p, read-write; replaces a template's entry of the same TAG); repeatable."),
]
_PASSTHROUGH = {"ignore_unknown_options": True}
_ALLOC_HELP = """
    DEFINITION is TEMPLATE[:COUNT][,TEMPLATE[:COUNT]...], e.g. tiny:3 (with -r
    DIR it may be left out: the checkpoint's, as are its cores and memory). Other
    options go to the batch system: with SLURM, to {cmd} unchanged (e.g. -p
    PARTITION, -t TIME, -c CPUS, --mem-per-cpu MB, -J NAME); on one host
    (type: local), -c/--cpus-per-vm, -m/--mem-per-core (MiB) and -J/--job-name.

    Limits, checked before anything starts (exit status 2): at most 4096 VMs;
    counts in ASCII digits; a job name of 1 to 128 printable characters;
    user-data (--user-data or a template's user-data file) empty, UTF-8 text
    (cloud-config, script, MIME multipart) or gzip of text, a regular file of
    at most 1 MiB (cloud-init's own docs cite 16 KiB on EC2; OpenStack takes
    64 KiB, Google Cloud 256 KiB).
"""


def common_options(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return f


def _local_options(args):
    """-c, -m and -J of the local backend (upstream's local options)."""

    @click.command(add_help_option=False)
    @click.option("-J", "--job-name", type=params.JOB_NAME, default="pcocc")
    @click.option("-c", "--cpus-per-vm", type=params.Count("number of cores per VM", 1, params.MAX_CPUS_PER_VM), default=1)
    @click.option("-m", "--mem-per-core", type=params.Count("memory per core (MiB)", 16, params.MAX_MEM_PER_CORE), default=1000)
    def parse(**kw):
        return kw

    try:
        return parse.main(list(args), standalone_mode=False)
    except click.ClickException as exc:
        raise UsageError(f"{exc.format_message()} (the local backend takes -c, -m and -J)") from None


def _slurm_name(args):
    """The job name among sbatch/salloc options (checked: pcocc.names.check_job_name), or None."""
    from pcocc.names import check_job_name

    for i, a in enumerate(args):
        if a in ("-J", "--job-name") and i + 1 < len(args):
            return check_job_name(args[i + 1])
        if a.startswith("--job-name="):
            return check_job_name(a.split("=", 1)[1])
        if a.startswith("-J") and len(a) > 2:
            return check_job_name(a[2:])
    return None


def _check_user_data(app, user_data, vms, resolved):
    """Refuse, before anything starts, user-data the VMs would refuse (pcocc.userdata).

    --user-data: UserDataError (exit 2). A template's user-data file: the same
    checks, as a ConfigError naming the template (exit 3), for each VM rank
    when its path can be expanded here (a path with %{clusterdir} or
    %{jobid} is checked by the VM).
    """
    from pcocc import pathtpl, userdata

    if user_data:
        userdata.read(user_data)
        return
    seen = set()
    for vm in vms:
        value = resolved[vm.template].values.get("user-data")
        if not isinstance(value, str) or not value:
            continue
        values = {"homedir": app.env.home, "user": app.env.user, "vm_rank": vm.rank, "clusterdir": None, "jobid": None}
        try:
            path = os.path.expanduser(pathtpl.expand(value, values, app.env.environ))
        except ConfigError:
            continue  # known only once the cluster runs
        if path in seen:
            continue
        seen.add(path)
        try:
            userdata.read(path)
        except userdata.UserDataError as exc:
            raise ConfigError([f"template {vm.template}: {exc.message}"]) from None


def _parse_definition(definition, tset):
    """cluster.parse_definition, with a suggestion for a mistyped template name (difflib)."""
    from pcocc.cluster import parse_definition

    try:
        return parse_definition(definition, tset)
    except NotFoundError as exc:
        import re

        m = re.fullmatch(r"no template named '(.*)'", exc.message, re.S)
        close = difflib_close(m.group(1), tset.names()) if m else None
        if close:
            raise NotFoundError(f"{exc.message}: did you mean '{close}'?", exc.hint) from None
        raise


def difflib_close(word, choices):
    """The choice closest to a mistyped word (difflib's ratio at least 0.6), or None."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return close[0] if close else None


def _split(app, args, restart_ckpt=None):
    """(batch options, DEFINITION) of alloc/batch's arguments.

    With -r DIR, DEFINITION may be left out, and so may the cores and memory per VM:
    they are the checkpoint's (its manifest), added to the batch options when none
    of them is given (restart_options). The last argument is then the DEFINITION
    only when it is one (its templates exist) and is not the value of the option
    before it (-J NAME, where NAME may be a template's name too).
    """
    slurm = app.config.batch.type == "slurm"
    last_is_value = len(args) >= 2 and _takes_value(args[-2], slurm)
    if restart_ckpt:
        from pcocc.lifecycle import checkpoint

        manifest = checkpoint.load(os.path.abspath(restart_ckpt))
        definition = None
        if args and not args[-1].startswith("-") and not last_is_value and _is_definition(app, args[-1]):
            args, definition = args[:-1], args[-1]
        return restart_options(list(args), manifest, slurm), definition or manifest["definition"]
    if not args or last_is_value:
        raise UsageError("missing the cluster DEFINITION (e.g. tiny:3)")
    usage = f"Usage: {click.get_current_context().command_path} [OPTIONS] DEFINITION (e.g. tiny:3)"
    if args[-1].startswith("-"):  # an option after the definition: blame it, not the definition
        raise UsageError(f"the cluster DEFINITION comes last, after the options: got option '{args[-1]}' there", usage)
    if not _is_definition(app, args[-1]):  # a word after the definition: blame the word
        words = [a for i, a in enumerate(args[:-1]) if not a.startswith("-") and not (i and _takes_value(args[i - 1], slurm))]
        if any(_is_definition(app, w) for w in words):
            raise UsageError(f"the cluster DEFINITION comes last: '{args[-1]}' after it is not one", usage)
    return list(args[:-1]), args[-1]


# Options of the batch system that take the next argument as their value when it is not
# attached (-J NAME, --job-name NAME): the local backend's, and sbatch(1)'s and salloc(1)'s
# (SLURM 22.05) with a required value; those whose value is optional take it only attached.
_LOCAL_VALUE_OPTIONS = {"-J", "--job-name", "-c", "--cpus-per-vm", "-m", "--mem-per-core"}
_SLURM_VALUE_OPTIONS = {f"-{c}" for c in "ABCDFGJLMNSabcdeimnopqtwx"} | {"--" + o for o in (
    "account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container "
    "core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency distribution error "
    "exclude export export-file extra-node-info gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task "
    "gres gres-flags hint input job-name kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind "
    "mem-per-cpu mem-per-gpu mincpus network nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu "
    "ntasks-per-node ntasks-per-socket open-mode output partition power prefer priority profile qos reservation "
    "signal sockets-per-node switches thread-spec threads-per-core time time-min tmp uid wait-all-nodes wckey wrap").split()}


def _takes_value(arg, slurm):
    """Whether arg, an option typed without its value attached, takes the next argument as its value."""
    return arg in (_SLURM_VALUE_OPTIONS if slurm else _LOCAL_VALUE_OPTIONS)


def _is_definition(app, text):
    from pcocc.cluster import parse_definition

    try:
        parse_definition(text, app.config.templates)
        return True
    except PcoccError:
        return False


_CPU_OPTIONS = {"slurm": ("-c", "--cpus-per-task"), "local": ("-c", "--cpus-per-vm")}
_MEM_OPTIONS = {"slurm": ("--mem", "--mem-per-cpu", "--mem-per-gpu"), "local": ("-m", "--mem-per-core")}


def restart_options(batch_opts, manifest, slurm):
    """batch_opts plus the checkpointed cluster's cores and memory per VM, each unless given:
    SLURM: -c CORES and --mem-per-cpu=MiB (sbatch(1), salloc(1)); one host: -c CORES and
    -m MiB per core. Only when every VM of the checkpoint had the same (else the restart
    check names what to give).

    The memory asked for is the checkpoint's exactly, as the restart checks it (a VM restores
    only into the memory size it was checkpointed with): a memory that is not a whole number
    of MiB per core (a SLURM --mem per node shared by its tasks) is asked as SLURM's --mem
    with one VM per node (--ntasks-per-node=1), where the node's memory is the VM's; on one
    host, only MiB per core can be asked: nothing is added, and the restart check says why."""
    from pcocc.lifecycle.checkpoint import slice_cores

    sizes = {(slice_cores(vm), vm.get("memory_mb")) for vm in manifest.get("vms") or []}
    if len(sizes) != 1:
        return batch_opts
    ((cores, memory_mb),) = sizes
    if not isinstance(cores, int) or not isinstance(memory_mb, int) or cores < 1:
        return batch_opts
    kind = "slurm" if slurm else "local"
    out = list(batch_opts)
    if not _given(batch_opts, _CPU_OPTIONS[kind]):
        out += ["-c", str(cores)]
    if not _given(batch_opts, _MEM_OPTIONS[kind]):
        if memory_mb % cores == 0:
            per_core = memory_mb // cores
            out += [f"--mem-per-cpu={per_core}"] if slurm else ["-m", str(per_core)]
        elif slurm and not _given(batch_opts, ("--ntasks-per-node",)):
            out += ["--ntasks-per-node=1", f"--mem={memory_mb}"]
    return out


def _slurm_size(batch_opts):
    """(cores, memory MiB) per VM that sbatch/salloc options ask for, each None when they do not
    say it in a way known here: -c/--cpus-per-task (default 1), and --mem-per-cpu (MiB, or
    with a K, M, G or T suffix) times the cores (pcocc.hypervisor.topology.task_slice)."""
    cpus = _option_value(batch_opts, ("-c", "--cpus-per-task"))
    cpus = 1 if cpus is None else int(cpus) if cpus.isascii() and cpus.isdigit() else None
    per_cpu = _option_value(batch_opts, ("--mem-per-cpu",))
    memory = None
    if per_cpu and cpus:
        import re

        m = re.fullmatch(r"([0-9]+)([KMGT]?)[Bb]?", per_cpu.strip(), re.I)
        if m and int(m.group(1)) > 0:  # 0: all of the node's memory (sbatch(1)): not known here
            kib = int(m.group(1)) * 1024 ** "KMGT".index((m.group(2) or "M").upper())
            memory = kib // 1024 * cpus if kib % 1024 == 0 else None
    if _option_value(batch_opts, ("--mem", "--mem-per-gpu")) is not None:
        memory = None  # which one SLURM takes is its business: not checked here
    return cpus, memory


def _option_value(args, names):
    """The value of the last of the options names in args (-c4, -c 4, --opt=4, --opt 4), or None."""
    value = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        for n in names:
            if a == n and i + 1 < len(args):
                value = args[i + 1]
                i += 1
                break
            if n.startswith("--") and a.startswith(n + "="):
                value = a[len(n) + 1:]
                break
            if len(n) == 2 and a.startswith(n) and not a.startswith("--") and len(a) > 2:
                value = a[2:]
                break
        i += 1
    return value


def _given(args, names):
    """Whether one of the options names (short -x or long --xx) is among args, in any spelling."""
    for a in args:
        if a == "--":
            break
        for n in names:
            if a == n or (n.startswith("--") and a.startswith(n + "=")) or (len(n) == 2 and a.startswith(n) and not a.startswith("--")):
                return True
    return False


def _prepare(app, definition, user_data, images, mounts, restart_ckpt, cpus=None, memory_mb=None):
    """(vms, resolved, overrides, restart) of a cluster to submit, checked before anything starts.

    resolved: {template: Resolved} with the cluster's --image and --mount applied
    (templates.apply_overrides); overrides: {"images", "mounts"} or None, kept in the
    cluster's record (and in its checkpoints). restart: {dir, manifest} of -r DIR, or
    None; a restart keeps the checkpoint's images (its own overrides): --image is
    then ignored with a warning, and --mount refused (a cluster with mount points
    cannot be checkpointed).
    """
    from pcocc import templates

    tset = app.config.templates
    vms = _parse_definition(definition, tset)
    resolved = {name: tset.resolve(name) for name in {v.template for v in vms}}
    names = [v.template for v in vms]
    image_opts = templates.parse_image_options(images, names)
    mount_opts = _mount_options(mounts, check_dir=app.config.batch.type != "slurm")
    restart = None
    if restart_ckpt:
        from pcocc.lifecycle import checkpoint

        if mount_opts:
            raise UsageError("--mount cannot be used with -r: a cluster with mount points cannot be checkpointed, "
                             "so its restart has none")
        directory = os.path.abspath(restart_ckpt)
        manifest = checkpoint.load(directory)
        overrides = manifest.get("overrides") or None
        if image_opts and image_opts != (overrides or {}).get("images"):
            app.warn(f"-r: a restart keeps the images of checkpoint {directory}: --image is ignored")
        resolved = templates.apply_overrides(resolved, overrides)
        checkpoint.check_restart(manifest, directory, vms, resolved, cpus, memory_mb)
        restart = {"dir": directory, "manifest": manifest}
    else:
        overrides = {k: v for k, v in (("images", image_opts), ("mounts", mount_opts)) if v} or None
        resolved = templates.apply_overrides(resolved, overrides)
    _check_user_data(app, user_data, vms, resolved)
    return vms, resolved, overrides, restart


def _mount_options(values, check_dir):
    """templates.parse_mount_options of --mount values; check_dir (the VMs run on this host):
    each PATH must be a directory here, and a refusal says what it is instead."""
    from pcocc import pathtpl, templates

    mounts = templates.parse_mount_options(values, os.getcwd())
    if check_dir:
        for value in values:
            tag, _ = templates.parse_mount_option(value, os.getcwd())
            path = pathtpl.expand(mounts[tag]["path"], {}, {})  # as typed (kept literal for the path templates)
            if why := not_a_dir(path):
                raise UsageError(f"--mount {value}: {why}: {path}")
    return mounts


def _instant(app, resolved, cpus, memory_mb, excluded=None):
    """{template: restore entry} of the templates whose snapshot can start their VMs.
    excluded: {template: why its snapshot is not used} (templates.snapshot_exclusions),
    said for a template that has one."""
    from pcocc.lifecycle import instant

    out = {}
    images = app.ctx.images()
    for name, res in sorted(resolved.items()):
        entry, stale = instant.lookup(images, app.env, app.config, name, res, cpus, memory_mb)
        if (entry or stale) and name in (excluded or {}):
            app.info(f"template {name}: its snapshot is not used: {excluded[name]}")
        elif entry:
            out[name] = entry
        elif stale:
            app.info(f"template {name}: its snapshot cannot be used ({stale}): its VMs boot")
    if out:
        app.info(f"restoring the VMs of {', '.join(out)} from their template's snapshot")
    return out or None


def _submit_local(app, definition, batch_opts, user_data, images=(), mounts=(), script=None, host_script=None,
                  restart_ckpt=None, boot=False, hold=False):
    from pcocc import templates

    local = _local_options(batch_opts)
    cpus, mem = local["cpus_per_vm"], local["mem_per_core"] * local["cpus_per_vm"]
    vms, resolved, overrides, restart = _prepare(app, definition, user_data, images, mounts, restart_ckpt, cpus, mem)
    backend = app.ctx.backend()
    opts = {
        "name": local["job_name"], "cpus": cpus, "mem_per_core": local["mem_per_core"], "definition": definition,
        "user_data": os.path.abspath(user_data) if user_data else None, "script": script, "host_script": host_script,
        "cwd": os.getcwd(), "restart": restart, "hold": hold, "overrides": overrides,
        "instant": None if restart or boot or user_data else _instant(app, resolved, cpus, mem, templates.snapshot_exclusions(resolved, overrides)),
    }
    return backend, backend.submit(vms, resolved, opts), local["job_name"]


def _slurm_opts(app, definition, batch_opts, user_data, images=(), mounts=(), restart_ckpt=None, **launcher_opts):
    """(number of VMs, launcher options) for a SLURM submission; checks the definition first,
    and a restart's cores and memory per VM when the options say them (_slurm_size); the
    launcher checks the checkpoint again, and each VM its own slice."""
    cpus, memory_mb = _slurm_size(batch_opts) if restart_ckpt else (None, None)
    vms, _, overrides, restart = _prepare(app, definition, user_data, images, mounts, restart_ckpt, cpus, memory_mb)
    name = _slurm_name(batch_opts) or "pcocc"
    return len(vms), {"name": name, "user_data": os.path.abspath(user_data) if user_data else None,
                      "restart_dir": restart["dir"] if restart else None, "overrides": overrides, **launcher_opts}


def script_command(path, option):
    """The command line (a str, for shlex.split) that runs the script at path: the path itself
    when it is executable, else its #! line's interpreter on it (the original pcocc made
    batch -E's copy executable, so a script with a #! line need not be). UsageError if neither."""
    import shlex

    path = os.path.abspath(path)
    return shlex.join(_interpreter(path, option) + [path])


def _interpreter(path, option):
    """[] for an executable file, else the argv of its #! line's interpreter (which then runs
    it); UsageError (one line) when it is neither executable nor has a #! line."""
    import shlex

    if os.access(path, os.X_OK):
        return []
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}") from None
    if not first.startswith(b"#!") or not first[2:].strip():
        raise UsageError(f"{option} {path}: not executable and has no #! line (chmod +x it)")
    try:
        return shlex.split(first[2:].decode("utf-8", "strict").strip())
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"{option} {path}: its #! line cannot be read") from None


def command_line(text, option):
    """argv of a command line given to an option (alloc -E), split as a shell does (shlex,
    as the original pcocc splits it): "mpirun ./a.out", or a script's path. Its command must
    be a file (a name without / is looked up in PATH) that is executable or, as batch -E
    takes it (script_command), a script with a #! line, then run by its interpreter.
    UsageError (one line) if not."""
    import shlex
    import shutil

    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}") from None
    if not argv:
        raise UsageError(f"{option}: an empty command")
    cmd = argv[0]
    if "/" not in cmd:
        if shutil.which(cmd) is None:
            here = f" (the file here is ./{cmd})" if os.path.isfile(cmd) else ""
            raise UsageError(f"{option}: command not found: {cmd}{here}")
        return argv
    if not os.path.isfile(cmd):
        raise UsageError(f"{option}: no such file: {cmd}")
    return _interpreter(cmd, option) + argv


def _start_progress(app, jobid, until="running"):
    """The start's progress (pcocc.cli.progress.start_progress): a context manager yielding the
    callback for backend.wait_ready, which hands it the records of the cluster it follows."""
    from pcocc.cli.progress import start_progress

    return start_progress(app, f"cluster {jobid}", until=until)


@click.command(cls=params.PassthroughCommand, context_settings=_PASSTHROUGH, help="Run a virtual cluster and a shell in its allocation; the cluster ends with the shell.\n" + _ALLOC_HELP.format(cmd="salloc"))
@common_options
@click.option("-E", "--alloc-script", metavar="COMMAND",
              help="Run this command line on the host instead of a shell (split as a shell does: -E 'mpirun ./a.out', "
                   "or a script's path); the cluster ends with it.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[BATCH_OPTIONS]... [DEFINITION]")
@pass_app
def alloc(app, restart_ckpt, boot, user_data, images, mounts, alloc_script, args):
    batch_opts, definition = _split(app, args, restart_ckpt)
    # checked before anything starts, not once the cluster runs
    argv = command_line(alloc_script, "-E/--alloc-script") if alloc_script is not None else None
    if app.config.batch.type == "slurm":
        import shlex

        # the launcher runs the command line as it is split here (a script through its #! line)
        n_vms, opts = _slurm_opts(app, definition, batch_opts, user_data, images, mounts, restart_ckpt,
                                  host_script=shlex.join(argv) if argv else None, boot=boot)
        argv = app.ctx.backend().interactive_allocation(n_vms, definition, opts, batch_opts)
        os.execvp(argv[0], argv)
    # held: the cluster ends with this process, however it ends (exit, SIGHUP, SIGTERM, SIGKILL)
    backend, jobid, name = _submit_local(app, definition, batch_opts, user_data, images, mounts, restart_ckpt=restart_ckpt,
                                         boot=boot, hold=True)
    end = None
    try:
        app.info(f"cluster {jobid} starting")
        # the shell or -E starts once every qemu runs, as in the original; the guest agents answer
        # later (exec waits for them; ps --vms shows them)
        with _start_progress(app, jobid, until="qemu") as progress:
            backend.wait_ready(jobid, progress, warn=app.warn, until="qemu")
        from pcocc.lifecycle import allocshell

        info, vms = backend.job(jobid)
        env = dict(app.env.environ, **allocshell.cluster_environ(app.env, jobid, name, info, vms))
        rcfile = None
        if not argv:  # its rc file in the cluster's run dir: removed with the cluster, however this process ends
            argv, env, rcfile = allocshell.shell_command(app.env, jobid, env, info.get("rundir"))
            app.info(f"cluster {jobid} ready: a shell in its allocation; exit it to end the cluster")
        from pcocc.lifecycle.launcher import call_while_alive

        try:  # stopped once the cluster is gone (pcocc cancel), as salloc stops its command
            code = call_while_alive(argv, env, gone=lambda: not backend.job_alive(jobid))
        finally:
            allocshell.remove_rcfile(rcfile)
        from pcocc.history import script_end

        state_, reason, _ = script_end(code, "allocation's script" if alloc_script else "allocation's shell")
        end = {"end_state": state_, "exit_code": code, "reason": reason}
    except PcoccError as exc:  # e.g. a VM failed to start: the history says so, not "cancelled"
        end = {"end_state": "FAILED", "reason": exc.message}
        raise
    except KeyboardInterrupt:
        end = {"end_state": "CANCELLED", "reason": "alloc was interrupted (Ctrl-C)"}
        raise
    finally:
        app.info(f"cluster {jobid}: stopping")
        with contextlib.suppress(NotFoundError):  # it may have ended already: keep the first error
            if end:
                backend.cancel(jobid, **end)
            else:
                backend.cancel(jobid)
    if code:
        from pcocc.procs import shell_status

        raise click.exceptions.Exit(shell_status(code))  # a signal's 128 + N, as a shell says it


@click.command(cls=params.PassthroughCommand, context_settings=_PASSTHROUGH, help="Submit a virtual cluster as a batch job and print its job id.\n" + _ALLOC_HELP.format(cmd="sbatch"))
@common_options
@click.option("-b", "--batch-script", type=params.Path(exists=True, dir_okay=False), help="Run this script in vm0 once the cluster runs; the cluster ends with it.")
@click.option("-E", "--host-script", type=params.Path(exists=True, dir_okay=False),
              help="Run this script on the first host once the cluster runs; the cluster ends with it, "
                   "or, with -b, with the -b script (as in the original pcocc), which stops it (SIGTERM) if it still runs.")
@click.option("--wait", is_flag=True, help="Return only when every VM runs (the job id is printed first); the VMs' phases are shown as they go "
                   "(a live line on a terminal, else a line per change).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[BATCH_OPTIONS]... [DEFINITION]")
@pass_app
def batch(app, restart_ckpt, boot, user_data, images, mounts, batch_script, host_script, wait, args):
    batch_opts, definition = _split(app, args, restart_ckpt)
    script = os.path.abspath(batch_script) if batch_script else None
    if app.config.batch.type == "slurm":
        n_vms, opts = _slurm_opts(app, definition, batch_opts, user_data, images, mounts, restart_ckpt, script=script,
                                  host_script=script_command(host_script, "-E/--host-script") if host_script else None, boot=boot)
        backend = app.ctx.backend()
        jobid = backend.submit_batch(n_vms, definition, opts, batch_opts)
    else:
        backend, jobid, _ = _submit_local(app, definition, batch_opts, user_data, images, mounts, script=script,
                                          host_script=script_command(host_script, "-E/--host-script") if host_script else None,
                                          restart_ckpt=restart_ckpt, boot=boot)
    try:
        app.out(str(jobid))
        app.env.stdout.flush()
        if wait:
            with _start_progress(app, jobid) as progress:
                backend.wait_ready(jobid, progress, timeout=3600, warn=app.warn)
    except KeyboardInterrupt:  # as sbatch: the job is submitted, only the waiting stops
        app.info(f"cluster {jobid} goes on (stop it with 'pcocc cancel -j {jobid}')")
        raise


PS_FIELDS = {  # name -> header; squeue(1)-like names where it has one
    "jobid": "JOBID", "name": "NAME", "user": "USER", "host": "HOST", "definition": "DEFINITION", "vms": "VMS",
    "state": "STATE", "time": "DURATION",
}
PS_DEFAULT = "jobid,name,user,host,definition,vms,state,time"
VM_FIELDS = {"jobid": "JOBID", "vm": "VM", "host": "HOST", "state": "STATE", "uptime": "UPTIME", "ssh_port": "SSH",
             "agent": "AGENT", "error": "ERROR"}
VM_DEFAULT = "jobid,vm,host,state,uptime,ssh_port,agent"
_STATE_COLOURS = {"running": "green", "starting": "yellow", "pending": "yellow", "qemu-start": "yellow",
                  "temporary-disk": "yellow", "failed": "red", "stopped": "dim"}


def _hosts(info, vms):
    """The hosts of a cluster, in rank order: its VMs' hosts, else its own (local), else SLURM's node list."""
    hosts = []
    for v in vms:
        if v.get("host") and v["host"] not in hosts:
            hosts.append(v["host"])
    if not hosts:
        slurm_nodes = (info.get("slurm") or {}).get("nodes")
        if info.get("host"):
            hosts = [info["host"]]
        elif slurm_nodes:
            hosts = [slurm_nodes]
    return hosts


def _cluster_row(info, vms, now):
    return {
        "jobid": info["jobid"], "name": info["name"], "user": info["owner"], "host": info.get("host"),
        "definition": info["definition"], "vms": len(vms), "state": info["state"],
        "vm_states": {v["name"]: v["state"] for v in vms},
        "errors": {v["name"]: v["error"] for v in vms if v.get("error")},
        "duration": int(now - info["created"]) if info.get("created") else None,
        "hosts": _hosts(info, vms),
    }


def _vm_rows(info, vms, now):
    """One row per VM: jobid, vm, host, state, uptime (s, since it runs: its record's "since", else
    the cluster's start), ssh_port (its reverse-NATed host port, or None), agent (ready, none: its
    guest agent never answered, or None while it boots), error."""
    from pcocc.lifecycle.remote import port_map

    ports = port_map(info, vms)
    rows = []
    for v in vms:
        since = v.get("since") or info.get("started") or info.get("created")
        running = v.get("state") == "running"
        rows.append({"jobid": info["jobid"], "vm": v.get("name", f"vm{v.get('rank')}"), "host": v.get("host"),
                     "state": v.get("state"), "uptime": int(now - since) if running and since else None,
                     "ssh_port": ports[v["rank"]][1] if v.get("rank") in ports else None,
                     "agent": v.get("agent"), "error": v.get("error") or v.get("agent_error")})
    return rows


def _jobs_for_ps(app, backend, user, all_users):
    if all_users:
        if not hasattr(backend, "all_jobs"):
            raise UsageError("-a/--all is not available with this batch backend")
        return backend.all_jobs()
    if user and user != app.env.user:
        if app.config.batch.type != "slurm":
            raise UsageError("-u needs the SLURM backend: on one host, each user sees only their own clusters (use -a)")
        return backend.jobs(user)
    return backend.jobs()


@click.command()
@click.option("-j", "--jobs", "jobids", type=params.JOB_IDS, multiple=True, metavar="JOBID[,JOBID...]",
              help="Only these job ids (repeat or separate with commas).")
@click.option("-n", "--name", "names_", type=params.JOB_NAME, multiple=True, help="Only clusters of this job name (repeatable).")
@click.option("-t", "--state", "states", multiple=True, metavar="STATE[,STATE...]",
              help="Only clusters in this state (submitting, running, ending, or SLURM's pending...; case ignored).")
@click.option("-u", "--user", type=params.USER_NAME, help="Another user's clusters (SLURM: what the batch system shows of them).")
@click.option("-a", "--all", "all_users", is_flag=True,
              help="Every user's clusters: yours in full, other users' as the batch system shows them (SLURM: squeue; "
                   "one host: their reservations of its cores and memory).")
@click.option("--vms", "per_vm", is_flag=True, help="One line per VM: its host, state, uptime and ssh port (colour on a terminal).")
@click.option("-o", "--format", "fmt", metavar="FIELD[,FIELD...]",
              help=f"Columns to show: {', '.join(PS_FIELDS)} (default: {PS_DEFAULT}); with --vms: {', '.join(VM_FIELDS)} (default: {VM_DEFAULT}).")
@click.option("--noheader", is_flag=True, help="No header lines (as squeue -h).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (a stable interface: see 'pcocc help json').")
@pass_app
def ps(app, jobids, names_, states, user, all_users, per_vm, fmt, noheader, as_json):
    """List your running virtual clusters (ended ones: 'pcocc history')."""
    fields = _fields(fmt or (VM_DEFAULT if per_vm else PS_DEFAULT), VM_FIELDS if per_vm else PS_FIELDS, "--format")
    backend = app.ctx.backend()
    jobs = _jobs_for_ps(app, backend, user, all_users)
    ids = {j for group in jobids for j in group}
    wanted_states = {s.strip().lower() for group in states for s in group.split(",") if s.strip()}
    jobs = [(i, v) for i, v in jobs if (not ids or i["jobid"] in ids) and (not names_ or i["name"] in names_)
            and (not wanted_states or str(i["state"]).lower() in wanted_states)]
    if ids and not jobs:  # as squeue -j: a job id that is not running is an error (ended ones: the history)
        shown = ", ".join(map(str, sorted(ids)))
        raise NotFoundError(f"no running virtual cluster with job id {shown}", f"Ended clusters: 'pcocc history -j {shown.replace(' ', '')}'.")
    now = time.time()
    if per_vm:
        rows = [r for info, vms in jobs for r in _vm_rows(info, vms, now)]
        if as_json:
            return dump_json(app, rows)
        if not rows:
            app.info("No running virtual cluster.")
            return
        bright = colour_enabled(app)
        show = {"state": lambda r: colour(str(r["state"]), _STATE_COLOURS.get(r["state"], ""), bright),
                "uptime": lambda r: _duration(r["uptime"]), "ssh_port": lambda r: r["ssh_port"] or "-",
                "host": lambda r: one_line(r["host"]) or "-", "error": lambda r: one_line(r["error"]) or "",
                "agent": lambda r: r["agent"] or "-"}
        table(app, [VM_FIELDS[f] for f in fields], [[show.get(f, lambda r, f=f: r[f])(r) for f in fields] for r in rows],
              header=not noheader)
        return
    rows = [_cluster_row(info, vms, now) for info, vms in jobs]
    if as_json:
        return dump_json(app, rows)
    if not rows:
        app.info("No running virtual cluster.")
        return
    show = {"name": lambda r: one_line(r["name"]), "user": lambda r: one_line(r["user"]),
            "host": lambda r: one_line(",".join(r["hosts"])) or "-", "definition": lambda r: one_line(r["definition"]),
            "vms": lambda r: _vm_summary(r["vm_states"]) or r["vms"], "time": lambda r: _duration(r["duration"])}
    table(app, [PS_FIELDS[f] for f in fields], [[show.get(f, lambda r, f=f: r[f])(r) for f in fields] for r in rows],
          header=not noheader)
    for r in rows:  # names and errors are data (SLURM job names are anyone's): one line each
        for vm, err in r["errors"].items():
            app.out(f"{r['jobid']}/{vm}: {one_line(err)}")


def one_line(value):
    from pcocc.names import one_line as escape

    return escape(value) if isinstance(value, str) else value


def _vm_summary(states):
    counts = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _duration(seconds):
    if seconds is None:
        return "-"
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


@click.command()
@click.argument("job_args", nargs=-1, type=params.JOB_ID, metavar="[JOBID]...")
@click.option("-j", "--jobid", "jobids", type=params.JOB_IDS, multiple=True, metavar="JOBID[,JOBID...]",
              help="Job id of a cluster to stop (repeat or separate with commas).")
@click.option("-J", "--jobname", type=params.JOB_NAME, help="Job name of the cluster.")
@click.option("--all", "all_", is_flag=True, help="Stop all your clusters.")
@pass_app
def cancel(app, job_args, jobids, jobname, all_):
    """Stop virtual clusters, as scancel does: JOBID..., -j, -J, --all, or by default your only one.

    Every cluster named is stopped, even when another is not found; then the
    not-found ones are reported (exit status 4).
    """
    backend = app.ctx.backend()
    ids = list(dict.fromkeys([*job_args, *(j for group in jobids for j in group)]))
    if all_:
        if ids or jobname:
            raise UsageError("--all stops every cluster of yours: give no job id or name with it")
        ids = [info["jobid"] for info, _ in backend.jobs()]
        if not ids:
            app.info("You have no running virtual cluster.")
            return
    elif not ids:
        ids = [backend.find(None, jobname)]
    elif jobname:
        ids.append(backend.find(None, jobname))
    missing, errors, known = [], [], []
    for jobid in ids:
        try:
            backend.find(jobid)
            known.append(jobid)
        except NotFoundError:
            missing.append(jobid)
    if len(ids) == 1 and known:
        backend.cancel(known[0])
        results = {known[0]: None}
    elif hasattr(backend, "cancel_many"):
        results = backend.cancel_many(known)
    else:  # a backend without it: one after the other
        results = {}
        for jobid in known:
            try:
                backend.cancel(jobid)
                results[jobid] = None
            except PcoccError as exc:
                results[jobid] = exc
    for jobid, exc in results.items():
        if exc is None:
            app.info(f"cluster {jobid} stopped")
        elif isinstance(exc, NotFoundError):
            missing.append(jobid)
        else:
            errors.append(exc)
    if errors:
        raise errors[0]
    if missing:
        what = ", ".join(map(str, missing))
        raise NotFoundError(f"no virtual cluster with job id {what}", "See 'pcocc ps'.")


def _when(epoch):
    """A time as sacct(1) prints it (YYYY-MM-DDTHH:MM:SS, local time), or Unknown."""
    if not isinstance(epoch, (int, float)):
        return "Unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def _elapsed(start, end):
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return "-"
    seconds = max(int(end - start), 0)
    days, rem = divmod(seconds, 86400)
    text = _duration(rem)
    return f"{days}-{text}" if days else text


HISTORY_FIELDS = {  # name -> (header, value of a record): sacct(1)'s field names where it has one
    "jobid": ("JOBID", lambda r: r.get("jobid")),
    "jobname": ("NAME", lambda r: one_line(r.get("name"))),
    "user": ("USER", lambda r: one_line(r.get("user"))),
    "definition": ("DEFINITION", lambda r: one_line(r.get("definition"))),
    "state": ("STATE", lambda r: r.get("state")),
    "exitcode": ("EXITCODE", lambda r: "-" if r.get("exit_code") is None else r.get("exit_code")),
    "submit": ("SUBMIT", lambda r: _when(r.get("submitted"))),
    "start": ("START", lambda r: _when(r.get("started"))),
    "end": ("END", lambda r: _when(r.get("ended"))),
    "elapsed": ("ELAPSED", lambda r: _elapsed(r.get("started") or r.get("submitted"), r.get("ended"))),
    "nodelist": ("HOST", lambda r: one_line(r.get("host")) or "-"),
    "reason": ("REASON", lambda r: one_line(r.get("reason")) or "-"),
}
HISTORY_DEFAULT = "jobid,jobname,definition,state,exitcode,start,end,elapsed,reason"


def _fields(spec, known, option):
    """[field name] of a comma-separated --format value, checked against `known` (UsageError)."""
    out = []
    for name in spec.split(","):
        name = name.strip().lower()
        if not name:
            continue
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{option}: unknown field {one_line(name)!r}{hint}; fields: {', '.join(known)}")
        out.append(name)
    if not out:
        raise UsageError(f"{option}: no field given; fields: {', '.join(known)}")
    return out


@click.command()
@click.option("-j", "--jobs", "jobids", type=params.JOB_IDS, multiple=True, metavar="JOBID[,JOBID...]",
              help="Only these job ids (repeat or separate with commas).")
@click.option("-S", "--starttime", type=params.TIME, help="Only clusters that ran at or after this time (sacct -S's formats: "
              "YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS], MM/DD[/YY], now-N[smhdw]). Default: 7 days ago, all the history keeps.")
@click.option("-E", "--endtime", type=params.TIME, help="Only clusters that ran at or before this time (same formats).")
@click.option("-s", "--state", "states", multiple=True, type=click.Choice(["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], case_sensitive=False),
              help="Only clusters that ended in this state (repeatable).")
@click.option("--name", type=params.JOB_NAME, help="Only clusters of this job name.")
@click.option("-o", "--format", "fmt", metavar="FIELD[,FIELD...]", help=f"Columns to show (default: {HISTORY_DEFAULT}; all: {', '.join(HISTORY_FIELDS)}).")
@click.option("-l", "--long", "long_", is_flag=True, help="One more line per VM: its host, end state and error.")
@click.option("-n", "--noheader", is_flag=True, help="No header lines (as sacct -n).")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON for scripts (see 'pcocc help history').")
@pass_app
def history(app, jobids, starttime, endtime, states, name, fmt, long_, noheader, as_json):
    """List your ended virtual clusters, as sacct lists ended jobs.

    Each cluster ended COMPLETED (its script or shell ended with status 0,
    every VM stopped, or pcocc ckpt stopped it), FAILED (a VM or its setup failed, its script ended
    with another status, or its owner died), CANCELLED or TIMEOUT; REASON
    says why. The history keeps 7 days and at most 1,000 clusters per user
    (older ones are dropped when a cluster ends). Running clusters are in
    'pcocc ps'.
    """
    from pcocc import history as hist

    fields = _fields(fmt or HISTORY_DEFAULT, HISTORY_FIELDS, "--format")
    ids = [j for group in jobids for j in group] or None
    if app.config.batch.type == "local":  # as ps: a cluster whose supervisor died has ended, and is reclaimed into the history
        with contextlib.suppress(PcoccError):
            app.ctx.backend().jobs()
    records = hist.list_records(app.ctx.store, app.env.user, jobids=ids, since=starttime, until=endtime,
                                states=states or None, name=name)
    if as_json:
        return dump_json(app, records)
    if ids and not records:
        raise NotFoundError(f"no ended virtual cluster with job id {', '.join(map(str, ids))} in the history",
                            "Running clusters are in 'pcocc ps'; the history keeps 7 days.")
    if not records:
        app.info("No ended virtual cluster in the history.")
        return
    rows = []
    for r in records:
        rows.append([HISTORY_FIELDS[f][1](r) for f in fields])
    lines = table_lines([HISTORY_FIELDS[f][0] for f in fields], rows, header=not noheader)
    vm_lines = {}
    if long_:
        for r in records:
            vm_lines[r.get("jobid")] = [f"  {r.get('jobid')}/{one_line(v.get('name'))}: {one_line(v.get('host')) or '-'} "
                                        f"{v.get('state')}" + (f": {one_line(v.get('error'))}" if v.get("error") else "")
                                        for v in r.get("vms") or []]
    skip = 0 if noheader else 2
    for i, line in enumerate(lines):
        app.out(line)
        if long_ and i >= skip:
            for extra in vm_lines.get(records[i - skip].get("jobid"), []):
                app.out(extra)
