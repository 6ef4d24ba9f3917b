"""The remote display of a VM whose template sets `remote-display: spice` (the original pcocc's
pcocc-templates.yaml(5) and pcocc-display(1)).

qemu serves SPICE on a unix socket in the VM's private run dir, with a password (a SPICE
"ticket") read from a secret file there: the password is never on a command line. A relay in
the VM's process (`pcocc internal run`) listens on a TCP port of the node's address that the
kernel picks when it binds (port 0: two VMs of a host never clash, and nothing is probed then
released), and passes each connection on to that socket, so that remote-viewer reaches the VM
from any login node. The VM's store record carries {"protocol", "host", "port", "password"}
(display_record), readable by its owner only, as the rest of the record.

Without TLS the display (and keystrokes) cross the network in clear, as in the original; the
password itself is sent encrypted with the server's RSA key by the SPICE protocol.
"""

import contextlib
import errno
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time

from pcocc.errors import PcoccError
from pcocc.listen import listen_outside

log = logging.getLogger("pcocc.spice")

SOCKET = "spice.sock"  # in the VM's run dir: qemu listens there
PASSWORD_FILE = "spice.pw"  # in the VM's run dir, mode 0600: qemu's `-object secret,file=`
SECRET_ID = "spice-password"  # the id of that secret object on qemu's command line
PASSWORD_BYTES = 18  # 144 random bits, 24 characters (SPICE takes passwords up to 60 bytes)
_BUFFER = 256 * 1024  # bytes held per direction of a relayed connection before reading pauses


def write_password(rundir):
    """A new random password for the VM whose run dir is `rundir` (a private directory), written
    to rundir/PASSWORD_FILE with mode 0600 (an existing file, or a link there, is an OSError:
    O_EXCL). Returns it (str, URL-safe base64)."""
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    fd = os.open(os.path.join(rundir, PASSWORD_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    return password


def display_record(host, port, password):
    """What a VM's store record holds of its display ("display" key)."""
    return {"protocol": "spice", "host": host, "port": port, "password": password}


def connection_file(display, title):
    """The text of a remote-viewer connection file (virt-viewer's [virt-viewer] section, see
    remote-viewer(1) CONNECTION FILE) for `display` (a display_record). remote-viewer deletes
    the file once read (delete-this-file). `title`: the window's title, one line."""
    title = " ".join(str(title).split())
    return "\n".join([
        "[virt-viewer]",
        f"type={display['protocol']}",
        f"host={display['host']}",
        f"port={display['port']}",
        f"password={display['password']}",
        f"title={title}",
        "delete-this-file=1",
        "toggle-fullscreen=shift+f11",
        "release-cursor=shift+f12",
        "secure-attention=ctrl+alt+end",
    ]) + "\n"


MAX_PAIRS = 64  # relayed connections at once; a viewer opens about 6 (SPICE channels)


class Relay:
    """Relays each TCP connection accepted on (host, port) to the unix socket `target`, in one
    thread (a selector loop: no thread or limit per connection, so that idle connections opened
    by anyone cannot lock the owner out). The port is picked by the kernel at bind time
    (`port`=0) unless given, outside the `avoid` ranges ([(min, max)], inclusive: a port there
    is held while another is asked for, so it is not handed out again). SPICE checks the
    password itself, behind the relay. PcoccError when it cannot listen there."""

    def __init__(self, host, target, port=0, avoid=()):
        self.target = target
        self._listener = listen_outside(host, avoid, port, backlog=64, what="listen for the remote display")
        self._listener.setblocking(False)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._pairs = []  # the client ends of the relayed pairs, oldest first
        self._warned = -1e9
        self._thread = threading.Thread(target=self._loop, name="spice-relay", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        """Closes the listener and every relayed connection; idempotent."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(10)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        ends = set()
        try:
            while not self._stop:
                for key, mask in sel.select():
                    if key.fileobj is self._listener:
                        self._accept(sel, ends)
                    elif key.fileobj is not self._wake_r and not key.data.done:  # (its pair may have closed in this round)
                        key.data.ready(sel, mask)
                for end in [e for e in ends if e.done]:
                    ends.discard(end)
        except Exception:  # noqa: BLE001 - a bug here must not take the VM down: the display stops
            log.exception("spice relay")
        finally:
            for end in ends:
                end.close(sel)
            sel.close()

    def _accept(self, sel, ends):
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:  # EMFILE and the like: the connection waits in the backlog
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED):
                self._warn(f"accept: {exc.strerror}")
                time.sleep(0.1)  # no busy loop while the descriptors are out
            return
        if not self._admit(conn):
            return
        try:
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            self._warn(f"{self.target}: {exc.strerror}")
            conn.close()
            return
        try:
            inner.connect(self.target)  # qemu's socket, on this host: at once
        except OSError as exc:
            self._warn(f"{self.target}: {exc.strerror}")
            inner.close()
            conn.close()
            return
        a, b = _End(conn), _End(inner)
        a.peer, b.peer = b, a
        for end in (a, b):
            end.sock.setblocking(False)
            ends.add(end)
            end.update(sel)
        self._pairs.append(a)
        live = [p for p in self._pairs if not p.done]
        while len(live) > MAX_PAIRS:  # the oldest goes: a flood of remote peers cannot exhaust the VM's descriptors
            oldest = live.pop(0)
            oldest.close(sel)
            oldest.peer.close(sel)
        self._pairs = live

    def _admit(self, conn):
        """False (and the connection reset) for a local peer of another uid: as for the control
        endpoint, another user of this host never takes a relay slot (agent.endpoint.local_peer_uid)."""
        from pcocc.agent.endpoint import local_peer_uid

        try:
            uid = local_peer_uid(conn)
        except OSError:
            return True  # unknown: SPICE's password still stands
        if uid is None or uid == os.geteuid():
            return True
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        return False

    def _warn(self, text):
        now = time.monotonic()
        if now - self._warned > 60:  # at most a line a minute: a flood must not fill the log
            self._warned = now
            log.warning("spice relay: %s", text)


class _End:
    """One socket of a relayed pair; `out` holds what its peer read and it has still to send.
    When one end reads its end of file, what it read before still goes to the other end; then
    the pair is closed (SPICE makes no use of half-closed connections)."""

    def __init__(self, sock):
        self.sock, self.peer, self.out = sock, None, bytearray()
        self.events, self.eof, self.done = 0, False, False

    def update(self, sel):
        if self.done:
            return
        reading = not self.eof and len(self.peer.out) < _BUFFER
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if self.out else 0)
        if events == self.events:
            return
        if not events:
            sel.unregister(self.sock)
        elif not self.events:
            sel.register(self.sock, events, self)
        else:
            sel.modify(self.sock, events, self)
        self.events = events

    def ready(self, sel, mask):
        try:
            if mask & selectors.EVENT_READ:
                data = self.sock.recv(65536)
                if data:
                    self.peer.out += data
                else:
                    self.eof = True
            if mask & selectors.EVENT_WRITE and self.out:
                del self.out[:self.sock.send(self.out)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # an end failed: the pair ends
            self.close(sel)
            return
        if (self.eof and not self.peer.out) or (self.peer.eof and not self.out):
            self.close(sel)
            return
        self.update(sel)
        self.peer.update(sel)

    def close(self, sel):
        for end in (self, self.peer):
            if not end.done:
                if end.events:
                    sel.unregister(end.sock)
                end.sock.close()
                end.done, end.events = True, 0
