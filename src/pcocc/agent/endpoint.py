"""The authenticated control endpoint of a VM, and its client.

The process that runs a VM (``pcocc internal run``) serves a ``ControlServer``;
``pcocc exec/reset/monitor-cmd/dump`` are its clients.  Both sides authenticate
with mutual TLS against the cluster's CA (see ``pki``), and the server obeys the
cluster owner only: the CN of the client certificate must be the owner's name.

Protocol: one JSON object per line each way, any number of requests per
connection, each answered in order::

    -> {"op": "exec", "args": {"argv": ["hostname"]}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "message", "kind": "permission|notfound|timeout|error"}

An op NAME (``[a-z][a-z0-9_]*``) calls ``handler.op_NAME(**args)``; whatever that
returns must be JSON-serialisable and becomes ``result``.  Bytes travel as base64
strings under keys ending in ``_b64`` (``stdout_b64``, ``input_b64``): use
``encode_bytes`` and ``decode_bytes`` on both sides.  A PcoccError raised by the
handler is sent with its message (and ``"hint"`` if it has one), and its kind
from its class; any other exception becomes "internal error: ...".  The client
raises PermissionDenied, NotFoundError, TimeoutExpired or AgentError from the kind.

Usage::

    server = ControlServer(handler, ca_pem=ca, cert_pem=cert, key_pem=key, owner="alice", host=ip).start()
    with ControlClient(server.address, ca_pem=ca, cert_pem=ucert, key_pem=ukey) as client:
        client.call("ping")
"""

import base64
import concurrent.futures
import inspect
import json
import logging
import os
import re
import socket
import ssl
import threading
import time

from pcocc.errors import ExitStatus, NotFoundError, PcoccError, PermissionDenied, TimeoutExpired

log = logging.getLogger(__name__)

MAX_LINE = 256 * 1024 * 1024  # one request or answer; handlers should cap command output below this
HANDSHAKE_TIMEOUT = 10.0  # a peer that connects and says nothing must not hold a thread for ever
DEFAULT_TIMEOUT = 60.0
_OP_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_KINDS = ((PermissionDenied, "permission"), (NotFoundError, "notfound"), (TimeoutExpired, "timeout"))


class AgentError(PcoccError):
    """The control endpoint of a VM could not be reached, or refused or failed a request."""

    status = ExitStatus.EXTERNAL


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

    def __init__(self, handler, *, ca_pem, cert_pem, key_pem, owner, host="127.0.0.1", port=0):
        self.handler = handler
        self.owner = owner
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
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        self._listener = socket.create_server(self._bind, family=family, backlog=128)
        self.address = self._listener.getsockname()[:2]
        self._accepter = threading.Thread(target=self._accept_loop, name=f"pcocc-control-{self.address[1]}", daemon=True)
        self._accepter.start()
        return self

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
            self._idle.wait_for(lambda: self._busy == 0, timeout=drain)
            threads = [t for t in (self._accepter,) if t] + list(self._conns)
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
                    t = threading.Thread(target=self._serve, args=(conn, peer), name=f"pcocc-control-{_where(peer)}", daemon=True)
                    self._conns[t] = conn
                t.start()
        finally:
            self._listener.close()

    def _serve(self, conn, peer):
        rfile = None
        try:
            conn.do_handshake()
            conn.settimeout(None)  # an authenticated client may stay idle between requests
            cn = _common_name(conn.getpeercert())
            log.debug("control endpoint %s: %s connected as %r", _where(self.address), _where(peer), cn)
            rfile = conn.makefile("rb")
            while line := rfile.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    conn.sendall(_encode(_error_response(AgentError(f"request larger than {MAX_LINE} bytes"))))
                    break
                with self._lock:
                    self._busy += 1
                try:
                    conn.sendall(self._respond(line, cn))
                finally:
                    with self._lock:
                        self._busy -= 1
                        self._idle.notify_all()
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; ValueError: socket cut by stop()
            if not self._stopping:
                log.info("control endpoint %s: connection from %s ended: %s", _where(self.address), _where(peer), e)
        finally:
            with self._lock:
                if rfile:
                    rfile.close()  # else conn.close() would leave the descriptor open
                conn.close()
                self._conns.pop(threading.current_thread(), None)

    def _respond(self, line, cn):
        """The answer line to one request line: never raises."""
        try:
            response = {"ok": True, "result": self._dispatch(line, cn)}
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

    def _dispatch(self, line, cn):
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
        try:  # a wrong argument is the caller's error, not an internal one
            inspect.signature(method).bind(**args)
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
        self._ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ca_pem, cert_pem, key_pem)
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

    def close(self):
        for f in (self._rfile, self._sock):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        self._sock = self._rfile = None

    def call(self, op, **args):
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
        if ok:
            return response.get("result")
        cls = {"permission": PermissionDenied, "notfound": NotFoundError, "timeout": TimeoutExpired}.get(kind, AgentError)
        raise cls(str(error), response.get("hint"))

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


def call_many(targets, op, args, *, ca_pem, cert_pem, key_pem, timeout=DEFAULT_TIMEOUT, parallel=16):
    """Calls ``op(**args)`` on each VM of ``targets`` [(name, address)], ``parallel`` at a time.

    Returns {name: (True, result) or (False, error message)} in the order of
    ``targets``: one VM failing never stops the others.
    """
    def one(address):
        try:
            with ControlClient(address, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, timeout=timeout) as client:
                return True, client.call(op, **args)
        except PcoccError as e:
            return False, e.message

    targets = list(targets)
    workers = max(1, min(parallel, len(targets)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pcocc-call") as pool:
        futures = {name: pool.submit(one, address) for name, address in targets}
        return {name: f.result() for name, f in futures.items()}


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
