"""The authenticated control endpoint of a VM, and its client.

The process that runs a VM (``pcocc internal run``) serves a ``ControlServer``;
``pcocc exec/reset/monitor-cmd/dump`` are its clients.  Both sides authenticate
with mutual TLS against the cluster's CA (see ``pki``), and the server obeys the
cluster owner only: the CN of the client certificate must be the owner's name.

Protocol: one JSON object per line each way, any number of requests per
connection, each answered in order::

    -> {"op": "exec", "args": {"argv": ["hostname"]}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "message", "kind": "permission|notfound|timeout|usage|error"}

An op NAME (``[a-z][a-z0-9_]*``) calls ``handler.op_NAME(**args)``; whatever that
returns must be JSON-serialisable and becomes ``result``.

A *streaming* op (its method decorated with ``@streaming``) answers with any number of
events before its final answer, and the client may send messages while it runs::

    -> {"op": "exec_stream", "args": {"argv": [...], "stdin": true}}
    <- {"ok": true, "more": true, "event": {"started": true, ...}}
    -> {"stdin_b64": "..."}                  (only after the first event)
    <- {"ok": true, "more": true, "event": {"out_b64": "..."}}
    <- {"ok": true, "result": {...}}         (or an error answer, as above)

The method gets a ``Stream`` as its ``stream`` argument: ``stream.send(event)`` sends an
event, ``stream.receive(timeout)`` returns the client's next message (a JSON object) or
None, and raises ClientGone once the client closed its side.  The client sends nothing
before the first event (so that no message of its sits in the server's request buffer),
and a streaming op is the last request of its connection: the server closes it after the
final answer.  ``ControlClient.stream`` is the client's side.  Bytes travel as base64
strings under keys ending in ``_b64`` (``stdout_b64``, ``input_b64``): use
``encode_bytes`` and ``decode_bytes`` on both sides.  A PcoccError raised by the
handler is sent with its message (and ``"hint"`` if it has one), and its kind
from its class; any other exception becomes "internal error: ...".  The client
raises PermissionDenied, NotFoundError, TimeoutExpired, UsageError or AgentError from the kind.

A handler method that takes a keyword argument named ``session`` gets the
``Session`` of the request's connection (a request may not send that argument):
``session.present()`` tells whether the client is still connected (a long
operation polls it, and gives up once the client left: Ctrl-C, SIGKILL, a lost
node).

Who may hold a connection (file descriptors are the resource a stranger could
exhaust before any authentication):

* A peer whose socket lives in this host's network namespace (loopback, or this
  node's address) is a local process: the kernel knows its uid.  At accept, before
  any TLS and before a thread is given to it, its socket is looked up with
  ``sock_diag`` (the netlink interface behind ``ss``; ``/proc/net/tcp`` as a
  fallback) and the connection is reset unless that uid is ours (the VM process runs
  as the cluster owner).  Another user's flood thus costs one accept and one lookup
  per connection and holds nothing: the owner always gets through.
* A remote peer (its socket is not in this namespace) is authenticated by mutual TLS
  as before; until its handshake is done it is *pending*.  At most ``max_pending``
  connections are pending: a new one evicts the oldest pending one, and each has
  ``HANDSHAKE_TIMEOUT`` seconds.  An idle flood cannot lock the owner out (the
  owner's handshake takes milliseconds, while the flood's idle connections are the
  oldest); a remote attacker opening connections faster than ``max_pending`` per
  handshake can delay the owner, which is what any TLS service accepts.
* Authenticated connections are not bounded: only the owner holds one (a certificate
  of this cluster's CA with another CN is refused at its first request).
* The unix socket (``unix_path``, optional; in the VM's private run dir, 0700 and the
  owner's): the same protocol without TLS, for the host's relay (``agent.relay``).  At
  accept the peer's credentials (``SO_PEERCRED``, socket(7)) are read and the connection
  is closed unless its uid is one of ``local_uids`` (the owner's): the kernel vouches for
  the peer as TLS does for a remote one, so its requests are the owner's.

Usage::

    server = ControlServer(handler, ca_pem=ca, cert_pem=cert, key_pem=key, owner="alice", host=ip).start()
    with ControlClient(server.address, ca_pem=ca, cert_pem=ucert, key_pem=ukey) as client:
        client.call("ping")
"""

