"""Private networks on the real test cluster (SLURM harness, OVS userspace datapath, VXLAN).

1. Node setup and teardown time per job, against the number of VMs per node and the
   number of nodes, for L2 and L3 `ethernet` networks: `pcocc internal setup create`
   then `delete` run on every node of a job at once, as the SPANK plugin does (a
   cluster record is written for the job; no VM boots: node setup does not need one).
   Figures: the slowest node's wall time, median of BENCH_REPS runs.
2. Throughput across nodes: VM to VM over the job's L3 network (HTTP with busybox
   in the guests, which run under TCG here), against node to node over the same
   underlay (a Python socket pair in the two node namespaces), in one run.

Run as root with the venv's python: .venv/bin/python bench/network.py
"""

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report

PCOCC = os.path.join(os.path.dirname(sys.executable), "pcocc")
REPS = int(os.environ.get("BENCH_REPS", "3"))
NODES = [int(n) for n in os.environ.get("BENCH_NODES", "1,2,4").split(",")]
PER_NODE = [int(n) for n in os.environ.get("BENCH_PER_NODE", "1,2,4,8").split(",")]
FAKE_JOB = 990000
BLOB_MB = 32


def root_store(tc):
    from pcocc.config.loader import load_config
    from pcocc.env import Environment
    from pcocc.store import open_store

    env = Environment(environ={**os.environ, **tc.env}, user="root", home="/root")
    return open_store(load_config(env), env)


def on_nodes(tc, nodes, argv_of):
    """Run argv_of(node) on each node at once; the slowest one's wall time."""
    def one(node):
        t0 = time.perf_counter()
        r = subprocess.run([*tc.enter_argv(node), *argv_of(node)], env={**os.environ, **tc.env, **tc.node_env(node)},
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"{node}: {' '.join(argv_of(node))}: {r.stderr}")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(len(nodes)) as pool:
        return max(pool.map(one, nodes))


def setup_scaling(tc, user):
    store = root_store(tc)
    rows, job = [], FAKE_JOB
    try:
        for rset in ("l2net", "l3net"):
            for n_nodes in NODES:
                nodes = tc.node_names[:n_nodes]
                for per_node in PER_NODE:
                    create, delete = [], []
                    for _ in range(REPS):
                        job += 1
                        prefix = f"/pcocc/users/{user.pw_name}/clusters/{job}/"
                        vms = [{"rank": r, "settings": {"resource-set": rset}} for r in range(n_nodes * per_node)]
                        store.put(prefix + "info", {"jobid": job, "vms": vms})
                        ranks = {node: ",".join(str(i * per_node + k) for k in range(per_node)) for i, node in enumerate(nodes)}
                        create.append(on_nodes(tc, nodes, lambda node: [PCOCC, "internal", "setup", "create", "-j", str(job),
                                                                        "--uid", str(user.pw_uid), "--ranks", ranks[node],
                                                                        "--nodes", ",".join(nodes)]))
                        delete.append(on_nodes(tc, nodes, lambda node: [PCOCC, "internal", "setup", "delete", "-j", str(job),
                                                                        "--uid", str(user.pw_uid)]))
                        store.delete_prefix(prefix)
                    row = [rset[:2].upper(), n_nodes, per_node, f"{statistics.median(create):.2f}", f"{statistics.median(delete):.2f}"]
                    print(row, flush=True)
                    rows.append(row)
    finally:
        store.close()
    return rows


def user_site(tc, user):
    """The user's templates and image repository (the tiny image)."""
    from pcocc.config.models import Repo
    from pcocc.images.build import build_image
    from pcocc.images.store import ImageStore

    image = build_image("tiny", cache_dir=os.path.expanduser("~/.cache/pcocc/images"), log=lambda l: print(l, file=sys.stderr))
    home = Path(user.pw_dir)
    (home / ".pcocc").mkdir(exist_ok=True)
    (home / ".pcocc/repos.yaml").write_text(f"repos:\n  - name: user\n    path: {home}/repo\n")
    (home / ".pcocc/templates.yaml").write_text("tiny:\n  image: user:tiny\nl3:\n  inherits: tiny\n  resource-set: l3net\n")
    boot = {"kernel": str(image.vmlinux or image.kernel), "initrd": str(image.initrd), "append": image.append}
    ImageStore([Repo("user", str(home / "repo"), "user")], user.pw_name).import_(str(image.disk), "tiny", "qcow2", boot=boot)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)


