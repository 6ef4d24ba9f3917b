"""A real etcd for tests: one member on loopback, free ports, a temporary data dir.

`etcd_server` (session scope) is shared by the tests that keep auth off; tests
that turn auth on or need TLS start their own with `start_etcd`. Every server
is stopped through its own Popen (its pid), never by name.
"""

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
SKIP_REASON = "etcd is not installed (Debian etcd-server; scripts/setup installs it)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, proc, url, data_dir, log, started_in, ca=None):
        self.proc, self.url, self.data_dir, self.log, self.started_in, self.ca = proc, url, data_dir, log, started_in, ca

    def settings(self, **extra):
        """batch.yaml settings that point at this server."""
        host_port = self.url.split("://")[1]
        host, port = host_port.rsplit(":", 1)
        out = {"store": "etcd", "etcd-servers": [host], "etcd-client-port": int(port), "etcd-protocol": self.url.split(":")[0],
               "etcd-auth-type": "none", "etcd-ca-cert": str(self.ca) if self.ca else None}
        out.update(extra)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_etcd(workdir, *, cert=None, key=None, ca=None, timeout=15):
    """Start one etcd member under workdir; with cert/key/ca (paths), clients use https."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scheme = "https" if cert else "http"
    for _attempt in range(3):  # a free port may be taken between the probe and etcd's bind
        client, peer = free_port(), free_port()
        url = f"{scheme}://127.0.0.1:{client}"
        data_dir = workdir / f"data-{client}"
        log = workdir / f"etcd-{client}.log"
        argv = [ETCD, "--name", "t", "--data-dir", str(data_dir),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"t=http://127.0.0.1:{peer}",
                "--heartbeat-interval=10", "--election-timeout=100", "--logger=zap", "--log-outputs=stderr"]  # fmt: skip
        if cert:
            argv += ["--cert-file", str(cert), "--key-file", str(key)]  # --trusted-ca-file would demand client certificates
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = EtcdServer(proc, url, data_dir, log, 0.0, ca)
        if _ready(server, started + timeout):
            server.started_in = time.monotonic() - started
            return server
        server.stop()
        if "address already in use" not in log.read_text(errors="replace"):
            break
    raise RuntimeError(f"etcd did not become ready; its log: {log}\n{log.read_text(errors='replace')[-2000:]}")


def _ready(server, deadline):
    context = None
    if server.ca:
        import ssl

        context = ssl.create_default_context(cafile=str(server.ca))
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=1, context=context) as resp:
                if b'"true"' in resp.read():
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    print(f"etcd ready in {server.started_in:.2f} s at {server.url}")
    yield server
    server.stop()
