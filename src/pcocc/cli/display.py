"""pcocc display [-j JOB] [-J NAME] [--user USER] [-p] [VM]: the graphical console of a VM whose
template sets `remote-display: spice`, as the original pcocc's pcocc-display(1) defines it: by
default remote-viewer (package virt-viewer) opens it; -p prints the remote-viewer connection
file instead, to run remote-viewer by hand, elsewhere.

The VM's record (published by its process, pcocc.lifecycle.vmrun) holds where its display is
reached (the node's address and a TCP port relayed to qemu) and its password
(pcocc.hypervisor.spice). The display is not encrypted: docs/display.md.
"""

import ipaddress
import os
import re
import shutil
import subprocess

import click

from pcocc.cli.access import job_options
from pcocc.cli.core import pass_app
from pcocc.cli.remote import _cluster, user_option
from pcocc.errors import NotFoundError, PcoccError, UsageError
from pcocc.names import one_line

VIEWER = "remote-viewer"
_QEMU_UP = ("qemu-start", "restoring", "booting", "running")  # VM states in which its qemu serves the display
_STARTING = ("pending", "starting", "restoring")  # before its display record (published with "qemu-start": lifecycle.vmrun)
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{16,60}")  # what spice.write_password makes (SPICE takes up to 60 bytes)


def vm_display(info, vms, vm_name, here):
    """The display record ({"protocol", "host", "port", "password"}) of VM `vm_name` ("vmN") of
    the cluster (info, vms as Backend.job gives them), checked: a one-line PcoccError says why
    there is none (no such VM, its template sets no remote-display, not running, reached only on
    its own host when that is not `here`, the caller's host name). The values come from a
    record its owner can write: only an IP address, a port number and a password of the
    expected form pass, since they go into a connection file."""
    m = re.fullmatch(r"vm([0-9]+)", vm_name or "")
    if not m or not vm_name.isascii():
        raise UsageError(f"invalid VM name {one_line(vm_name)!r}: write vmN, e.g. vm0")
    rank = int(m.group(1))
    if rank >= len(vms):
        raise NotFoundError(f"cluster {info['jobid']} has no {vm_name} (it has {len(vms)} VMs)")
    from pcocc.cluster import vm_spec

    spec = vm_spec(info, rank)
    if (spec.get("settings") or {}).get("remote-display") != "spice":
        template = one_line(str(spec.get("template")))
        raise PcoccError(f"{vm_name} has no remote display: add 'remote-display: spice' to its template {template!r} "
                         "(pcocc help templates.yaml) and start a new cluster")
    vm = vms[rank]
    display = vm.get("display")
    if vm.get("state") not in _QEMU_UP or not isinstance(display, dict):
        state = one_line(str(vm.get("state")))
        if vm.get("state") in _STARTING:  # its display is published with its qemu ("qemu-start")
            raise PcoccError(f"{vm_name} is {state}" + (" (from a checkpoint or a snapshot)" if state == "restoring" else "")
                             + ": its display is there once its qemu runs; try again in a moment ('pcocc ps --vms' shows it)")
        raise PcoccError(f"{vm_name} is not running (state: {state})" if vm.get("state") not in _QEMU_UP else
                         f"{vm_name} publishes no display (it was started by an older pcocc): start a new cluster")
    try:
        address = ipaddress.ip_address(display.get("host"))
    except ValueError:
        raise PcoccError(f"{vm_name}: its record holds no valid display address") from None
    port, password = display.get("port"), display.get("password")
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536) or \
            not (isinstance(password, str) and _PASSWORD.fullmatch(password)) or display.get("protocol") != "spice":
        raise PcoccError(f"{vm_name}: its record holds no valid display port or password")
    host = vm.get("host")
    if address.is_loopback and host and host != here:
        raise PcoccError(f"{vm_name} serves its display on {host}'s loopback address only: run 'pcocc display' on {one_line(host)}")
    return {"protocol": "spice", "host": str(address), "port": port, "password": password}


def title(info, vm_name):
    """The viewer window's title: the VM and its cluster (job id, and name when it has one)."""
    name = one_line(str(info.get("name") or ""))
    return f"{vm_name} - pcocc job {info['jobid']}" + (f" ({name})" if name else "")


@click.command("display")
@job_options
@user_option
@click.option("-p", "--print_opts", "--print-opts", "print_opts", is_flag=True,
              help="Print the remote-viewer connection file instead of launching remote-viewer "
                   "(it holds the display's password: keep it private).")
@click.argument("vm", default="vm0")
@pass_app
def display(app, jobid, jobname, owner, print_opts, vm):
    """Show the graphical console of VM (default vm0) with remote-viewer.

    The VM's template must set 'remote-display: spice'. remote-viewer (package
    virt-viewer) is started on a connection file, on your $DISPLAY; with -p the
    file is printed instead ('pcocc display -p vm1 > vm1.vv', then 'remote-viewer
    vm1.vv' on a machine that reaches the VM's node). Each VM has its own random
    password, in the file. The display is not encrypted on the network: see
    docs/display.md (an ssh tunnel).
    """
    from pcocc.hypervisor import spice

    info, vms = _cluster(app, jobid, jobname, owner)
    text = spice.connection_file(vm_display(info, vms, vm, app.ctx.hostname), title(info, vm))
    if print_opts:
        app.env.stdout.write(text)
        return
    viewer = shutil.which(VIEWER, path=app.env.environ.get("PATH", os.defpath))
    if viewer is None:
        raise PcoccError(f"{VIEWER}: command not found (install virt-viewer), or print its connection file with 'pcocc display -p {vm}'")
    if not app.env.environ.get("DISPLAY") and not app.env.environ.get("WAYLAND_DISPLAY"):
        raise PcoccError(f"no graphical display here ($DISPLAY is not set): use ssh -X, or 'pcocc display -p {vm}' "
                         f"and run {VIEWER} on the file where you have one")
    path = write_private(app.env.run_dir, text)
    try:
        code = subprocess.call([viewer, path], env=app.env.environ)
    finally:
        try:
            os.unlink(path)  # remote-viewer deletes it once read (delete-this-file): unless it failed first
        except FileNotFoundError:
            pass
    if code:
        raise click.exceptions.Exit(code)


def write_private(directory, text):
    """Writes `text` to a new file of `directory` (the user's private run dir) with mode 0600; its path."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="display-", suffix=".vv", dir=directory)  # 0600, O_EXCL
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