import base64
import collections
import contextlib
import errno
import functools
import inspect
import ipaddress
import json
import logging
import os
import re
import select
import socket
import ssl
import struct
import threading
import time

from pcocc.errors import ExitStatus, NotFoundError, PcoccError, PermissionDenied, TimeoutExpired, UsageError

log = logging.getLogger(__name__)

MAX_LINE = 256 * 1024 * 1024  # one request or answer; handlers should cap command output below this
HANDSHAKE_TIMEOUT = 10.0  # a peer that connects and says nothing must not hold a thread for ever
MAX_PENDING = 64  # connections of remote peers not yet authenticated; more evict the oldest
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about refused local peers
DEFAULT_TIMEOUT = 60.0
_OP_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_KINDS = ((PermissionDenied, "permission"), (NotFoundError, "notfound"), (TimeoutExpired, "timeout"), (UsageError, "usage"))
# the client's exception for each kind (anything else: AgentError)
_KIND_ERRORS = {"permission": PermissionDenied, "notfound": NotFoundError, "timeout": TimeoutExpired, "usage": UsageError}


class AgentError(PcoccError):
    """The control endpoint of a VM could not be reached, or refused or failed a request."""

    status = ExitStatus.EXTERNAL


class ClientGone(AgentError):
    """The client of a request closed its connection (Ctrl-C, killed, node lost) before the answer."""


def streaming(method):
    """Marks an ``op_*`` method as a streaming op (see the module's docstring): it takes a
    ``stream`` argument, given by the server, and its connection ends with its answer."""
    method.streaming = True
    return method


class _Channel:
    """JSON lines over a connected (TLS) socket, with a receive that waits at most a given time.

    One thread at a time: OpenSSL does not allow a TLS connection to be read and written
    concurrently, so the thread that sends also polls for what the peer sent.
    """

    def __init__(self, sock, buffered=b""):
        self.sock = sock
        self._buf = bytearray(buffered)
        self.closed = False  # the peer closed its side

    def fileno(self):
        return self.sock.fileno()

    def send(self, obj):
        self.sock.sendall(_encode(obj))

    def ready(self):
        """True when a receive() would not wait: a whole line, bytes TLS decrypted, or the end."""
        return b"\n" in self._buf or self.closed or (hasattr(self.sock, "pending") and self.sock.pending() > 0)

    def receive(self, timeout):
        """The next JSON object from the peer, or None after timeout seconds (0: do not wait,
        None: wait as long as it takes).

        Raises ClientGone when the peer closed the connection, AgentError for a line that is
        not a JSON object or longer than MAX_LINE.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    raise AgentError("bad message: not a JSON object")
                return obj
            if len(self._buf) > MAX_LINE:
                raise AgentError(f"message larger than {MAX_LINE} bytes")
            if self.closed:
                raise ClientGone("the other end closed the connection")
            pending = self.sock.pending() if hasattr(self.sock, "pending") else 0
            if not pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                # poll, not select: a process serving thousands of connections (a host relay,
                # the bench's simulated hosts) has descriptors above select's 1024
                poller = select.poll()
                poller.register(self.sock, select.POLLIN)
                try:
                    ready = poller.poll(None if remaining is None else int(remaining * 1000 + 0.999))
                except InterruptedError:
                    ready = []
                if not ready:
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    continue
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                raise ClientGone(f"the connection failed: {e.strerror or e}") from None
            finally:
                self.sock.setblocking(True)
            if data == b"":
                self.closed = True
            elif data:
                self._buf += data
            elif deadline is not None and time.monotonic() >= deadline:
                return None


class Stream:
    """A streaming op's side of its connection (see the module's docstring)."""

    def __init__(self, channel):
        self._channel = channel
        self.used = False  # given to a streaming op

    def send(self, event):
        """Sends one event (a JSON-serialisable dict) to the client; raises ClientGone if it left."""
        try:
            self._channel.send({"ok": True, "more": True, "event": event})
        except (OSError, ValueError) as e:
            raise ClientGone(f"the client left: {e}") from None

    def receive(self, timeout=0.0):
        """The client's next message (a dict), or None after timeout seconds; raises ClientGone."""
        return self._channel.receive(timeout)

    def fileno(self):
        """The connection's socket, for select() beside other files (look at ready() first:
        TLS may hold a decrypted message that select does not see)."""
        return self._channel.fileno()

    def ready(self):
        """True when receive(0) has something (a message buffered, or the client's end)."""
        return self._channel.ready()


