"""pcocc ssh, scp, nc, ssh-config: reach a VM's reverse-NATed port, from the allocation or any login node.

ssh and scp run the real tools with an ssh_config that names the cluster's VMs
(vmN -> the node's address and host port), so every ssh option and syntax
(user@vmN, several VMs in one scp) works unchanged. As in the original, `ssh -p
PORT` and `scp -P PORT` name the VM's port (the one its network reverse-NATs), and
`--user` picks a cluster among another user's jobs, where the store lets the
caller read that user's records (with etcd, each user reads only their own: the
option then fails with that reason; the VMs must also hold the caller's key).
"""

import os

import click

from pcocc import names
from pcocc.cli import params
from pcocc.cli.access import job_options
from pcocc.cli.core import pass_app
from pcocc.errors import NotFoundError, PcoccError, PermissionDenied, UsageError

_PASS = {"ignore_unknown_options": True, "allow_interspersed_args": False, "help_option_names": ["--help"]}
NC_DEFAULT_PORT = 22  # the original's `pcocc nc VM` with no port: the VM's ssh port


def user_option(f):
    return click.option("--user", "owner", type=params.USER_NAME, default=None,
                        help="Select the cluster among the jobs of this user (where the store lets you read them).")(f)


def _cluster(app, jobid, jobname, owner=None):
    backend = app.ctx.backend()
    if owner and owner != backend.user:
        backend.user = owner  # another user's records: the store decides whether we may read them
    try:
        jobid = backend.find(jobid, jobname)
        return backend.job(jobid)
    except PermissionDenied:
        if owner:
            raise PermissionDenied(f"cannot read the clusters of user {owner}: the store lets each user read only their own") from None
        raise
    except NotFoundError as exc:
        if owner and owner != app.env.user:
            raise NotFoundError(f"user {owner}: {exc.message}" if jobid or jobname else
                                f"no cluster of user {owner} that you can read (with etcd, each user reads only their own)") from None
        raise


# the options of ssh(1) and scp(1) that take a value (so that a value is not taken for the destination)
_VALUE_OPTIONS = {"p": set("BbcDEeFIiJLlmOopQRSWw"), "P": set("cDFiJloPSX")}


def _vm_port_option(args, letter):
    """(args without `-<letter> PORT`, PORT or None): the VM port ssh -p / scp -P name (before
    the destination; the tools' own syntax: -pPORT or -p PORT, in a cluster of flags too)."""
    takes_value = _VALUE_OPTIONS[letter]
    out, port, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-") or a == "-":  # the destination and what follows: not ours
            out += args[i:]
            break
        # a cluster of flags (-4Cv), maybe ending with an option and its value (-vp22, -vp 22)
        for j, c in enumerate(a[1:], 1):
            if c in takes_value:
                value = a[j + 1:] or (args[i + 1] if i + 1 < len(args) else "")
                consumed = 0 if a[j + 1:] else 1
                if c == letter:
                    port = value
                    if a[1:j]:
                        out.append(a[:j])
                else:
                    out.append(a)
                    if consumed:
                        out.append(value)
                i += consumed
                break
        else:
            out.append(a)
        i += 1
    if port is None:
        return out, None
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"-{letter} {port!r}: expected a port number (1 to 65535)")
    return out, int(port)


def _run_tool(app, tool, jobid, jobname, owner, args, port_letter):
    from pcocc.lifecycle import remote

    args, vm_port = _vm_port_option(list(args), port_letter)
    info, vms = _cluster(app, jobid, jobname, owner)
    if vm_port is not None:
        remote.check_vm_port(info, vms, vm_port)
    config = remote.write_ssh_config(app.env, info, vms)
    argv = [tool, "-F", config, *args]
    import subprocess

    try:
        code = subprocess.call(argv)
    except FileNotFoundError:
        raise PcoccError(f"{tool}: command not found (install openssh-client)") from None
    if code:
        raise click.exceptions.Exit(code)


