"""Unprivileged test users: jobs must be submitted by someone other than root."""

import os
import pwd
import shutil
import subprocess

from pcocc.runner import run
from pcocc.testcluster.net import ClashError


def exists(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def add(state, name, home):
    if exists(name):  # never record (and later delete) a user we did not make
        raise ClashError(f"user {name} already exists", hint="remove it, or pick another test user name")
    state.add("users", name)
    run(["useradd", "--create-home", "--home-dir", home, "--shell", "/bin/sh", "--user-group", name])
    return pwd.getpwnam(name)


def remove(name):
    """Delete the test user, its home, and what pcocc made for it in /tmp (its default run dir
    /tmp/pcocc-<uid>: the next user given that uid must not find it)."""
    if exists(name):
        uid = pwd.getpwnam(name).pw_uid
        for path in (f"/tmp/pcocc-{uid}", f"/tmp/pcocc-accel-{uid}.json"):
            try:
                if os.lstat(path).st_uid == uid:
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
            except OSError:
                pass
        # also removes the home and the user's group; exit 12 (home already gone) is fine
        subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)