class Session:
    """The connection a request came on, as its handler sees it (see the module's docstring)."""

    def __init__(self, sock, peer):
        self.peer = peer
        self._fd = sock.fileno()
        self._lock = threading.Lock()
        self._closed = False

    def present(self):
        """True while the client has not closed (or reset) its side of the connection.

        A non-blocking poll for POLLRDHUP/POLLHUP/POLLERR on the connection's socket:
        no data is read, so a request the client sends meanwhile is not lost.
        """
        with self._lock:
            if self._closed:
                return False
            try:
                events = select.poll()
                events.register(self._fd, select.POLLRDHUP)
                return not any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                               for _fd, ev in events.poll(0))
            except (OSError, ValueError):
                return False

    def check(self, what="the request"):
        """Raises ClientGone once the client left."""
        if not self.present():
            raise ClientGone(f"{what} was abandoned: its client closed the connection")

    def _close(self):
        with self._lock:
            self._closed = True


def encode_bytes(data):
    """Bytes to the str sent in JSON under a ``*_b64`` key."""
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text):
    """The bytes sent in JSON under a ``*_b64`` key."""
    return base64.b64decode(text, validate=True)


class ControlServer:
    """Serves the ``op_*`` methods of ``handler`` to the cluster owner over mutual TLS.

    One thread accepts, and each connection gets a thread of its own: handler
    methods may run concurrently and must be thread-safe.
    """

    def __init__(self, handler, *, ca_pem, cert_pem, key_pem, owner, host="127.0.0.1", port=0,
                 max_pending=MAX_PENDING, local_uids=None, avoid=(), unix_path=None):
        """local_uids: the uids of local peers let through to TLS, and to the unix socket
        (default: this process's effective uid only); max_pending: remote connections not yet
        authenticated; avoid: [(min, max)] ports a kernel-picked port must not be in
        (pcocc.listen: the node's reverse-NAT ranges, whose DNAT rules would take its
        connections); unix_path: also serve on a unix socket there (its directory must be
        private: see the module's docstring); ``self.unix_path`` is None after start() when
        it could not be bound (e.g. longer than 107 bytes): TLS only then."""
        self._avoid = list(avoid)
        self.unix_path = unix_path
        self._unix = None  # its listening socket
        self.handler = handler
        self.owner = owner
        self.max_pending = max_pending
        self.local_uids = frozenset({os.geteuid()} if local_uids is None else local_uids)
        self._pending = collections.OrderedDict()  # thread -> TLS socket still in its handshake, oldest first
        self.refused = 0  # connections of local peers of another uid, reset at their accept
        self.evicted = 0  # pending connections cut to make room
        self._refusal_logged = None
        self._ctx = _context(ssl.PROTOCOL_TLS_SERVER, ca_pem, cert_pem, key_pem)
        self._bind = (host, port)
        self._listener = None
        self._accepter = None
        self._conns = {}  # thread -> its TLS socket, so that stop() can cut it
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a request is answered
        self._busy = 0  # requests being served
        self._stopping = False
        self.address = None

    def __repr__(self):
        return f"<ControlServer {_where(self.address or self._bind)} owner={self.owner}>"

    def start(self):
        from pcocc.listen import listen_outside

        self._listener = listen_outside(self._bind[0], self._avoid, self._bind[1], what="serve the VM's control endpoint")
        self.address = self._listener.getsockname()[:2]
        self._accepter = threading.Thread(target=self._accept_loop, name=f"pcocc-control-{self.address[1]}", daemon=True)
        self._accepter.start()
        if self.unix_path:
            self._start_unix()
        return self

    def _start_unix(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)  # a former VM process's, left by a SIGKILL
            sock.bind(self.unix_path)
            os.chmod(self.unix_path, 0o600)  # the directory is private already: a second lock
            sock.listen(128)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte; OSError: too long, no dir
            sock.close()
            log.warning("control endpoint %s: no unix socket at %s (%s): the relay reaches this VM by TLS", _where(self.address), self.unix_path, e)
            self.unix_path = None
            return
        self._unix = sock
        t = threading.Thread(target=self._accept_unix, name=f"pcocc-control-unix-{self.address[1]}", daemon=True)
        self._unix_accepter = t
        t.start()

    def _accept_unix(self):
        try:
            while True:
                try:
                    conn, _ = self._unix.accept()
                except OSError:
                    if self._stopping:
                        return
                    log.exception("control endpoint %s: accept on the unix socket failed", _where(self.address))
                    time.sleep(0.1)
                    continue
                try:
                    pid, uid, _gid = peer_credentials(conn)
                except OSError:
                    uid = pid = None
                if uid not in self.local_uids:
                    self.refused += 1
                    log.warning("control endpoint %s: refused a connection on its unix socket from uid %s (pid %s)", _where(self.address), uid, pid)
                    conn.close()
                    continue
                with self._lock:
                    if self._stopping:
                        conn.close()
                        return
                    t = threading.Thread(target=self._serve, args=(conn, ("unix", pid)), kwargs={"tls": False},
                                         name=f"pcocc-control-unix-{pid}", daemon=True)
                    self._conns[t] = conn
                t.start()
        finally:
            self._unix.close()

    def stop(self, timeout=5.0, drain=3.0):
        """Closes the listening socket, lets the requests being served answer (for up to
        ``drain`` seconds: e.g. a checkpoint's stop, whose VM is gone when it answers), then
        closes every connection and joins the threads.

        A handler method still running keeps its thread until it returns: this
        waits ``timeout`` seconds for them, then leaves them (they are daemons).
        Safe to call twice.
        """
        with self._lock:
            self._stopping = True
            # shutdown() wakes the threads blocked in accept() and recv() (close() alone does
            # not, on Linux); under the lock, so a thread cannot close its socket meanwhile
            _cut(self._listener)
            if self._unix is not None:
                _cut(self._unix)
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_path)
            self._idle.wait_for(lambda: self._busy == 0, timeout=drain)
            threads = [t for t in (self._accepter, getattr(self, "_unix_accepter", None)) if t] + list(self._conns)
            for sock in self._conns.values():
                _cut(sock)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in threads if t.is_alive()]
        if busy:
            log.warning("control endpoint %s stopped with %d requests still running", _where(self.address), len(busy))

    def _accept_loop(self):
        try:
            while True:
                try:
                    raw, peer = self._listener.accept()
                except OSError:
                    if self._stopping:
                        return
                    log.exception("control endpoint %s: accept failed", _where(self.address))
                    time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                    continue
                if not self._admit(raw, peer):
                    continue
                raw.settimeout(HANDSHAKE_TIMEOUT)
                try:  # no I/O yet: the handshake runs in the connection's own thread
                    conn = self._ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                except OSError:
                    raw.close()
                    continue
                with self._lock:
                    if self._stopping:
                        conn.close()
                        return
                    while len(self._pending) >= self.max_pending:
                        _oldest, victim = self._pending.popitem(last=False)
                        _cut(victim)  # its thread sees the end of its handshake, and cleans up
                        self.evicted += 1
                    t = threading.Thread(target=self._serve, args=(conn, peer), name=f"pcocc-control-{_where(peer)}", daemon=True)
                    self._conns[t] = conn
                    self._pending[t] = conn
                t.start()
        finally:
            self._listener.close()

    def _admit(self, raw, peer):
        """False (and the connection reset) for a local peer of another uid."""
        try:
            uid = local_peer_uid(raw)
        except OSError as e:  # cannot tell: treated as remote (TLS and the pending bound apply)
            log.debug("control endpoint %s: cannot look up the peer %s: %s", _where(self.address), _where(peer), e)
            return True
        if uid is None or uid in self.local_uids:
            return True
        self.refused += 1
        now = time.monotonic()
        if self._refusal_logged is None or now - self._refusal_logged > REFUSAL_LOG_INTERVAL:
            self._refusal_logged = now  # a flood must not fill the VM's log
            log.warning("control endpoint %s: refused connections of local uid %s (%d so far)", _where(self.address), uid, self.refused)
        try:  # a reset, not a close: no TIME_WAIT entry per refused connection
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        raw.close()
        return False

    def _serve(self, conn, peer, tls=True):
        rfile = None
        session = None
        try:
            if tls:
                try:
                    conn.do_handshake()
                finally:
                    with self._lock:
                        self._pending.pop(threading.current_thread(), None)
            conn.settimeout(None)  # an authenticated client may stay idle between requests
            session = Session(conn, peer)
            # a unix peer's uid was checked at accept (SO_PEERCRED): it is the owner
            cn = _common_name(conn.getpeercert()) if tls else self.owner
            log.debug("control endpoint %s: %s connected as %r", _where(self.address), _where(peer), cn)
            rfile = conn.makefile("rb")
            while line := rfile.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    conn.sendall(_encode(_error_response(AgentError(f"request larger than {MAX_LINE} bytes"))))
                    break
                with self._lock:
                    self._busy += 1
                try:
                    stream = Stream(_Channel(conn))
                    conn.sendall(self._respond(line, cn, session, stream))
                finally:
                    with self._lock:
                        self._busy -= 1
                        self._idle.notify_all()
                if stream.used:
                    break  # a streaming op is the last request of its connection
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; ValueError: socket cut by stop()
            if not self._stopping:  # a flood of failed handshakes must not fill the VM's log
                (log.info if session is not None else log.debug)(
                    "control endpoint %s: connection from %s ended: %s", _where(self.address), _where(peer), e)
        finally:
            if session is not None:
                session._close()  # before the socket goes: its fd may be reused
            with self._lock:
                if rfile:
                    rfile.close()  # else conn.close() would leave the descriptor open
                conn.close()
                self._conns.pop(threading.current_thread(), None)
                self._pending.pop(threading.current_thread(), None)

    def _respond(self, line, cn, session=None, stream=None):
        """The answer line to one request line: never raises."""
        try:
            response = {"ok": True, "result": self._dispatch(line, cn, session, stream)}
        except PcoccError as e:
            response = _error_response(e)
        except Exception as e:  # a bug in one op must not take the VM's endpoint down
            log.exception("control endpoint %s: request failed", _where(self.address))
            response = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}", "kind": "error"}
        try:
            return _encode(response)
        except (TypeError, ValueError) as e:
            log.error("control endpoint %s: result is not JSON: %s", _where(self.address), e)
            return _encode({"ok": False, "error": f"internal error: result is not JSON-serialisable: {e}", "kind": "error"})

    def _dispatch(self, line, cn, session=None, stream=None):
        if cn != self.owner:  # checked first: a stranger's request is not even parsed
            raise PermissionDenied(f"permission denied: this VM belongs to {self.owner}")
        try:
            request = json.loads(line)
        except ValueError:
            raise AgentError("bad request: not a JSON object") from None
        if not isinstance(request, dict):
            raise AgentError("bad request: not a JSON object")
        op, args = request.get("op"), request.get("args", {})
        if not isinstance(op, str) or not _OP_NAME.match(op):
            raise AgentError(f"bad request: invalid op {op!r}")
        if not isinstance(args, dict):
            raise AgentError(f"bad request: the args of {op!r} must be an object")
        method = getattr(self.handler, f"op_{op}", None)
        if method is None:
            raise AgentError(f"unknown operation {op!r}")
        for given in ("session", "stream"):
            if given in args:
                raise AgentError(f"bad arguments for {op!r}: {given!r} is given by the server")
        signature = _signature(getattr(method, "__func__", method))
        if "session" in signature.parameters:
            args = {**args, "session": session}
        if getattr(method, "streaming", False):
            if stream is None:
                raise AgentError(f"{op!r} is a streaming op")
            stream.used = True
            args = {**args, "stream": stream}
        try:  # a wrong argument is the caller's error, not an internal one
            signature.bind(None, **args) if hasattr(method, "__func__") else signature.bind(**args)
        except TypeError as e:
            raise AgentError(f"bad arguments for {op!r}: {e}") from None
        log.debug("control endpoint %s: %s", _where(self.address), op)
        return method(**args)


