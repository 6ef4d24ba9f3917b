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
of ours (in the cluster's run dir on one host, removed with the cluster however alloc
ends; else in the user's private run dir) that reads ~/.bashrc and then prefixes PS1;
POSIX shells (sh, dash, ash, ksh, mksh) read the file named by $ENV, so ENV points at
ours, which reads the user's own $ENV (kept in PCOCC_USER_ENV) first. Other shells (zsh,
fish, csh...) get the original's PROMPT_COMMAND only, which they ignore: their prompt is
their own.
"""

import contextlib
import logging
import os
import re
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


def shell_command(env, jobid, environ, directory=None):
    """(argv, environ, rcfile) that start the user's interactive shell ($SHELL, else /bin/sh) with
    the "(pcocc/JOBID) " prompt; rcfile: the file of ours to remove once the shell ended, or None.

    environ: the variables the shell gets (cluster_environ() included); a new dict is returned.
    directory: where the rc file goes: the cluster's own run dir when it has one on this host
    (the local backend's: removed with the cluster, so that nothing is left however the CLI
    ends, a SIGKILL included); else the user's private run dir, where a file whose process
    is gone is removed by the next one written (_write_rcfile).
    """
    shell = environ.get("SHELL") or "/bin/sh"
    kind = os.path.basename(shell)
    environ = dict(environ, PROMPT_COMMAND=f'echo -n "(pcocc/{int(jobid)}) "')  # the original's, for other shells
    prefix = f"(pcocc/{int(jobid)}) "
    if kind == "bash":
        environ.pop("PROMPT_COMMAND")  # our PS1 says it: not twice
        text = ('[ -f ~/.bashrc ] && . ~/.bashrc\n'
                f'PS1={shlex.quote(prefix)}"${{PS1-\\s-\\v\\$ }}"\n')
        rcfile = _write_rcfile(env, jobid, "bashrc", text, directory)
        return [shell, "--rcfile", rcfile], environ, rcfile
    if kind in _POSIX_SHELLS:
        environ.pop("PROMPT_COMMAND")
        user_env = environ.get("ENV")
        if user_env:
            environ["PCOCC_USER_ENV"] = user_env
        text = ('if [ -n "${PCOCC_USER_ENV:-}" ] && [ -r "$PCOCC_USER_ENV" ]; then . "$PCOCC_USER_ENV"; fi\n'
                f'PS1={shlex.quote(prefix)}"${{PS1-\\$ }}"\n')
        rcfile = _write_rcfile(env, jobid, "shrc", text, directory)
        environ["ENV"] = rcfile
        return [shell], environ, rcfile
    return [shell], environ, None


def _write_rcfile(env, jobid, kind, text, directory=None):
    """A file of ours, never at a predictable path in a shared directory: in directory (the
    cluster's private run dir) if given, else in the user's private run dir. Its name holds our
    pid and its start time, by which the files of processes that died without removing
    theirs (a SIGKILL) are found and removed here."""
    from pcocc.fsutil import private_dir
    from pcocc.procs import process_start

    pid = os.getpid()
    d = directory or private_dir(os.path.join(env.run_dir, "shell"))
    if not directory:
        _remove_orphans(d)
    path = os.path.join(d, f"{kind}-{int(jobid)}-{pid}-{process_start(pid)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


_RCFILE = re.compile(r"(?:bash|sh)rc-[0-9]+-([0-9]+)-([0-9]+|None)")


def _remove_orphans(directory):
    """Remove the rc files of directory whose process (pid and start time in the name) is gone."""
    from pcocc.procs import pid_alive

    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            m = _RCFILE.fullmatch(name)
            if m and not pid_alive(int(m.group(1)), None if m.group(2) == "None" else int(m.group(2))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def remove_rcfile(rcfile):
    """Remove what shell_command() wrote (nothing if None or gone)."""
    if rcfile:
        with contextlib.suppress(OSError):
            os.unlink(rcfile)
