"""munged with a private key and socket (no /etc/munge, no init system)."""

import os
import pwd
import time
from pathlib import Path

from pcocc.errors import TimeoutExpired
from pcocc.runner import run
from pcocc.testcluster import proc


def paths(base):
    d = Path(base) / "munge"
    return d, d / "munge.sock", d / "munge.key"


def start(state, base):
    d, sock, key = paths(base)
    munge = pwd.getpwnam("munge")
    d.mkdir(exist_ok=True)
    # munged refuses a socket dir without o+x or with group/other write
    os.chown(d, munge.pw_uid, munge.pw_gid)
    d.chmod(0o755)
    key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o400)
    return proc.spawn(
        state, "munged",
        ["/usr/sbin/munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
        d / "munged.out", pidfile=d / "munged.pid", user=munge.pw_uid, group=munge.pw_gid,
    )


def wait(base, process, timeout=10):
    _, sock, _ = paths(base)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise TimeoutExpired(f"munged did not start: {proc.tail(Path(base) / 'munge' / 'munged.out')}")
        time.sleep(0.005)
    cred = run(["munge", "-S", sock, "-n"]).stdout
    run(["unmunge", "-S", sock], input=cred)
