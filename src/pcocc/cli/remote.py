"""pcocc ssh, scp, nc: reach a VM's reverse-NATed port, from the allocation or any login node.

ssh and scp run the real tools with an ssh_config that names the cluster's VMs
(vmN -> the node's address and host port), so every ssh option and syntax
(user@vmN, several VMs in one scp) works unchanged.
"""

import os

import click

from pcocc.cli import params
from pcocc.cli.access import job_options
from pcocc.cli.core import pass_app
from pcocc.errors import PcoccError

_PASS = {"ignore_unknown_options": True, "allow_interspersed_args": False, "help_option_names": ["--help"]}


def _cluster(app, jobid, jobname):
    backend = app.ctx.backend()
    jobid = backend.find(jobid, jobname)
    return backend.job(jobid)


def _run_tool(app, tool, jobid, jobname, args):
    from pcocc.lifecycle import remote

    info, vms = _cluster(app, jobid, jobname)
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
@click.argument("ssh_args", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def ssh(app, jobid, jobname, ssh_args):
    """Log into a VM with ssh: pcocc ssh [-j JOB] [SSH OPTIONS] [user@]vmN [COMMAND].

    The VM's ssh port must be reverse-NATed (an L3 ethernet network with
    'reverse-nat'); the key is yours, given to the VM by cloud-init. Every ssh
    option is passed on. -h is ssh's; --help is this text.
    """
    _run_tool(app, "ssh", jobid, jobname, ssh_args)


@click.command(context_settings=_PASS)
@job_options
@click.argument("scp_args", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def scp(app, jobid, jobname, scp_args):
    """Copy files to and from VMs: pcocc scp [-j JOB] [SCP OPTIONS] SRC... DEST, with vmN:PATH for a VM."""
    _run_tool(app, "scp", jobid, jobname, scp_args)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@job_options
@click.argument("vm")
@click.argument("port", type=params.Count("port", 1, 65535), required=False)
@pass_app
def nc(app, jobid, jobname, vm, port):
    """Connect stdin and stdout to a reverse-NATed TCP port of VM (default: the only one).

    For instance as an ssh ProxyCommand: ssh -o ProxyCommand='pcocc nc vm1' vm1
    """
    from pcocc.lifecycle import remote
    from pcocc.cluster import parse_vmset

    info, vms = _cluster(app, jobid, jobname)
    ranks = parse_vmset(vm, len(vms))
    if len(ranks) != 1:
        raise PcoccError(f"'{vm}' names {len(ranks)} VMs: nc connects to one")
    address, host_port = remote.endpoint(info, vms, ranks[0], port)
    _relay(address, host_port)


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
