"""/dev/net/tun for the test users' qemu: opened to all while any harness needs it.

qemu attaches to the tap node setup made for it by opening /dev/net/tun, which
this box has at mode 0600 (usual distributions: 0666). Several harnesses may
run at once: a registry under /run counts them, and the last one down puts
the first one's saved mode back.
"""

import fcntl
import os
import stat
from pathlib import Path

TUN = Path("/dev/net/tun")
REGISTRY = Path("/run/pcocc-testcluster-tun")


def _locked(fn):
    def wrapper(*args):
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(REGISTRY / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fn(*args)
        finally:
            os.close(fd)

    return wrapper


@_locked
def open_up(state, harness_id):
    """Make /dev/net/tun usable by everyone while this harness runs (recorded first)."""
    if not TUN.exists():
        return
    state.set(tun_user=True)
    saved = REGISTRY / "mode"
    if not saved.exists():
        saved.write_text(f"{stat.S_IMODE(TUN.stat().st_mode):o}\n")
    (REGISTRY / f"user-{harness_id}").touch()
    TUN.chmod(0o666)


@_locked
def restore(state, harness_id):
    """Forget this harness; the last one restores the saved mode. Idempotent."""
    if not state.get("tun_user"):
        return
    (REGISTRY / f"user-{harness_id}").unlink(missing_ok=True)
    saved = REGISTRY / "mode"
    if not any(REGISTRY.glob("user-*")) and saved.exists():
        if TUN.exists():
            TUN.chmod(int(saved.read_text(), 8))
        saved.unlink()
