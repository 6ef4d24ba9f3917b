"""The etcd v3 store, through etcd's HTTP/JSON gateway (/v3/...).

No gRPC and no protobuf: a small client on http.client, one kept-alive
connection per store object. Semantics are sqlite.py's, with one difference
that etcd imposes: a ttl is a lease, counted in whole seconds (at least the
server's minimum, 1 s with a 100 ms election timeout, 2 s with the default
1 s) and reaped up to about half a second late.

Keys and values travel base64-encoded (the gateway's encoding of bytes);
int64 fields come back as strings; false, zero and empty fields are omitted.
"""

import base64
import json
import math
import random
import threading
import time

from pcocc.errors import NotAvailableError, PermissionDenied
from pcocc.store import Follower, Store, StoreError, check_transaction, decode, diff, encode

TIMEOUT = 10.0  # seconds for one request (etcd answers in milliseconds when healthy)
ELECTION_RETRY = 20.0  # seconds a request is retried while etcd elects a leader (several election timeouts)
CONNECT_TIMEOUT = 3.0  # a dead member costs this much before the next is tried
WATCH_SETUP = 5.0  # seconds a Follower's watch may take to be created (then it reads the prefix instead)

# gRPC status codes the gateway returns in {"code": ...}
_INVALID_ARGUMENT, _ALREADY_EXISTS, _PERMISSION_DENIED, _FAILED_PRECONDITION, _UNAUTHENTICATED = 3, 6, 7, 9, 16


class EtcdError(StoreError):
    """etcd refused a request; `code` is its gRPC status code."""

    def __init__(self, message, code=None, hint=None):
        super().__init__(message, hint)
        self.code = code


class EtcdLost(StoreError):
    """The member a request went to closed the connection, failed or did not answer: another
    member may (EtcdClient.call sends the request to each member in turn).

    Whether the lost request was applied is unknown, so a write sent again is applied at least
    once: a compare-and-swap applied the first time fails its compare (Store.update and the
    pools read again: their functions are idempotent), a create of a key the first attempt
    made reports it existed, a delete that was done reports nothing deleted, a lease grant
    may leave an extra lease to expire. Every caller in pcocc tolerates these (the review of
    2026-11-30 checked the allocator, the drive locks and the job id counter, which may skip
    a number)."""


def _b64(text):
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text):
    return base64.b64decode(text).decode()


def prefix_end(prefix):
    """The range_end (bytes) that selects every key starting with prefix (bytes)."""
    raw = bytearray(prefix)
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # with key "\0": every key
    raw[-1] += 1
    return bytes(raw)


def range_of(prefix):
    """The {"key", "range_end"} fields (base64) that select every key starting with prefix (str)."""
    raw = prefix.encode()
    return {"key": _b64(raw or b"\0"), "range_end": _b64(prefix_end(raw))}  # etcd rejects an empty key


_range_of = range_of


def endpoint_urls(settings):
    """The client URLs from batch.yaml settings: a host, host:port or a full URL each."""
    proto, port = settings.get("etcd-protocol") or "http", settings.get("etcd-client-port") or 2379
    urls = []
    for server in settings.get("etcd-servers") or []:
        if "://" in server:
            urls.append(server.rstrip("/"))
        elif server.count(":") == 1:  # host:port (an IPv6 address needs [..]:port or a URL)
            urls.append(f"{proto}://{server}")
        else:
            urls.append(f"{proto}://[{server}]:{port}" if ":" in server else f"{proto}://{server}:{port}")
    return urls


