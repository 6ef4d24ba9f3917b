"""What the alloc shell and the -E/-b host commands of a cluster get: its environment and prompt.

Environment (both backends, alloc's shell, alloc -E and batch -E):
    PCOCC_JOB_ID, PCOCC_JOB_NAME  the cluster's job id and name (pcocc commands run there target it)
    PCOCC_ALLOCATION=1            as in the original pcocc: "inside a cluster's allocation"
    PCOCC_VMS                     its VMs' names, space-separated in rank order (for sh loops)
    PCOCC_VM_COUNT                their number
    PCOCC_SSH_CONFIG              the ssh_config of 'pcocc ssh-config' (ssh -F "$PCOCC_SSH_CONFIG" vm1),
                                  only when the VMs have a reverse-NATed ssh port
A batch script (-b) in vm0 gets all but PCOCC_ALLOCATION and PCOCC_SSH_CONFIG (pcocc.batch.base.script_argv).

Prompt: the original pcocc prefixed the shell's prompt with "(pcocc/JOBID) " through
PROMPT_COMMAND, which a user's ~/.bashrc may reset and other shells ignore. Here the
user's rc files are read as usual and never written: bash starts with --rcfile, a file
of ours (in the user's private run dir) that reads ~/.bashrc and then prefixes PS1;
POSIX shells (sh, dash, ash, ksh, mksh) read the file named by $ENV, so ENV points at
ours, which reads the user's own $ENV (kept in PCOCC_USER_ENV) first. Other shells (zsh,
fish, csh...) get the original's PROMPT_COMMAND only, which they ignore: their prompt is
their own.
"""

import contextlib
import logging
import os
import shlex

from pcocc.errors import PcoccError

log = logging.getLogger("pcocc.lifecycle.allocshell")

_POSIX_SHELLS = ("sh", "dash", "ash", "ksh", "mksh", "ksh93", "busybox")


def cluster_environ(env, jobid, name, info=None, vms=()):
    """{variable: value} a cluster's shell or host command gets (see the module's docstring).

    env: pcocc's Environment (its run_dir holds the ssh_config); info, vms: the cluster's
    record and VM records (backend.job()), or None and () when unknown (then only the job's
    id and name are given).
    """
    out = {"PCOCC_JOB_ID": str(jobid), "PCOCC_JOB_NAME": str(name), "PCOCC_ALLOCATION": "1"}
    if info is None:
        return out
    names = [v.get("name") or f"vm{v['rank']}" for v in sorted(vms, key=lambda v: v["rank"])]
    out["PCOCC_VMS"] = " ".join(names)
    out["PCOCC_VM_COUNT"] = str(len(names))
    from pcocc.lifecycle.remote import port_map, write_ssh_config

    if not port_map(info, list(vms)):
        return out  # no reverse-NATed ssh port: no ssh config to give
    try:
        out["PCOCC_SSH_CONFIG"] = write_ssh_config(env, info, list(vms))
    except PcoccError:
        pass
    except OSError as exc:
        log.warning("cluster %s: its ssh config could not be written: %s", jobid, exc)
    return out


def shell_command(env, jobid, environ):
    """(argv, environ, rcfile) that start the user's interactive shell ($SHELL, else /bin/sh) with
    the "(pcocc/JOBID) " prompt; rcfile: the file of ours to remove once the shell ended, or None.

    environ: the variables the shell gets (cluster_environ() included); a new dict is returned.
    """
    shell = environ.get("SHELL") or "/bin/sh"
    kind = os.path.basename(shell)
    environ = dict(environ, PROMPT_COMMAND=f'echo -n "(pcocc/{int(jobid)}) "')  # the original's, for other shells
    prefix = f"(pcocc/{int(jobid)}) "
    if kind == "bash":
        environ.pop("PROMPT_COMMAND")  # our PS1 says it: not twice
        text = ('[ -f ~/.bashrc ] && . ~/.bashrc\n'
                f'PS1={shlex.quote(prefix)}"${{PS1-\\s-\\v\\$ }}"\n')
        rcfile = _write_rcfile(env, jobid, "bashrc", text)
        return [shell, "--rcfile", rcfile], environ, rcfile
    if kind in _POSIX_SHELLS:
        environ.pop("PROMPT_COMMAND")
        user_env = environ.get("ENV")
        if user_env:
            environ["PCOCC_USER_ENV"] = user_env
        text = ('if [ -n "${PCOCC_USER_ENV:-}" ] && [ -r "$PCOCC_USER_ENV" ]; then . "$PCOCC_USER_ENV"; fi\n'
                f'PS1={shlex.quote(prefix)}"${{PS1-\\$ }}"\n')
        rcfile = _write_rcfile(env, jobid, "shrc", text)
        environ["ENV"] = rcfile
        return [shell], environ, rcfile
    return [shell], environ, None


def _write_rcfile(env, jobid, kind, text):
    """A file of ours in the user's private run dir (never a predictable path in a shared directory)."""
    from pcocc.fsutil import private_dir

    d = private_dir(os.path.join(env.run_dir, "shell"))
    path = os.path.join(d, f"{kind}-{int(jobid)}-{os.getpid()}")
    with open(path, "w") as f:
        f.write(text)
    return path


def remove_rcfile(rcfile):
    """Remove what shell_command() wrote (nothing if None or gone)."""
    if rcfile:
        with contextlib.suppress(OSError):
            os.unlink(rcfile)
