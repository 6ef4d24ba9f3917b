"""One etcd member on 127.0.0.1 and the bridge address (nodes cannot reach the host's loopback)."""

import json
import time
import urllib.request
from pathlib import Path

from pcocc.errors import TimeoutExpired
from pcocc.testcluster import proc

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start(state, base, layout):
    d = Path(base) / "etcd"
    d.mkdir(exist_ok=True)
    client = f"http://{layout.host_ip}:{layout.etcd_port}"
    peer = f"http://{layout.host_ip}:{layout.etcd_peer_port}"
    return proc.spawn(
        state, "etcd",
        ["etcd", "--name", "tc", "--data-dir", d / "data",
         # short raft timers: healthy in ~0.1 s instead of ~1 s
         "--heartbeat-interval=10", "--election-timeout=100", "--log-level=warn",
         "--listen-client-urls", f"{client},http://127.0.0.1:{layout.etcd_port}",
         "--advertise-client-urls", client,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"tc={peer}", "--initial-cluster-state", "new",
         "--initial-cluster-token", f"pcocc-testcluster-{layout.id}"],
        d / "etcd.log",
    )


def wait(base, layout, process, timeout=30):
    url = f"http://127.0.0.1:{layout.etcd_port}/health"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _NO_PROXY.open(url, timeout=1) as r:
                if json.loads(r.read()).get("health") == "true":
                    return
        except (OSError, ValueError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise TimeoutExpired(f"etcd is not healthy at {url}: {proc.tail(Path(base) / 'etcd' / 'etcd.log')}")
        time.sleep(0.01)