class EtcdClient:
    """POSTs JSON to /v3/<path> on the first etcd endpoint that answers.

    Endpoints are shuffled once (to spread clients over members) and the one
    that answered is kept; a connection error moves to the next, also in the middle of a
    request (EtcdLost: the request is sent to the next member, each at most once). With a user,
    a token from /v3/auth/authenticate goes in every request; it is renewed
    when etcd says it is invalid (expired, or another member: simple tokens
    are per member).
    """

    def __init__(self, urls, *, ca_cert=None, user=None, password=None, timeout=TIMEOUT):
        if not urls:
            raise StoreError("no etcd server configured", hint="list them in batch.yaml settings.etcd-servers")
        import random

        self.urls = list(urls)
        random.shuffle(self.urls)
        self.ca_cert = ca_cert
        self.user, self.password = user, password
        self.timeout = timeout
        self._current = 0
        self._conn = None
        self._token = None
        self._ssl = None
        self._lock = threading.RLock()

    @property
    def url(self):
        return self.urls[self._current]

    def set_credentials(self, user, password):
        with self._lock:
            self.user, self.password, self._token = user, password, None

    def close(self):
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- connections
    def _connect(self, url, timeout):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port or 2379, timeout=timeout, context=self._ssl_context())
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 2379, timeout=timeout)
        else:
            raise StoreError(f"bad etcd URL {url}: the protocol must be http or https")
        conn.timeout = min(timeout, CONNECT_TIMEOUT)
        conn.connect()  # here, so that a dead endpoint is told apart from a failed request
        conn.sock.settimeout(timeout)
        return conn

    def _ssl_context(self):
        if self._ssl is None:
            import ssl

            try:
                self._ssl = ssl.create_default_context(cafile=self.ca_cert)
            except (OSError, ssl.SSLError) as exc:
                raise StoreError(f"cannot load the etcd CA certificate {self.ca_cert}: {_reason(exc)}", hint="check settings.etcd-ca-cert in batch.yaml") from None
        return self._ssl

    def _open(self, timeout):
        """A new connection to the current endpoint, or the next ones in turn."""
        failures = []
        for i in range(len(self.urls)):
            index = (self._current + i) % len(self.urls)
            try:
                conn = self._connect(self.urls[index], timeout)
            except OSError as exc:
                failures.append(f"{self.urls[index]}: {_reason(exc)}")
                continue
            if index != self._current:
                self._current, self._token = index, None
            return conn
        raise StoreError(
            f"cannot reach etcd at {'; '.join(failures)}",
            hint="check that etcd runs and settings.etcd-servers/etcd-client-port/etcd-protocol in batch.yaml",
        )

    # -- requests
    def call(self, path, body, what=None):
        """The JSON answer of POST /v3/<path>; etcd's refusals raise EtcdError (PermissionDenied for access).

        While the members elect a leader (a member died: etcd answers "leader changed" or
        "no leader", for up to an election timeout or two), the request is sent again, to
        the next member, with randomized backoff, for up to ELECTION_RETRY seconds. A
        compare-and-swap that was applied before such an answer then fails its compare,
        which Store.update and the pools treat as a conflict and read again.
        """
        deadline = time.monotonic() + ELECTION_RETRY
        pause = 0.1
        lost = 0  # members in a row whose connection failed during this request
        while True:
            try:
                return self._call_once(path, body, what)
            except EtcdLost:
                # a member killed or hung mid-request (an etcd of 3 goes on with 2): the next one
                # is asked, each at most once; as after an election, a compare-and-swap that was
                # applied before the loss fails its compare the second time (read again)
                lost += 1
                if lost >= len(self.urls):
                    raise
            except EtcdError as exc:
                if not _electing(exc.message) or time.monotonic() > deadline:
                    raise
            with self._lock:
                self.close()
                self._current = (self._current + 1) % len(self.urls)
                self._token = None  # tokens are per member
            time.sleep(random.uniform(pause / 2, pause))
            pause = min(2.0, pause * 2)

    def _call_once(self, path, body, what):
        with self._lock:
            for attempt in (0, 1):
                if self.user and self._token is None and path != "auth/authenticate":
                    self._authenticate()
                try:
                    return self._request(path, body)
                except EtcdError as exc:
                    if attempt == 0 and exc.code == _UNAUTHENTICATED and self.user:
                        self._token = None  # expired, or minted by another member
                        continue
                    if attempt == 0 and "revision of auth store is old" in exc.message and self.user:
                        self._token = None  # minted before an account or role changed (another node's setup)
                        continue
                    raise self._explain(exc, what) from None

    def _request(self, path, body):
        import http.client

        data = json.dumps(body).encode()
        for attempt in (0, 1):
            fresh = self._conn is None
            if fresh:
                self._conn = self._open(self.timeout)
                if self.user and self._token is None and path != "auth/authenticate":
                    self._authenticate()  # another member: tokens are per member
            try:
                self._conn.request("POST", f"/v3/{path}", data, self._headers())
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if fresh or attempt:  # a kept-alive connection may have been closed while idle: retry once
                    hint = "if etcd serves https, set settings.etcd-protocol: https" if self.url.startswith("http:") else None
                    raise EtcdLost(f"etcd at {self.url} closed the connection: {_reason(exc)}", hint=hint) from None
            except TimeoutError:
                self.close()
                raise EtcdLost(f"etcd at {self.url} did not answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise EtcdLost(f"etcd at {self.url}: {_reason(exc)}") from None
        return self._answer(resp.status, raw)

    def _answer(self, status, raw):
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise StoreError(f"{self.url} does not answer like etcd v3 (HTTP {status}: {raw[:80]!r})")
        if status != 200 or "error" in answer:
            message = answer.get("message") or answer.get("error") or f"HTTP {status}"
            raise EtcdError(message.removeprefix("etcdserver: "), answer.get("code"))
        return answer

    def _headers(self):
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        return headers

    def _authenticate(self):
        try:
            self._token = self._request("auth/authenticate", {"name": self.user, "password": self.password})["token"]
        except EtcdError as exc:
            if "authentication is not enabled" in exc.message:
                self._token = ""  # nothing to send
                return
            raise self._explain(exc, None) from None

    def _explain(self, exc, what):
        """A message for a person: who was refused what, and what to do."""
        text = exc.message
        who = f"user {self.user}" if self.user else "an anonymous client"
        if exc.code == _PERMISSION_DENIED:
            return PermissionDenied(f"etcd at {self.url} denies {what or 'this request'} to {who}")
        if "authentication failed" in text:
            return PermissionDenied(
                f"etcd at {self.url} rejected the password of user {self.user}",
                hint="the node setup registers your password (~/.pcocc/.etcd-password) when you run a job; ask an administrator if this persists",
            )
        if "user name is empty" in text:
            return PermissionDenied(f"etcd at {self.url} requires authentication", hint="set settings.etcd-auth-type: password in batch.yaml")
        return EtcdError(f"etcd at {self.url} refused {what or 'a request'}: {text}", exc.code)

    # -- watch
    def watch(self, prefix, start_revision, deadline, setup=None):
        """Yield each batch of events on prefix from start_revision, until deadline (then return).

        setup: seconds etcd may take to create the watch, past deadline if need be (a loaded
        etcd); with it, an empty batch is yielded once etcd confirmed the watch, so that the
        caller tells "no change until deadline" from "not watched at all"."""
        first_deadline = max(deadline, time.monotonic() + setup) if setup else deadline
        with self._lock:
            before = self._current
            conn = self._open(max(0.1, first_deadline - time.monotonic()))
            if self._current != before:
                self.close()  # the main connection follows to the member that answered
            if self.user and self._token is None:
                self._authenticate()
            headers = self._headers()
        body = {"create_request": {**_range_of(prefix), "start_revision": str(start_revision)}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body).encode(), headers)
            resp = conn.getresponse()
            if resp.status != 200:
                self._answer(resp.status, resp.read())
            created = False
            while True:
                remaining = (deadline if created else first_deadline) - time.monotonic()
                if remaining <= 0:
                    return
                conn.sock.settimeout(remaining)
                line = resp.readline()
                if not line:
                    raise StoreError(f"etcd at {self.url} ended a watch")
                message = json.loads(line)
                if "error" in message:  # the gateway's in-stream error
                    raise EtcdError(str(message["error"].get("message", message["error"])), message["error"].get("grpc_code"))
                result = message.get("result") or {}
                if result.get("canceled"):
                    reason = result.get("cancel_reason", "")
                    if "permission denied" in reason:
                        raise PermissionDenied(f"etcd at {self.url} denies watching {prefix} to user {self.user or '(anonymous)'}")
                    raise EtcdError(f"etcd at {self.url} cancelled a watch on {prefix}: {reason or 'compacted'}")
                if result.get("created") and not created:
                    created = True
                    if setup:
                        yield []
                if result.get("events"):
                    yield result["events"]
        except TimeoutError:
            return
        except EtcdError as exc:
            raise self._explain(exc, f"watching {prefix}") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"etcd at {self.url}: watch failed: {_reason(exc)}") from None
        finally:
            conn.close()  # cancels the watch on the server