class ControlClient:
    """A connection to the control endpoint of one VM; connects at the first call.

    Calls from several threads are serialised: use one client per thread to run them in parallel.
    """

    def __init__(self, address, *, ca_pem, cert_pem, key_pem, timeout=DEFAULT_TIMEOUT):
        self.address = (address[0], int(address[1]))
        self.timeout = timeout
        self._ctx = _client_context(ca_pem, cert_pem, key_pem)
        self._sock = self._rfile = None
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<ControlClient {_where(self.address)}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        if self._sock:
            return
        where = _where(self.address)
        try:
            raw = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as e:
            raise AgentError(f"cannot reach the control endpoint at {where}: {e.strerror or e}") from None
        try:
            self._sock = self._ctx.wrap_socket(raw)  # the handshake, within self.timeout
        except OSError as e:
            raw.close()
            raise self._failure(e) from None
        self._rfile = self._sock.makefile("rb")

    def set_timeout(self, timeout):
        """Seconds to wait for each answer from now on (None: as long as it takes)."""
        with self._lock:
            self.timeout = timeout
            if self._sock is not None:
                self._sock.settimeout(timeout)

    def close(self):
        for f in (self._rfile, self._sock):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        self._sock = self._rfile = None

    def call(self, op, /, **args):
        """Runs ``op`` on the VM and returns its result; raises from the error kind."""
        request = _encode({"op": op, "args": args})
        with self._lock:
            self.connect()
            try:
                self._sock.sendall(request)
                line = self._rfile.readline(MAX_LINE + 1)
            except TimeoutError:
                self.close()  # its late answer would be taken for the next request's
                raise TimeoutExpired(f"no answer from the control endpoint at {_where(self.address)} to {op!r} within {self.timeout:g} s") from None
            except OSError as e:
                self.close()
                raise self._failure(e) from None
            if not line.endswith(b"\n"):
                self.close()
                what = "closed the connection" if not line else "sent an answer too large or cut"
                raise AgentError(f"the control endpoint at {_where(self.address)} {what}")
        try:
            response = json.loads(line)
            ok, error, kind = response["ok"], response.get("error"), response.get("kind")
        except (ValueError, TypeError, KeyError):
            raise AgentError(f"the control endpoint at {_where(self.address)} sent an invalid answer") from None
        if response.get("more"):  # the op streams: leaving ends it on the server's side
            self.close()
            raise AgentError(f"{op!r} is a streaming op: call it with stream()")
        if ok:
            return response.get("result")
        cls = _KIND_ERRORS.get(kind, AgentError)
        raise cls(str(error), response.get("hint"))

    def open(self, op, /, **args):
        """Sends the request ``op`` and returns its ClientStream at once, without waiting for
        an answer (the caller receives it: ``agent.relay``'s loop, over many connections).
        A plain op's answer comes as the stream's result.  The connection is the stream's."""
        with self._lock:
            self.connect()
            channel = _Channel(self._sock)
            try:
                channel.send({"op": op, "args": args})
            except OSError as e:
                self.close()
                raise self._failure(e) from None
        return ClientStream(self, channel)

    def stream(self, op, /, **args):
        """Starts the streaming op ``op`` and returns its ClientStream, once its first event came
        (raises from the error kind if the op failed before any event).  The connection is the
        stream's: close the client when it is done."""
        stream = self.open(op, **args)
        kind, value = stream.receive(self.timeout)
        if kind is None:
            self.close()
            raise TimeoutExpired(f"no answer from the control endpoint at {_where(self.address)} to {op!r} within {self.timeout:g} s")
        if kind == "result":
            stream.first = None
            stream.result = value
        else:
            stream.first = value
        return stream

    def _failure(self, e):
        where = _where(self.address)
        if isinstance(e, ssl.SSLError):
            # with TLS 1.3 the server judges our certificate after our handshake is done,
            # so its refusal can surface at the first read as well as here
            reason = getattr(e, "verify_message", None) or (e.reason or "").lower().replace("_", " ") or str(e)
            return AgentError(f"TLS failure with the control endpoint at {where}: {reason}",
                              "Are the certificates those of this virtual cluster?")
        if isinstance(e, TimeoutError):
            return AgentError(f"cannot reach the control endpoint at {where}: timed out")
        return AgentError(f"connection to the control endpoint at {where} failed: {e.strerror or e}")


