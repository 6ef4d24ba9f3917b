"""`pcocc ps` and `pcocc cancel` in-process, on the real local backend and store, with stand-in
supervisors (sleep processes: cancel's SIGTERM ends them, and the backend reclaims the rest)."""

import json
import os
import signal
import socket
import subprocess

import pytest

from pcocc import state
from pcocc.errors import ExitStatus
from pcocc.procs import process_start
from pcocc.store.sqlite import SqliteStore

HOST = socket.gethostname().split(".")[0]


class Site:
    def __init__(self, cli, root):
        self.cli, self.root = cli, root
        res = root / "resv"
        res.mkdir()
        res.chmod(0o1777)
        cli.write("etc/batch.yaml", f"type: local\nsettings: {{store: sqlite, store-path: {root}/state.db, reservation-dir: {res}}}\n")
        cli.write("user/templates.yaml", "tiny:\n  image: r:tiny\n")
        cli.environ.update(PCOCC_RUN_DIR=str(root / "run"), PCOCC_NODE_STATE_DIR=str(root / "node"))
        self.procs = []

    def store(self):
        return SqliteStore(str(self.root / "state.db"))

    def add(self, jobid, name, n_vms=2, vm_state="running", ports=None):
        """A running cluster: its records, a stand-in supervisor process, its VMs on this host."""
        proc = subprocess.Popen(["sleep", "300"])
        self.procs.append(proc)
        rundir = self.root / f"job_{jobid}"
        rundir.mkdir()
        prefix = state.cluster_prefix("tester", jobid)
        info = {"jobid": jobid, "name": name, "owner": "tester", "definition": f"tiny:{n_vms}", "state": "running", "host": HOST,
                "created": 1.0, "started": 2.0, "rundir": str(rundir), "vms": [{"rank": r} for r in range(n_vms)],
                "supervisor": proc.pid, "supervisor_start": process_start(proc.pid)}
        s = self.store()
        s.put(prefix + "info", info)
        for r in range(n_vms):
            s.put(prefix + f"vms/{r}", {"rank": r, "name": f"vm{r}", "state": vm_state, "host": HOST})
        if ports:
            s.put(prefix + f"nodes/{HOST}", {"state": "complete", "objects": {"net": {"address": "10.0.0.1", "vm_port": 22,
                                             "vms": {str(r): {"host_port": p} for r, p in ports.items()}}}})
        s.close()
        return proc

    def __call__(self, *argv):
        return self.cli(*argv)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


@pytest.fixture
def site(cli, tmp_path):
    s = Site(cli, tmp_path)
    yield s
    s.close()


def test_ps_has_a_host_column_filters_and_noheader(site):
    site.add(1, "alpha")
    site.add(2, "beta", n_vms=1, vm_state="starting")
    r = site("ps")
    assert r.status == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["JOBID", "NAME", "USER", "HOST", "DEFINITION", "VMS", "STATE", "DURATION"]
    assert lines[2].split()[:4] == ["1", "alpha", "tester", HOST]
    assert [l.split()[0] for l in site("ps", "--noheader").stdout.splitlines()] == ["1", "2"]
    assert [x["jobid"] for x in site("ps", "--json", "-j", "2").json] == [2]
    assert [x["jobid"] for x in site("ps", "--json", "-j", "1,2").json] == [1, 2]
    assert [x["jobid"] for x in site("ps", "--json", "-n", "alpha").json] == [1]
    assert [x["jobid"] for x in site("ps", "--json", "-t", "RUNNING").json] == [1, 2]
    assert site("ps", "--json", "-t", "ending").json == []
    assert site("ps", "--noheader", "-o", "jobid,host").stdout.split() == ["1", HOST, "2", HOST]


def test_ps_json_keeps_its_keys(site):
    site.add(1, "alpha")
    (row,) = site("ps", "--json").json
    assert {"jobid", "name", "user", "host", "definition", "vms", "state", "vm_states", "errors", "duration"} <= set(row)
    assert row["vms"] == 2 and row["vm_states"] == {"vm0": "running", "vm1": "running"} and row["hosts"] == [HOST]


def test_ps_vms_shows_each_vm_with_host_state_uptime_and_ssh_port(site):
    site.add(1, "alpha", ports={0: 40022})
    r = site("ps", "--vms")
    assert r.status == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["JOBID", "VM", "HOST", "STATE", "UPTIME", "SSH", "AGENT"]
    assert lines[2].split()[:4] == ["1", "vm0", HOST, "running"] and lines[2].split()[5] == "40022"
    assert lines[3].split()[5] == "-"
    assert "\x1b[" not in r.stdout  # not a terminal: no colour
    rows = site("ps", "--vms", "--json").json
    assert [(v["vm"], v["host"], v["state"], v["ssh_port"]) for v in rows] == [("vm0", HOST, "running", 40022), ("vm1", HOST, "running", None)]
    assert all(isinstance(v["uptime"], int) for v in rows)


def test_ps_vms_is_in_colour_on_a_terminal_only(site, monkeypatch):
    import io

    from pcocc.cli.core import run

    site.add(1, "alpha")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    env = site.cli.env()
    env.stdout = Tty()
    assert run(["ps", "--vms"], env) == 0
    assert "\x1b[32mrunning\x1b[0m" in env.stdout.getvalue()
    env = site.cli.env()
    env.stdout, env.environ["NO_COLOR"] = Tty(), "1"
    run(["ps", "--vms"], env)
    assert "\x1b[" not in env.stdout.getvalue()