class EtcdFollower(Follower):
    """Follower through etcd's watch: each `changes` watches from the revision after the last
    change seen and takes the first batch of events (every change since, up to etcd's batch
    size), so that nothing is read twice. A watch that fails (a member went away, the history
    was compacted) is replaced by one read of the whole prefix, whose difference is returned."""

    def __init__(self, store, prefix):
        super().__init__(store, prefix)
        self.items, self.revision = store._range(prefix)

    def changes(self, timeout):
        deadline = time.monotonic() + timeout
        created, events = False, None
        try:
            watch = self.store.client.watch(self.prefix, self.revision + 1, deadline, setup=WATCH_SETUP)
            try:
                for batch in watch:
                    if batch:
                        events = batch
                        break
                    created = True  # etcd watches: what comes until deadline is every change
            finally:
                watch.close()  # closes its connection: the watch ends on the server
        except PermissionDenied:
            raise
        except StoreError:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            return self._read_again()
        if events is None and not created:  # etcd did not even confirm the watch (loaded): read it all
            return self._read_again()
        changed = {}
        for event in events or ():
            kv = event["kv"]
            changed[_unb64(kv["key"])] = None if event.get("type") == "DELETE" else _value(kv)
            self.revision = max(self.revision, int(kv.get("mod_revision", 0)))
        return self._apply(changed)

    def _read_again(self):
        items, self.revision = self.store._range(self.prefix)
        changed = diff(self.items, items)
        self.items = items
        return changed