class UnixClient(ControlClient):
    """A connection to a VM's endpoint on its unix socket (same protocol, no TLS): the host
    relay's (``agent.relay``) way to the VMs of its own host.  The server checks our uid
    (SO_PEERCRED); we trust the socket as it lies in the owner's private run dir."""

    def __init__(self, path, *, timeout=DEFAULT_TIMEOUT):
        self.address = ("unix", path)
        self.path = path
        self.timeout = timeout
        self._sock = self._rfile = None
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<UnixClient {self.path}>"

    def connect(self):
        if self._sock:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (OSError, ValueError) as e:
            sock.close()
            raise AgentError(f"cannot reach the control endpoint at {self.path}: {getattr(e, 'strerror', None) or e}") from None
        self._sock = sock
        self._rfile = sock.makefile("rb")

    def _failure(self, e):
        if isinstance(e, TimeoutError):
            return AgentError(f"no answer from the control endpoint at {self.path}: timed out")
        return AgentError(f"connection to the control endpoint at {self.path} failed: {e.strerror or e}")


class ClientStream:
    """The client's side of a streaming op (ControlClient.stream): first is its first event,
    receive() the next ones, send() a message to the op, result its final result."""

    def __init__(self, client, channel):
        self.client = client
        self._channel = channel
        self.first = None
        self.result = None
        self.done = False

    def fileno(self):
        return self._channel.fileno()

    def ready(self):
        """True when receive(0) has something (a line decrypted and buffered, or the end)."""
        return self._channel.ready()

    def send(self, message):
        """Sends a message (a JSON object) to the op; raises AgentError if the connection failed."""
        try:
            self._channel.send(message)
        except OSError as e:
            raise self.client._failure(e) from None

    def receive(self, timeout=0.0):
        """("event", dict), ("result", value) at the end, or (None, None) after timeout seconds.

        Raises PermissionDenied, NotFoundError, TimeoutExpired or AgentError for an error
        answer (from its kind), AgentError when the endpoint closed the connection first.
        """
        where = _where(self.client.address)
        try:
            msg = self._channel.receive(timeout)
        except ClientGone:
            self.done = True
            raise AgentError(f"the control endpoint at {where} closed the connection") from None
        if msg is None:
            return None, None
        if msg.get("more") is True and msg.get("ok") is True and isinstance(msg.get("event"), dict):
            return "event", msg["event"]
        self.done = True
        if msg.get("ok") is True:
            self.result = msg.get("result")
            return "result", self.result
        if msg.get("ok") is False:
            cls = _KIND_ERRORS.get(msg.get("kind"), AgentError)
            raise cls(str(msg.get("error")), msg.get("hint"))
        raise AgentError(f"the control endpoint at {where} sent an invalid answer")


