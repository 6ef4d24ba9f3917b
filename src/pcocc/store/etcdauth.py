"""Per-user isolation in etcd (settings.etcd-auth-type: password).

Who may touch what:
  root            etcd's `root` role: everything. Only root's processes (node
                  setup, the SPANK plugin) hold its password, in a root-only
                  file (ROOT_PASSWORD_FILE, mode 0400).
  unix user U     etcd user U with role `pcocc-user-U`:
                    read-write  /pcocc/users/U/   (U's clusters, VMs, CAs, ...)
                    read        /pcocc/hosts/     (node facts that root writes and
                                                   commands show: setup state,
                                                   reservations; no secrets)
                  and nothing else: not /pcocc/users/V/ (V's CA keys live there),
                  not /pcocc/users/U2/ (prefixes end with "/").

U's password is random and lives in ~U/.pcocc/.etcd-password (mode 0400,
upstream pcocc's place). Whoever needs it first creates it: U's first pcocc
command, or root's ensure_user() on U's first job, which reads or creates it
*as U* (a forked child with U's ids), so root never follows U's symlinks.
ensure_user() then makes etcd's record match the file.

A user with no etcd record yet gets a clear PermissionDenied from the store.

This module builds on the client in store/etcd.py, never the reverse: the store
gets the caller's credentials through the callable open_etcd() takes
(`credentials` below), passed by pcocc.store.open_store.
"""

import os

from pcocc import state
from pcocc.errors import PcoccError, PermissionDenied
from pcocc.store.etcd import EtcdClient, EtcdError, range_of

PASSWORD_FILE = ".etcd-password"  # in ~/.pcocc
ROOT_PASSWORD_FILE = "etcd-password"  # in the system config dir (/etc/pcocc)
ROLE_PREFIX = "pcocc-user-"
USER_READ_PREFIXES = ("/pcocc/hosts/",)

_EXISTS = "already exists"


def user_password_path(home):
    return os.path.join(home, ".pcocc", PASSWORD_FILE)


def root_password_path(env):
    return os.path.join(env.system_conf_dir, ROOT_PASSWORD_FILE)


def new_password():
    import secrets

    return secrets.token_urlsafe(24)