def _electing(message):
    """Whether an etcd refusal means the members are electing a leader (a transient state)."""
    # etcd's ErrLeaderChanged, ErrNoLeader, ErrTimeoutDueToLeaderFail and ErrTimeout (server/etcdserver/errors.go)
    return any(t in message for t in ("leader changed", "no leader", "request timed out"))


def _reason(exc):
    """'connection refused' rather than '[Errno 111] Connection refused'."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if getattr(exc, "verify_message", None):
        return f"TLS certificate verify failed: {exc.verify_message}"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return str(text)[:1].lower() + str(text)[1:]


def _value(kv):
    try:
        return decode(_unb64(kv.get("value", "")))
    except ValueError:  # written by another tool
        raise StoreError(f"etcd key {_unb64(kv['key'])} does not hold JSON") from None


class EtcdStore(Store):
    def __init__(self, urls, *, ca_cert=None, user=None, password=None, timeout=TIMEOUT):
        self.client = EtcdClient(urls, ca_cert=ca_cert, user=user, password=password, timeout=timeout)

    def _call(self, path, body, what):
        return self.client.call(path, body, what)

    def _range(self, prefix, stale_ok=False):
        # serializable: served by the member asked, without a ReadIndex round through the
        # leader (etcd.io/docs/v3.4/learning/api, "Range": linearizable by default)
        body = {**_range_of(prefix), **({"serializable": True} if stale_ok else {})}
        answer = self._call("kv/range", body, f"reading {prefix}")
        items = {_unb64(kv["key"]): _value(kv) for kv in answer.get("kvs", [])}
        return items, int(answer["header"]["revision"])

    def get(self, key, stale_ok=False):
        body = {"key": _b64(key), **({"serializable": True} if stale_ok else {})}
        answer = self._call("kv/range", body, f"reading {key}")
        kvs = answer.get("kvs")
        return _value(kvs[0]) if kvs else None

    def range(self, prefix, stale_ok=False):
        return self._range(prefix, stale_ok)[0]

    def _put_op(self, key, value, ttl):
        op = {"key": _b64(key), "value": _b64(encode(value))}
        if ttl:
            op["lease"] = self._lease(key, ttl)
        return op

    def _lease(self, key, ttl):
        # one lease per key: keys never share an expiry
        answer = self._call("lease/grant", {"TTL": str(max(1, math.ceil(ttl)))}, f"a lease for {key}")
        return answer["ID"]

    def put(self, key, value, ttl=None):
        self._call("kv/put", self._put_op(key, value, ttl), f"writing {key}")

    def delete(self, key):
        return int(self._call("kv/deleterange", {"key": _b64(key)}, f"deleting {key}").get("deleted", 0)) > 0

    def delete_prefix(self, prefix):
        return int(self._call("kv/deleterange", _range_of(prefix), f"deleting {prefix}").get("deleted", 0))

    def _txn(self, key, compare, success):
        body = {"compare": [{"key": _b64(key), **compare}], "success": [success], "failure": [{"request_range": {"key": _b64(key)}}]}
        answer = self._call("kv/txn", body, f"updating {key}")
        if answer.get("succeeded"):
            return True, None
        kvs = answer["responses"][0]["response_range"].get("kvs") or [None]
        return False, kvs[0]

    def create(self, key, value, ttl=None):
        return self._txn(key, {"target": "CREATE", "result": "EQUAL", "create_revision": "0"}, {"request_put": self._put_op(key, value, ttl)})[0]

    def replace(self, key, old, new):
        op = {"request_delete_range": {"key": _b64(key)}} if new is None else {"request_put": self._put_op(key, new, None)}
        if old is None:
            return self._txn(key, {"target": "CREATE", "result": "EQUAL", "create_revision": "0"}, op)[0]
        done, current = self._txn(key, {"target": "VALUE", "result": "EQUAL", "value": _b64(encode(old))}, op)
        if done or current is None or _value(current) != old:
            return done
        # Equal as JSON but not as bytes (1 vs 1.0, written by another tool): pin the revision we compared.
        return self._txn(key, {"target": "MOD", "result": "EQUAL", "mod_revision": current["mod_revision"]}, op)[0]

    def transact(self, expect, writes, reads=()):
        """Store.transact as one etcd txn (etcd.io/docs/v3.4/learning/api, "Transaction"):
        an absent key is compared as create_revision == 0, a value by its bytes; success puts
        and deletes then ranges the reads, failure ranges every expected and read key, all
        at the revision the compares saw. A value equal as JSON but not as bytes (written by
        another tool) is compared again by its mod_revision, as `replace` does."""
        check_transaction(expect, writes, reads)
        compares = [{"key": _b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"} if v is None
                    else {"key": _b64(k), "target": "VALUE", "result": "EQUAL", "value": _b64(encode(v))}
                    for k, v in expect.items()]
        done, current, kvs = self._transact(compares, writes, reads, expect)
        if done or not expect:
            return done, current
        if not all((k not in kvs) if v is None else (k in kvs and current[k] == v) for k, v in expect.items()):
            return False, current
        # every expectation holds as JSON: pin what was compared by revision
        compares = [{"key": _b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"} if v is None
                    else {"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": kvs[k]["mod_revision"]}
                    for k, v in expect.items()]
        return self._transact(compares, writes, reads, expect)[:2]

    def _transact(self, compares, writes, reads, expect):
        """(done, {key: value} of the reads, and of the expected keys on failure, {key: kv} of those found)."""
        success = [{"request_delete_range": {"key": _b64(k)}} if v is None else {"request_put": self._put_op(k, v, None)}
                   for k, v in writes.items()]
        success += [{"request_range": {"key": _b64(k)}} for k in reads]
        failed_reads = list(dict.fromkeys([*expect, *reads]))
        failure = [{"request_range": {"key": _b64(k)}} for k in failed_reads]
        what = f"updating {len(writes)} keys from {next(iter(writes))}" if writes else "a transaction"
        answer = self._call("kv/txn", {"compare": compares, "success": success, "failure": failure}, what)
        done = bool(answer.get("succeeded"))
        names = list(reads) if done else failed_reads
        answers = answer.get("responses", [])[-len(names):] if names else []
        kvs = {}
        for key, response in zip(names, answers):
            found = (response.get("response_range") or {}).get("kvs")
            if found:
                kvs[key] = found[0]
        return done, {key: _value(kvs[key]) if key in kvs else None for key in names}, kvs

    def revision(self):
        # status needs no key permission, unlike a range
        return int(self._call("maintenance/status", {}, "the store's revision")["header"]["revision"])

    def follow(self, prefix):
        """Store.follow through an etcd watch: the prefix is read once, then only its changes."""
        return EtcdFollower(self, prefix)

    def wait(self, prefix, predicate, timeout, poll=None):
        """Like Store.wait, woken by an etcd watch instead of polling; the prefix is read once,
        then only what changes (predicate still sees every key, sorted)."""
        deadline = time.monotonic() + timeout
        follower = self.follow(prefix)
        while True:
            items = dict(sorted(follower.items.items()))
            if predicate(items):
                return items
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            follower.changes(remaining)

    def close(self):
        self.client.close()


def open_etcd(settings, env, credentials=None):
    """The EtcdStore of batch.yaml settings, with the caller's credentials.

    credentials: for settings.etcd-auth-type password, a callable env -> (etcd user,
    password) (pcocc.store.etcdauth.credentials: this module knows nothing of where
    passwords live, so that etcdauth, which builds on this client, sits above it).
    Raises NotAvailableError for an auth type that is not supported, StoreError when
    password auth is asked for and no credentials callable is given.
    """
    auth = settings.get("etcd-auth-type") or "none"
    user = password = None
    if auth == "password":
        if credentials is None:
            raise StoreError("settings.etcd-auth-type is password but no credentials were given to open_etcd")
        user, password = credentials(env)
    elif auth == "munge":
        raise NotAvailableError("settings.etcd-auth-type: munge is not supported yet", hint="use etcd-auth-type: password")
    ca = settings.get("etcd-ca-cert") if settings.get("etcd-protocol") == "https" else None
    return EtcdStore(endpoint_urls(settings), ca_cert=ca, user=user, password=password)
