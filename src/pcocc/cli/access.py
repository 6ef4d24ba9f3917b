"""pcocc exec, console, reset, monitor-cmd, dump: reach the VMs of a cluster through
their control endpoints (ssh, scp and nc, through the network, are in remote.py)."""

import os
import sys

import click

from pcocc.cli import params
from pcocc.cli.core import pass_app
from pcocc.cli.pending import pending_command
from pcocc.errors import NotFoundError, PcoccError, UsageError

display = pending_command("display", "Show the remote display of a VM", "remote display support")


def job_options(f):
    f = click.option("-J", "--jobname", type=params.JOB_NAME, help="Job name of the cluster.")(f)
    return click.option("-j", "--jobid", type=params.JOB_ID, help="Job id of the cluster (default: $PCOCC_JOB_ID, or your only cluster).")(f)


class Targets:
    """The VMs a command acts on, with the credentials to reach their endpoints."""

    def __init__(self, app, jobid, jobname, vmset):
        from pcocc.cluster import parse_vmset

        backend = app.ctx.backend()
        self.jobid = backend.find(jobid, jobname)
        self.info, self.vms = backend.job(self.jobid)
        self.ranks = parse_vmset(vmset, len(self.vms))
        self.creds = backend.credentials(self.jobid)

    def _not_running(self, vm):
        return f"{vm['name']} is not running (state: {vm.get('state')}{', ' + vm['error'] if vm.get('error') else ''})"

    def call_all(self, op, args, timeout=None):
        """{vm name: (ok, result or error message)}, for every target VM (not running: an error)."""
        from pcocc.agent.endpoint import call_many

        targets, down = [], {}
        for r in self.ranks:
            vm = self.vms[r]
            if vm.get("state") == "running" and vm.get("control"):
                targets.append((vm["name"], tuple(vm["control"])))
            else:
                down[vm["name"]] = (False, self._not_running(vm))
        kw = {"timeout": timeout} if timeout else {}
        results = call_many(targets, op, args, ca_pem=self.creds["ca"], cert_pem=self.creds["cert"], key_pem=self.creds["key"], **kw) if targets else {}
        return {self.vms[r]["name"]: ({**results, **down})[self.vms[r]["name"]] for r in self.ranks}

    def call_one(self, op, **args):
        from pcocc.agent.endpoint import ControlClient

        vm = self.vms[self.ranks[0]]
        if vm.get("state") != "running" or not vm.get("control"):
            raise PcoccError(self._not_running(vm))
        with ControlClient(tuple(vm["control"]), ca_pem=self.creds["ca"], cert_pem=self.creds["cert"], key_pem=self.creds["key"], timeout=None) as c:
            return c.call(op, **args)


def _fold(names):
    """['vm0', 'vm1', 'vm2', 'vm5'] -> 'vm[0-2,5]' (clush style)."""
    from pcocc.hypervisor.topology import format_cpulist

    ranks = [int(n[2:]) for n in names]
    return f"vm{ranks[0]}" if len(ranks) == 1 else f"vm[{format_cpulist(ranks)}]"