# ---- who is at the other end of a connection of this host --------------------------------------

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t, uid_t, gid_t (socket(7), SO_PEERCRED)


def peer_credentials(sock):
    """(pid, uid, gid) of the process that connected the unix socket sock, as the kernel
    recorded them at its connect() (socket(7), SO_PEERCRED); raises OSError."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_TCP_ESTABLISHED = 1
_NOCOOKIE = 0xFFFFFFFF


def local_peer_uid(sock):
    """The uid owning the other end of the TCP connection sock, when that end is a socket of
    this host's network namespace (a local process); None when it is not (a remote peer).

    A peer socket that is no longer established (it closed, or is in TIME_WAIT, whose
    uid the kernel does not keep) gives -1: never one of ours.  Raises OSError when
    neither sock_diag nor /proc/net/tcp can answer.  Source: linux/inet_diag.h (an
    exact lookup by 4-tuple, as ``ss`` does) and proc(5) for /proc/net/tcp.
    """
    ours = sock.getsockname()[:2]
    peer = sock.getpeername()[:2]
    family, ours_ip, peer_ip = _family_and_ips(ours[0], peer[0])
    try:
        return _sock_diag_uid(family, peer_ip, peer[1], ours_ip, ours[1])
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        log.debug("sock_diag failed (%s): reading /proc/net/tcp", e)
    return _proc_net_tcp_uid(family, peer_ip, peer[1], ours_ip, ours[1])


def _family_and_ips(ours, peer):
    a, b = ipaddress.ip_address(ours), ipaddress.ip_address(peer)
    if a.version == 6 and a.ipv4_mapped and b.version == 6 and b.ipv4_mapped:
        a, b = a.ipv4_mapped, b.ipv4_mapped
    return (socket.AF_INET if a.version == 4 else socket.AF_INET6), a, b


def _sock_diag_uid(family, src, sport, dst, dport):
    addr = lambda ip: ip.packed.ljust(16, b"\0")  # noqa: E731
    sockid = struct.pack("!HH16s16s", sport, dport, addr(src), addr(dst)) + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    length, kind = struct.unpack_from("=IH", data, 0)
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, 16)[0]
        raise OSError(code, os.strerror(code))
    if kind != _SOCK_DIAG_BY_FAMILY or length < 16 + 72:
        raise OSError(errno.EPROTO, "unexpected sock_diag answer")
    state = data[17]
    uid = struct.unpack_from("=I", data, 16 + 4 + 48 + 12)[0]
    return uid if state == _TCP_ESTABLISHED else -1


def _proc_net_tcp_uid(family, src, sport, dst, dport):
    def hexaddr(ip, port):
        packed = ip.packed
        # each 32-bit word in host order (little-endian here), then the port in hex
        words = "".join(f"{struct.unpack('=I', packed[i:i + 4])[0]:08X}" for i in range(0, len(packed), 4))
        return f"{words}:{port:04X}"

    needle = f" {hexaddr(src, sport)} {hexaddr(dst, dport)} ".encode()
    path = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(needle)
    if at < 0:
        return None
    fields = data[at:data.find(b"\n", at)].split()
    # fields: local rem st tx:rx tr:when retrnsmt uid ...
    return int(fields[6]) if int(fields[2], 16) == _TCP_ESTABLISHED else -1


def _context(protocol, ca_pem, cert_pem, key_pem):
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        # The address comes from the cluster's trusted state store and the server must
        # hold a certificate of this cluster's own CA: that is the check that matters,
        # and VM endpoints move between nodes, so names are not matched.
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=_text(ca_pem))  # the cluster's CA only, not the system's
        _load_chain(ctx, _bytes(cert_pem) + b"\n" + _bytes(key_pem))
    except ssl.SSLError as e:
        raise AgentError(f"invalid TLS credentials for the control endpoint: {e.reason or e}") from None
    return ctx


@functools.lru_cache(maxsize=256)
def _signature(function):
    """inspect.signature of a handler's function, once per process (about 0.1 ms a call,
    twice per request before: a host relay serves thousands of requests per fan-out)."""
    return inspect.signature(function)


@functools.lru_cache(maxsize=8)
def _client_context(ca_pem, cert_pem, key_pem):
    """The client's TLS context for these credentials, made once per process: loading them
    costs about 1.2 ms (measured here), paid per connection before; an SSLContext serves
    many connections and threads (a fan-out opens hundreds: agent.relay)."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, ca_pem, cert_pem, key_pem)


def _load_chain(ctx, pem):
    # ssl loads a certificate and key from a file only: give it an anonymous in-memory
    # file, so that the key never lands on a disk (pcocc runs on Linux only)
    fd = os.memfd_create("pcocc-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _common_name(cert):
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _error_response(e):
    kind = next((k for cls, k in _KINDS if isinstance(e, cls)), "error")
    response = {"ok": False, "error": e.message, "kind": kind}
    if e.hint:
        response["hint"] = e.hint
    return response


def _cut(sock):
    # socket.socket.shutdown, not SSLSocket's: only the kernel socket is touched, and
    # the thread that owns the TLS session sees an end of file
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _encode(obj):
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


def _where(address):
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(pem):
    return pem.decode("ascii") if isinstance(pem, bytes) else pem


def _bytes(pem):
    return pem.encode("ascii") if isinstance(pem, str) else pem