def read_or_create_password(path, candidate=None):
    """The password in path; candidate (or a new random one) stored with mode 0400 when the file is absent."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    password = candidate or new_password()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        try:
            os.link(tmp, path)  # never replaces: two first uses agree on one password
        except FileExistsError:
            return _read(path)
    finally:
        os.unlink(tmp)
    return password


def _read(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        password = f.read().strip()
    if not password:
        raise PermissionDenied(f"{path} is empty", hint="delete it: a new password is made on next use")
    return password


def credentials(env):
    """(etcd user, password) for the calling process: root's, or the user's own."""
    try:
        if env.uid == 0:
            return "root", _read(root_password_path(env))
        return env.user, read_or_create_password(user_password_path(env.home))
    except FileNotFoundError as exc:
        raise PermissionDenied(f"no etcd password for root: {exc.filename} is missing", hint="run the node setup (pcocc internal setup init) once") from None
    except OSError as exc:
        raise PermissionDenied(f"cannot read or create the etcd password {exc.filename}: {exc.strerror}") from None


# -- as root


def enable_auth(store, root_password):
    """Create etcd's root user with root_password, then turn authentication on. Idempotent.

    store: an EtcdStore with no credentials (auth still off) or root's (auth on).
    """
    client = store.client
    try:
        _add_user(client, "root", root_password)
    except PermissionDenied:
        if client.user:
            raise
        client.set_credentials("root", root_password)  # auth already on: do the rest as root
        _add_user(client, "root", root_password)
    client.call("auth/user/grant", {"user": "root", "role": "root"}, "granting the root role")
    client.call("auth/enable", {}, "enabling authentication")
    client.set_credentials("root", root_password)


def ensure_user(store, user, password=None):
    """Give unix user `user` an etcd user and role limited to its prefixes. Idempotent; as root.

    password: the user's, or None to read (or create) ~user/.pcocc/.etcd-password as that user.
    """
    if not user or "/" in user:
        raise PcoccError(f"invalid user name for etcd: {user!r}")
    if password is None:
        password = user_password_as(user)
    client = store.client
    role = ROLE_PREFIX + user
    # Read first, write only what differs: every node of every job calls this, and each write
    # goes through etcd's serial apply loop (a user add hashes the password with bcrypt there,
    # 0.3-9 s each on a loaded host) and a grant logs every client out (it moves the auth
    # revision): 16 nodes doing it at once timed out (bench/results/slurm_scale.md).
    have = _role_perms(client, role)
    if have is None:
        _ignore_exists(client, "auth/role/add", {"name": role}, f"creating role {role}")
        have = set()
    grants = [("READWRITE", state.user_prefix(user))] + [("READ", p) for p in USER_READ_PREFIXES]
    for perm, prefix in grants:
        wanted = {"permType": perm, **_perm_range(prefix)}
        if (perm, wanted["key"], wanted["range_end"]) not in have:
            client.call("auth/role/grant", {"name": role, "perm": wanted}, f"granting {prefix} to role {role}")
    roles = _user_roles(client, user)
    if roles is None:
        _add_user(client, user, password)
    elif not _password_matches(client, user, password):
        client.call("auth/user/changepw", {"name": user, "password": password}, f"setting the password of {user}")
    if role not in (roles or ()):
        client.call("auth/user/grant", {"user": user, "role": role}, f"granting role {role} to {user}")


def remove_user(store, user):
    """Delete the etcd user and role of `user` (the keys stay). Idempotent; as root."""
    for path, body in (("auth/user/delete", {"name": user}), ("auth/role/delete", {"role": ROLE_PREFIX + user})):
        try:
            store.client.call(path, body, f"deleting {user}'s etcd access")
        except EtcdError as exc:
            if "not found" not in exc.message:
                raise


def _add_user(client, user, password):
    """Create the user, or set its password if it differs (a change logs its sessions out)."""
    if _ignore_exists(client, "auth/user/add", {"name": user, "password": password}, f"creating etcd user {user}"):
        return
    if not _password_matches(client, user, password):
        client.call("auth/user/changepw", {"name": user, "password": password}, f"setting the password of {user}")


def _password_matches(client, user, password):
    """Whether etcd authenticates user with password: False for a wrong one, or while
    authentication is off (then setting it again is harmless). etcd checks it before its
    apply loop, unlike a user add."""
    probe = EtcdClient([client.url], ca_cert=client.ca_cert)
    try:
        probe.call("auth/authenticate", {"name": user, "password": password}, "checking a password")
        return True
    except (EtcdError, PermissionDenied):
        return False
    finally:
        probe.close()


def _role_perms(client, role):
    """{(permType, key, range_end)} of an etcd role (base64 keys, as the v3 gateway gives
    them; a READ permission is the enum's default, which its JSON leaves out), or None when
    there is no such role."""
    got = _get(client, "auth/role/get", {"role": role}, f"reading role {role}")
    if got is None:
        return None
    return {(p.get("permType", "READ"), p.get("key", ""), p.get("range_end", "")) for p in got.get("perm") or []}


def _user_roles(client, user):
    """The roles of an etcd user, or None when there is no such user."""
    got = _get(client, "auth/user/get", {"name": user}, f"reading etcd user {user}")
    return None if got is None else list(got.get("roles") or [])


def _get(client, path, body, what):
    """The answer of an etcd auth read, or None when it names no such user or role."""
    try:
        return client.call(path, body, what)
    except EtcdError as exc:
        if "not found" in exc.message:
            return None
        raise


def _ignore_exists(client, path, body, what):
    """True when created, False when it already existed."""
    try:
        client.call(path, body, what)
        return True
    except EtcdError as exc:
        if _EXISTS in exc.message:
            return False
        raise


def _perm_range(prefix):
    return range_of(prefix)


def user_password_as(user):
    """Read or create ~user/.pcocc/.etcd-password with the user's ids (root calls this)."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PcoccError(f"no unix user {user!r}") from None
    path = user_password_path(entry.pw_dir)
    if entry.pw_uid == os.getuid():
        return read_or_create_password(path)
    candidate = new_password()  # here: once it is the user, the child may not read the stdlib to import
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the user for good, do one thing, exit
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os.umask(0o077)
            reply, status = "ok " + read_or_create_password(path, candidate), 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            reply = f"error {getattr(exc, 'strerror', None) or exc}"
        finally:
            os.write(w, reply.encode())
            os._exit(status)
    os.close(w)
    with os.fdopen(r) as f:
        reply = f.read()
    os.waitpid(pid, 0)
    if not reply.startswith("ok "):
        raise PermissionDenied(f"cannot read or create {path} as {user}: {reply.removeprefix('error ')}")
    return reply[3:]