@click.command(context_settings=_PASS)
@job_options
@user_option
@click.argument("ssh_args", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def ssh(app, jobid, jobname, owner, ssh_args):
    """Log into a VM with ssh: pcocc ssh [-j JOB] [SSH OPTIONS] [user@]vmN [COMMAND].

    The VM's ssh port must be reverse-NATed (an L3 ethernet network with
    'reverse-nat'); the key is yours, given to the VM by cloud-init. Every ssh
    option is passed on, but -p PORT names the VM's port (the reverse-NATed
    one). -h is ssh's; --help is this text.
    """
    _run_tool(app, "ssh", jobid, jobname, owner, ssh_args, "p")


@click.command(context_settings=_PASS)
@job_options
@user_option
@click.argument("scp_args", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def scp(app, jobid, jobname, owner, scp_args):
    """Copy files to and from VMs: pcocc scp [-j JOB] [SCP OPTIONS] SRC... DEST, with vmN:PATH for a VM.

    -P PORT names the VM's port (the reverse-NATed one), as ssh -p does.
    """
    _run_tool(app, "scp", jobid, jobname, owner, scp_args, "P")


@click.command("ssh-config", context_settings={"help_option_names": ["-h", "--help"]})
@job_options
@user_option
@pass_app
def ssh_config(app, jobid, jobname, owner):
    """Print the ssh configuration that 'pcocc ssh' uses: a Host vmN entry per VM.

    For plain ssh, rsync, ansible or an editor's remote mode (as 'vagrant
    ssh-config'): pcocc ssh-config > ~/.ssh/pcocc.conf, then ssh -F
    ~/.ssh/pcocc.conf vm0. Host keys are kept per cluster in pcocc's run dir.
    """
    from pcocc.lifecycle import remote

    info, vms = _cluster(app, jobid, jobname, owner)
    with open(remote.write_ssh_config(app.env, info, vms)) as f:
        app.env.stdout.write(f.read())


@click.command(context_settings=_PASS)
@job_options
@user_option
@click.argument("nc_args", nargs=-1, required=True, type=click.UNPROCESSED, metavar="[NC_OPTIONS]... VM [PORT]")
@pass_app
def nc(app, jobid, jobname, owner, nc_args):
    """Connect stdin and stdout to a reverse-NATed TCP port of VM (default: 22, its ssh port).

    For instance as an ssh ProxyCommand: ssh -o ProxyCommand='pcocc nc vm1' vm1.
    nc's own options (-w SECONDS, -v, -q SECONDS...) are passed to nc (the
    netcat-openbsd command) when given; without any, pcocc relays itself.
    """
    from pcocc.cluster import parse_vmset
    from pcocc.lifecycle import remote

    options, words = _nc_split(list(nc_args))
    if not words or len(words) > 2:
        raise UsageError("nc: expected VM [PORT] (e.g. pcocc nc vm0 22)")
    vm = words[0]
    port = names.parse_count(words[1], "port", 1, 65535) if len(words) == 2 else NC_DEFAULT_PORT
    info, vms = _cluster(app, jobid, jobname, owner)
    ranks = parse_vmset(vm, len(vms))
    if len(ranks) != 1:
        raise PcoccError(f"'{vm}' names {len(ranks)} VMs: nc connects to one")
    address, host_port = remote.endpoint(info, vms, ranks[0], port)
    if options:
        import shutil
        import subprocess

        if not shutil.which("nc"):
            raise PcoccError("nc options need the nc command (netcat-openbsd): install it, or give no option")
        code = subprocess.call(["nc", *options, address, str(host_port)])
        if code:
            raise click.exceptions.Exit(code)
        return
    _relay(address, host_port)


_NC_ARG_OPTIONS = set("IiMmOPpqsTVwXx")  # options of nc(1) (netcat-openbsd) that take a value


def _nc_split(args):
    """(nc's options, [VM, PORT?]) from pcocc nc's arguments."""
    options, words, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not words:
            options.append(a)
            if len(a) == 2 and a[1] in _NC_ARG_OPTIONS and i + 1 < len(args):
                options.append(args[i + 1])
                i += 1
        else:
            words.append(a)
        i += 1
    return options, words


def _relay(address, port):
    """Copy stdin to the connection and the connection to stdout until both sides are done."""
    import selectors
    import socket

    try:
        sock = socket.create_connection((address, port), timeout=30)
    except OSError as exc:
        raise PcoccError(f"cannot connect to {address}:{port}: {exc.strerror or exc}") from None
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    stdin, stdout = 0, 1
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    open_ = {stdin, sock}
    while sock in open_:
        for key, _ in sel.select():
            if key.fileobj is sock:
                data = sock.recv(65536)
                if not data:
                    open_.discard(sock)
                    break
                os.write(stdout, data)
            else:
                data = os.read(stdin, 65536)
                if data:
                    sock.sendall(data)
                else:  # our input ended: say so, keep reading the answer
                    sel.unregister(stdin)
                    open_.discard(stdin)
                    sock.shutdown(socket.SHUT_WR)
    sock.close()