def pcocc(tc, user, *argv, timeout=600):
    env = {"HOME": user.pw_dir, "USER": user.pw_name, "PATH": f"{os.path.dirname(PCOCC)}:/usr/bin:/bin:/usr/sbin:/sbin"}
    r = tc.run([PCOCC, *argv], user=user.pw_name, env=env, timeout=timeout, cwd=user.pw_dir)
    if r.returncode != 0:
        raise SystemExit(f"pcocc {' '.join(argv)}: {r.stderr}")
    return r.stdout


def vm_to_vm(tc, user):
    """MB/s of an HTTP download from vm1 to vm0, on two nodes, over the L3 network (median of REPS)."""
    user_site(tc, user)
    jobid = pcocc(tc, user, "batch", "-N", "2", "--ntasks-per-node=1", "--mem-per-cpu=256", "--wait", "l3:2").split()[0]
    try:
        sh = lambda vm, script, timeout=300: pcocc(tc, user, "exec", "-j", jobid, "-w", f"vm{vm}", "sh", "-c", script, timeout=timeout)
        for vm in (0, 1):  # each VM's DHCP lease
            deadline = time.monotonic() + 120
            while "ip=" not in sh(vm, "cat /run/pcocc/dhcp.env 2>/dev/null; true"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"vm{vm} got no DHCP lease in 120 s")
                time.sleep(2)
        sh(1, f"mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/blob bs=1M count={BLOB_MB} 2>/dev/null && busybox httpd -p 8080 -h /tmp/www")
        rates = []
        for _ in range(REPS):
            out = sh(0, "a=$(cut -d' ' -f1 /proc/uptime); wget -q -O /dev/null http://vm1:8080/blob; b=$(cut -d' ' -f1 /proc/uptime); "
                        "echo $a $b")
            a, b = map(float, out.split())
            rates.append(BLOB_MB / max(b - a, 0.01))
        return statistics.median(rates)
    finally:
        tc.run(["scancel", jobid])


SERVER = ("import socket,sys\ns=socket.create_server((sys.argv[1],5001)); c,_=s.accept(); n=0\n"
          "while (d:=c.recv(1<<20)): n+=len(d)\nprint(n)")
CLIENT = ("import socket,sys,time\nc=socket.create_connection((sys.argv[1],5001)); b=bytes(1<<20); t=time.perf_counter()\n"
          "for _ in range(int(sys.argv[2])): c.sendall(b)\nc.shutdown(socket.SHUT_WR); c.recv(1); print(time.perf_counter()-t)")


def node_to_node(tc, megabytes=512):
    """MB/s from node1 to node2 over the tunnel underlay (median of REPS)."""
    a, b = tc.node_names[:2]
    ip_b = tc.layout.tunnel_ip(b)
    rates = []
    for _ in range(REPS):
        server = subprocess.Popen([*tc.enter_argv(b), sys.executable, "-c", SERVER, ip_b], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        out = subprocess.run([*tc.enter_argv(a), sys.executable, "-c", CLIENT, ip_b, str(megabytes)], capture_output=True,
                             text=True, check=True).stdout
        server.wait(30)
        rates.append(megabytes / float(out))
    return statistics.median(rates)


def main():
    from pcocc.testcluster.cluster import TestCluster

    base = f"/tmp/pcocc-tc-bench-{os.getpid()}"
    with TestCluster(base, nodes=max(NODES + [2]), log=lambda line: print(line, file=sys.stderr)) as tc:
        user = tc.add_user()
        rows = setup_scaling(tc, user)
        report.write("network-setup", "Node setup and teardown per job (s, slowest node, median)",
                     ["layer", "nodes", "VMs per node", "setup", "teardown"], rows,
                     {"method": "internal setup create/delete on every node of a job at once; OVS userspace datapath"})
        vm = vm_to_vm(tc, user)
        host = node_to_node(tc)
        report.write("network-throughput", "Throughput across two nodes (MB/s, median)",
                     ["path", "MB/s", "ratio"], [["node to node, underlay", f"{host:.0f}", "1.00"],
                                                 ["VM to VM, L3 network (VXLAN, TCG guests)", f"{vm:.1f}", f"{vm / host:.3f}"]],
                     {"method": f"VMs: busybox wget of {BLOB_MB} MiB from httpd; nodes: Python sockets, 512 MiB"})


if __name__ == "__main__":
    main()