def test_ps_all_shows_other_users_from_the_host_reservations(site):
    site.add(1, "alpha")
    proc = subprocess.Popen(["sleep", "300"])
    site.procs.append(proc)
    # another user's reservation, as hostres writes it (its file's owner says whose it is)
    (site.root / "resv" / "pcocc-resv.4242.x.json").write_text(json.dumps(
        {"/tmp/pcocc-4242/job_7": {"owners": [[proc.pid, process_start(proc.pid)]], "cores": [[0], [1]], "memory_mb": 512}}))
    os.chown(site.root / "resv" / "pcocc-resv.4242.x.json", 4242, 4242)
    rows = site("ps", "-a", "--json").json
    assert [(r["jobid"], r["user"]) for r in rows] == [(1, "tester"), (7, "4242")] and rows[1]["vms"] == 2
    assert [r["jobid"] for r in site("ps", "--json").json] == [1]


def test_ps_h_is_help_and_bad_format_is_a_usage_error(site):
    assert site("ps", "-h").stdout.startswith("Usage:")
    r = site("ps", "-o", "jobid,hots")
    assert r.status == ExitStatus.USAGE and "did you mean 'host'" in r.stderr


@pytest.mark.parametrize("argv", [("cancel", "1", "2"), ("cancel", "-j", "1", "-j", "2"), ("cancel", "-j", "1,2"), ("cancel", "--all")])
def test_cancel_stops_every_cluster_named(site, argv):
    site.add(1, "alpha")
    site.add(2, "beta")
    site.add(3, "gamma")
    r = site(*argv)
    assert r.status == 0, r.stderr
    left = [x["jobid"] for x in site("ps", "--json").json]
    assert left == ([] if "--all" in argv else [3])
    hist = site("history", "--json").json
    assert {h["jobid"] for h in hist} == ({1, 2, 3} if "--all" in argv else {1, 2})
    assert all(h["state"] == "CANCELLED" and h["reason"] == "cancelled by tester" for h in hist)


def test_cancel_without_a_job_lists_the_clusters(site):
    site.add(1, "alpha")
    site.add(2, "beta")
    r = site("cancel")
    assert r.status == ExitStatus.USAGE, r.stderr
    assert "1 (alpha), 2 (beta)" in r.stderr and len(r.stderr.splitlines()) == 1
    assert len(site("ps", "--json").json) == 2


def test_cancel_stops_the_known_and_reports_the_unknown(site):
    site.add(1, "alpha")
    r = site("cancel", "1", "9")
    assert r.status == ExitStatus.NOT_FOUND and "job id 9" in r.stderr
    assert site("ps", "--json").json == []
    assert site("cancel", "--all").status == 0  # nothing to stop is not an error
    assert site("cancel", "--all", "-j", "1").status == ExitStatus.USAGE


BROKEN = "tiny:\n  image: r:tiny\n  resource-set: nope\nbad: [\n"


def test_a_broken_templates_yaml_does_not_stop_commands_that_do_not_need_it(site):
    site.add(1, "alpha")
    site.add(2, "beta")
    site.cli.write("user/templates.yaml", "tiny:\n  image: r:tiny\n  imagee: typo\n")
    for argv in (("ps",), ("ps", "--vms"), ("history",), ("image", "list"), ("cancel", "2")):
        r = site(*argv)
        assert r.status == 0, (argv, r.stderr)
        (warning,) = [l for l in r.stderr.splitlines() if l.startswith("pcocc: warning: ")]
        assert warning.startswith("pcocc: warning: the templates were ignored: 1 problem(s)"), r.stderr
        assert "templates.yaml:3" in warning and "config validate" in warning
    r = site("exec", "-j", "9", "hostname")  # exec (cli/access.py) gets it from the context: not a config error
    assert r.status == ExitStatus.NOT_FOUND, r.stderr
    for argv in (("template", "list"), ("batch", "tiny:1"), ("config", "show")):
        r = site(*argv)
        assert r.status == ExitStatus.CONFIG, (argv, r.stderr)
        assert r.stderr.startswith("pcocc: error: ") and "tiny.imagee" in r.stderr and "warning" not in r.stderr, r.stderr
    assert [x["jobid"] for x in site("ps", "--json").json] == [1]


def test_config_validate_still_reports_every_problem(site):
    site.cli.write("user/templates.yaml", "tiny:\n  image: r:tiny\n  imagee: typo\nother:\n  inherits: ghost\n")
    r = site("config", "validate")
    assert r.status == ExitStatus.CONFIG
    errors = [l for l in r.stderr.splitlines() if l.startswith("pcocc: error: ")]
    assert any("tiny.imagee" in l for l in errors) and any("ghost" in l for l in errors)
    r = site("config", "validate", "--json")
    assert r.status == ExitStatus.CONFIG
    data = r.json
    assert data["valid"] is False and len(data["problems"]) == 2
    first = data["problems"][0]
    assert set(first) == {"file", "line", "key", "message"}
    assert first["file"].endswith("templates.yaml") and first["line"] == 3 and first["key"] == "tiny.imagee"
    assert data["problems"][1]["key"] == "other.inherits" and "ghost" in data["problems"][1]["message"]
    site.cli.write("user/templates.yaml", "tiny:\n  image: r:tiny\n")
    r = site("config", "validate", "--json")
    assert r.status == 0 and r.json["valid"] is True and r.stderr == ""


def test_a_broken_batch_yaml_still_stops_every_command(site):
    site.cli.write("etc/batch.yaml", "type: nope\n")
    assert site("ps").status == ExitStatus.CONFIG
