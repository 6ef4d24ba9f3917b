"""File-system helpers with the checks that shared directories like /tmp need.

A per-user path in a world-writable directory (/tmp/pcocc-<uid>) can be made
first by another user, or be a symbolic link to a victim's file. So pcocc
keeps its runtime files in a private directory: a real directory (not a
link), owned by the process's effective uid, with no access for group or
others. $XDG_RUNTIME_DIR is used when it is such a directory (the XDG Base
Directory Specification requires it: owned by the user, mode 0700); else
/tmp/pcocc-<uid>, created and checked; and when another user made that one
first (which would lock its owner out of pcocc), ~/.cache/pcocc/run-<host>
instead. Files in shared places are created with
O_CREAT|O_EXCL|O_NOFOLLOW and a random name, then renamed (write_private).
"""

import os
import secrets
import stat

from pcocc.errors import PermissionDenied

_FIX = "remove it, or set PCOCC_RUN_DIR (or XDG_RUNTIME_DIR) to a private directory of yours"


def is_private_dir(path, uid=None):
    """Whether path is a real directory (not a link) owned by uid (default: our euid) with mode 0700 or less."""
    uid = os.geteuid() if uid is None else uid
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not stat.S_IMODE(st.st_mode) & 0o077


def xdg_runtime_dir(environ, uid=None):
    """$XDG_RUNTIME_DIR when it is set, absolute and private (owner, mode 0700, not a link); else None."""
    path = environ.get("XDG_RUNTIME_DIR")
    if path and os.path.isabs(path) and is_private_dir(path, uid):
        return path
    return None


TMP = "/tmp"  # the shared directory of the last fallback (a module constant for the tests)


def default_run_dir(environ, uid):
    """The run directory of user uid, found without creating anything (root's node setup uses it
    for a user's tasks): $PCOCC_RUN_DIR, else $XDG_RUNTIME_DIR/pcocc when that is a private
    directory of uid's, else /tmp/pcocc-<uid> unless something that is not a directory of uid's
    is there already (another user made it first: a denial of service otherwise), in which
    case <uid's home>/.cache/pcocc/run-<short host name> (private, per host: a home is shared
    between nodes). The XDG Base Directory Specification asks for such a replacement
    directory when XDG_RUNTIME_DIR is unusable."""
    if environ.get("PCOCC_RUN_DIR"):
        return environ["PCOCC_RUN_DIR"]
    xdg = xdg_runtime_dir(environ, uid)
    if xdg:
        return os.path.join(xdg, "pcocc")
    shared = os.path.join(TMP, f"pcocc-{int(uid)}")
    try:
        st = os.lstat(shared)
    except FileNotFoundError:
        return shared
    except (OSError, ValueError):
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
        return shared
    # with no home to fall back to, private_dir refuses the taken one, with the fix
    return _home_run_dir(uid) or shared


def _home_run_dir(uid):
    """<uid's home>/.cache/pcocc/run-<short host name>, or None when uid has no passwd entry."""
    import pwd
    import socket

    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None
    return os.path.join(home, ".cache", "pcocc", f"run-{socket.gethostname().split('.')[0]}")


def run_dir_candidates(environ, uid):
    """Every directory default_run_dir may give user uid with this environment, whatever another
    user does in /tmp meanwhile: [$PCOCC_RUN_DIR] or [$XDG_RUNTIME_DIR/pcocc] when they decide,
    else [/tmp/pcocc-<uid>, <home>/.cache/pcocc/run-<host>]. Root's node setup and the job's
    tasks each apply the rule at their own moment: a teardown looks in all of them."""
    chosen = default_run_dir(environ, uid)
    if environ.get("PCOCC_RUN_DIR") or xdg_runtime_dir(environ, uid):
        return [chosen]
    home = _home_run_dir(uid)
    return [os.path.join(TMP, f"pcocc-{int(uid)}"), *([home] if home else [])]


def private_dir(path):
    """Create path (mode 0700) if needed and make sure it is ours; return path.

    Ours: a real directory (not a symbolic link), owned by our effective uid;
    a mode wider than 0700 on a directory of ours is narrowed. Another user's
    directory, or a link, is refused: PermissionDenied, one line naming the
    path and the fix.
    """
    try:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (getattr(os, "ELOOP", 40), getattr(os, "ENOTDIR", 20)):
            raise PermissionDenied(f"{path} is not a directory of yours (a link or a file): {_FIX}") from None
        raise PermissionDenied(f"cannot create {path}: {exc.strerror}: {_FIX}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionDenied(f"{path} belongs to another user (uid {st.st_uid}): pcocc will not use it: {_FIX}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise PermissionDenied(f"cannot make {path} private: {exc.strerror}: {_FIX}") from None
    finally:
        os.close(fd)
    return path


def write_private(path, data, mode=0o600):
    """Write bytes to path atomically: a new file of a random name beside it (O_EXCL|O_NOFOLLOW), then rename.

    Never follows a link planted at path or at a guessable temporary name.
    Raises OSError.
    """
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fsync_file(path):
    """Flush path's data to stable storage (fsync(2)); raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Make the names created, renamed or removed in directory path durable (fsync(2) of the
    directory, as rename(2) alone does not promise); raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def not_a_dir(path):
    """Why path is not a usable directory, for a message ('no such directory' or 'not a
    directory'); None when it is one (following links, as os.path.isdir does)."""
    if os.path.isdir(path):
        return None
    return "not a directory" if os.path.exists(path) else "no such directory"