@click.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@job_options
@click.option("-w", "--vms", "vmset", default="all", show_default=True, help="VMs to run on: vm0, vm[0-3,5] or all.")
@click.option("-i", "--index", type=params.Count("VM index", 0), help="Run on this VM only (upstream's option; same as -w vmN).")
@click.option("-u", "--user", type=params.USER_NAME, help="Run as this user in the VMs (default: root); a POSIX portable name, not starting with '-'.")
@click.option("-s", "--script", is_flag=True, help="CMD is a local script: copy it to the VMs and run it.")
@click.option("-t", "--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def exec_(app, jobid, jobname, vmset, index, user, script, timeout, cmd):
    """Run CMD in VMs through their guest agent; output is grouped like 'clush -b'.

    The exit status is the highest of the VMs' statuses (non-zero if any failed).
    """
    from pcocc.agent.endpoint import decode_bytes, encode_bytes
    from pcocc.agent.qga import MAX_SCRIPT, run_script_argv

    targets = Targets(app, jobid, jobname, f"vm{index}" if index is not None else vmset)
    args = {"user": user}
    if script:
        try:
            with open(cmd[0], "rb") as f:
                data = f.read(MAX_SCRIPT + 1)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise NotFoundError(f"cannot read script {cmd[0]}: {getattr(exc, 'strerror', None) or exc}") from None
        if len(data) > MAX_SCRIPT:
            raise UsageError(f"script {cmd[0]}: larger than {MAX_SCRIPT} bytes: copy big files with 'pcocc scp' and run a small script")
        # the script goes to a private directory of a random name in each VM (mktemp -d, as the
        # user it runs as), never to a predictable path a guest user could plant a link at
        args.update(argv=run_script_argv(cmd[1:]), input_b64=encode_bytes(data))
    else:
        args["argv"] = ["/bin/sh", "-c", " ".join(cmd)] if len(cmd) == 1 else list(cmd)
    if timeout:
        args["timeout"] = timeout
    results = targets.call_all("exec", args, timeout=(timeout + 10) if timeout else 10**7)
    many = len(results) > 1
    if not many:  # one VM: its stdout and stderr as they are, its status as ours
        ((name, (ok, res)),) = results.items()
        if not ok:
            raise PcoccError(f"{name}: {res}")
        app.env.stdout.write(decode_bytes(res["stdout_b64"]).decode(errors="replace"))
        app.env.stderr.write(decode_bytes(res["stderr_b64"]).decode(errors="replace"))
        app.env.stdout.flush()
        code = res["exit"]
        if code:
            raise click.exceptions.Exit(min(code if code > 0 else 128 - code, 255))
        return
    groups, worst = {}, 0
    for name, (ok, res) in results.items():
        if ok:
            text = (decode_bytes(res["stdout_b64"]) + decode_bytes(res["stderr_b64"])).decode(errors="replace")
            code = res["exit"]
        else:
            text, code = f"pcocc: error: {res}\n", 255
        worst = max(worst, code if code >= 0 else 128 - code)
        key = (text, code)
        groups.setdefault(key, []).append(name)
    for (text, code), names in groups.items():
        label = f"{_fold(names)} ({len(names)})" + (f" exit {code}" if code else "")
        app.out("-" * 15 + "\n" + label + "\n" + "-" * 15)
        app.env.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    app.env.stdout.flush()
    if worst:
        raise click.exceptions.Exit(min(worst, 255))


@click.command()
@job_options
@click.option("-l", "--log", "show_log", is_flag=True, help="Print the console log instead of attaching.")
@click.argument("vm", default="vm0")
@pass_app
def console(app, jobid, jobname, show_log, vm):
    """Attach to the serial console of VM (default vm0); Ctrl-] detaches."""
    targets = Targets(app, jobid, jobname, vm)
    info = targets.vms[targets.ranks[0]]
    if info.get("host") and info["host"] != app.ctx.hostname:
        raise PcoccError(f"{info['name']} runs on {info['host']}: run 'pcocc console' there (ssh {info['host']})")
    rundir = info.get("rundir") or os.path.join(targets.info["rundir"], info["name"])
    if show_log:
        try:
            with open(os.path.join(rundir, "console.log"), "rb") as f:
                app.env.stdout.write(f.read().decode(errors="replace"))
        except OSError:
            raise NotFoundError(f"no console log for {info['name']} (is it running?)") from None
        return
    _attach(os.path.join(rundir, "console.sock"), app)


def _attach(path, app):
    import select
    import socket
    import termios
    import tty

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
    except OSError as exc:
        raise PcoccError(f"cannot attach to the console {path}: {exc.strerror} (is the VM running?)") from None
    app.info("attached to the console; Ctrl-] detaches")
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved:
            tty.setraw(fd)
        while True:
            ready, _, _ = select.select([sock, fd], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or b"\x1d" in data:
                    break
                sock.sendall(data)
    finally:
        if saved:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sock.close()
    app.info("\ndetached")


@click.command()
@job_options
@click.argument("vms", default="vm0")
@pass_app
def reset(app, jobid, jobname, vms):
    """Hard-reset VMS (default vm0; e.g. vm[0-3] or all)."""
    _report(app, Targets(app, jobid, jobname, vms).call_all("reset", {}), "reset")


@click.command("monitor-cmd", context_settings={"allow_interspersed_args": False})
@job_options
@click.option("-w", "--vms", default="vm0", show_default=True, help="VMs: vm0, vm[0-3,5] or all.")
@click.argument("command", nargs=-1, required=True)
@pass_app
def monitor_cmd(app, jobid, jobname, vms, command):
    """Send COMMAND to the qemu monitor of VMs (e.g. 'info registers')."""
    results = Targets(app, jobid, jobname, vms).call_all("monitor_cmd", {"command": " ".join(command)})
    failed = False
    for name, (ok, res) in results.items():
        if len(results) > 1:
            app.out(f"--- {name}")
        if ok:
            app.env.stdout.write(res["output"])
        else:
            failed = True
            app.env.stderr.write(f"pcocc: error: {name}: {res}\n")
    if failed:
        raise click.exceptions.Exit(1)


@click.command()
@job_options
@click.argument("vm")
@click.argument("dumpfile", type=click.Path(dir_okay=False))
@pass_app
def dump(app, jobid, jobname, vm, dumpfile):
    """Dump the memory of VM to DUMPFILE (ELF, for crash or gdb), written on the VM's host."""
    path = os.path.abspath(dumpfile)
    if os.path.exists(path):
        raise PcoccError(f"{path} already exists")
    app.info(f"dumping {vm} to {path}")
    res = Targets(app, jobid, jobname, vm).call_one("dump", path=path)
    app.info(f"wrote {res['path']}")


def _report(app, results, what):
    failed = [f"{n}: {r}" for n, (ok, r) in results.items() if not ok]
    for line in failed:
        app.env.stderr.write(f"pcocc: error: {line}\n")
    ok = [n for n, (good, _) in results.items() if good]
    if ok:
        app.info(f"{what}: {_fold(ok)}")
    if failed:
        raise click.exceptions.Exit(1)
