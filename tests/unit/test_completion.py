"""Shell completion (issue 14): click's shell completion, asked in-process as bash and zsh ask
(_PCOCC_COMPLETE=bash_complete with COMP_WORDS/COMP_CWORD, or the line up to the cursor that
pcocc's bash script sends), against a test templates.yaml, image repository and store; and
the installed bash script, sourced by a real bash."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pcocc import state
from pcocc.cli import completion
from pcocc.cli.core import COMMANDS, HIDDEN, run
from pcocc.store.sqlite import SqliteStore

TEMPLATES = "tiny:\n  image: r:tiny\n  description: a small one\ndebian:\n  image: r:deb\ntinier:\n  inherits: tiny\n"


class Site:
    """A user's world: templates, an image repository in the original's layout, and cluster records."""

    def __init__(self, cli, root):
        self.cli, self.root = cli, root
        cli.write("etc/batch.yaml", f"type: local\nsettings: {{store: sqlite, store-path: {root}/state.db}}\n")
        cli.write("user/templates.yaml", TEMPLATES)
        repo = root / "orig"
        for d in ("data", "meta"):
            (repo / d).mkdir(parents=True)
        (repo / ".config").write_text("{version: 2}\n")
        meta = {"name": "centos", "revision": 0, "kind": "vm", "owner": "alice", "timestamp": 1700000000.5,
                "data_blobs": ["0" * 64], "custom_meta": {}}
        (repo / "meta" / "centos@0").write_text(json.dumps(meta))
        cli.write("user/repos.yaml", f"repos:\n  - name: orig\n    path: {repo}\n")

    def add(self, jobid, name, n_vms):
        """A cluster's records as the backends write them (completion only reads them)."""
        s = SqliteStore(str(self.root / "state.db"))
        prefix = state.cluster_prefix("tester", jobid)
        s.put(prefix + "info", {"jobid": jobid, "name": name, "owner": "tester", "definition": f"tiny:{n_vms}",
                                "state": "running", "vms": [{"rank": r} for r in range(n_vms)]})
        for r in range(n_vms):
            s.put(prefix + f"vms/{r}", {"rank": r, "name": f"vm{r}", "state": "running"})
        s.close()

    def ask(self, *words, line=None, shell="bash", **environ):
        """The candidates for the last word of `pcocc WORDS...` ("" to complete an empty word):
        [(type, value)] (bash) or [(type, value, help)] (zsh). Nothing is ever written to stderr."""
        env = self.cli.env()
        env.environ.update(environ)
        env.environ[completion.COMPLETE_VAR] = f"{shell}_complete"
        if line is not None:
            env.environ["COMP_LINE"] = line
        else:
            env.environ["COMP_WORDS"] = " ".join(("pcocc",) + words)
            env.environ["COMP_CWORD"] = str(len(words))
        status = run([], env)
        assert status == 0 and env.stderr.getvalue() == "", env.stderr.getvalue()
        out = env.stdout.getvalue()
        if shell == "zsh":
            lines = out.splitlines()
            return [tuple(lines[i:i + 3]) for i in range(0, len(lines) - 2, 3)]
        return [tuple(x.split(",", 1)) for x in out.splitlines() if x]

    def values(self, *words, **kw):
        return [v for _, v in self.ask(*words, **kw)]


@pytest.fixture
def site(cli, tmp_path):
    return Site(cli, tmp_path)


@pytest.fixture(autouse=True)
def unhurried(cli):
    """No lookup is cut short by a loaded machine: the bound is tested on a store that never answers."""
    cli.environ["PCOCC_COMPLETE_SECONDS"] = "600"


def test_commands_and_subcommands(site):
    listed = site.values("")
    assert listed == [n for n in COMMANDS if n not in HIDDEN]  # in the order of `pcocc --help`, internal hidden
    assert "internal" not in listed and "completion" in listed
    assert site.values("im") == ["image"]
    assert site.values("image", "") == ["build", "copy", "delete", "export", "import", "list", "repo", "resize", "show", "verify"]
    assert site.values("image", "repo", "") == ["gc", "list"]
    assert site.values("-v", "pr") == []  # no such command
    assert site.values("-v", "p") == ["ps"]  # after a global option


def test_options_of_a_subcommand(site):
    ps = site.values("ps", "--")
    assert {"--jobs", "--name", "--state", "--vms", "--format", "--noheader", "--json", "--help"} <= set(ps)
    assert site.values("exec", "--ti") == ["--timeout"]
    assert {"-w", "--vms", "-x", "-b", "--pty"} <= set(site.values("exec", "-"))
    assert [v.upper() for v in site.values("history", "-s", "")] == ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"]  # click's Choice
    assert site.ask("ckpt", "") == [("dir", "")]  # click's Path: the shell lists directories


def test_templates_in_a_definition_with_counts(site):
    # written templates, and the per-image template of the repository's image (the default resource set)
    assert site.ask("batch", "") == [("nospace", f"{n}:") for n in ("centos", "debian", "tinier", "tiny")]
    assert site.ask("alloc", "ti") == [("nospace", "tinier:"), ("nospace", "tiny:")]
    assert site.values("batch", "tiny:") == []  # the count is the user's to type
    assert site.values("batch", "tiny:2,d") == ["tiny:2,debian:"]  # after a comma, the next template
    assert site.values("batch", "--wait", "-p", "part", "-t", "5", "c") == ["centos:"]  # batch options before it
    assert site.values("batch", "-p", "") == []  # the value of a batch system option
    assert site.values("template", "show", "t") == ["tinier", "tiny"]
    assert site.values("template", "snapshot", "d") == ["debian"]


def test_bash_splits_words_at_colons_so_the_line_is_sent_and_candidates_cut_back(site):
    """bash completes the text after the last ':' (COMP_WORDBREAKS): 'tiny:2,de' is one word
    for pcocc, and the candidate is what replaces '2,de'."""
    assert site.values(line="pcocc batch -p part tiny:2,de") == ["2,debian:"]
    assert site.values(line="pcocc batch ti") == ["tinier:", "tiny:"]
    assert site.values(line="pcocc batch ") == ["centos:", "debian:", "tinier:", "tiny:"]
    assert site.values(line="PCOCC_X=1 pcocc image sh") == ["show"]  # assignments before the command
    site.add(7, "alpha", 2)
    assert site.values(line="pcocc ps --jobs=") == ["7"]  # click completes the value of --opt=
    assert site.values(line="pcocc image show orig:c") == ["centos"]
    assert site.values(line="pcocc cp -r vm") == ["vm0:", "vm1:"]


def test_job_ids_job_names_and_vm_names_from_the_store(site):
    assert site.values("cancel", "") == []  # no store yet: nothing (and no store is created)
    assert not (site.root / "state.db").exists()
    site.add(5, "alpha", 2)
    site.add(12, "beta", 3)
    assert site.values("cancel", "") == ["5", "12"]
    assert site.values("cancel", "5", "") == ["12"]  # not twice
    assert site.values("ps", "-j", "1") == ["12"]
    assert site.values("ps", "-j", "5,") == ["5,12"]
    assert site.values("exec", "--jobname", "") == ["alpha", "beta"]
    assert site.ask("exec", "-j", "", shell="zsh") == [("plain", "5", "alpha tiny:2"), ("plain", "12", "beta tiny:3")]
    # VM names: of the selected cluster only
    assert site.values("exec", "-w", "") == []  # two clusters, none chosen
    assert site.values("exec", "-j", "12", "-w", "") == ["vm0", "vm1", "vm2", "all"]
    assert site.values("exec", "-J", "alpha", "-x", "") == ["vm0", "vm1", "all"]
    assert site.values("exec", "-j", "12", "-w", "vm0,") == ["vm0,vm0", "vm0,vm1", "vm0,vm2"]
    assert site.values("console", "-j", "5", "") == ["vm0", "vm1"]
    assert site.values("shell", "-j", "5", "") == ["vm0", "vm1"]
    assert site.values("reset", "") == []
    assert site.values("reset", "", PCOCC_JOB_ID="12") == ["vm0", "vm1", "vm2", "all"]
    assert site.values("save", "-j", "12", "vm1") == ["vm1"]
    assert site.values("monitor-cmd", "-j", "5", "-w", "v") == ["vm0", "vm1"]
    assert site.values("ssh", "-j", "5", "root@") == ["root@vm0", "root@vm1"]
    assert site.values("ssh", "-j", "5", "-i", "") == [""]  # a key file: the shell's file names
    assert site.ask("scp", "-j", "5", "./f") == [("file", "./f")]
    assert site.ask("cp", "-j", "12", "v") == [("nospace", "vm0:"), ("nospace", "vm1:"), ("nospace", "vm2:")]
    assert site.values("cp", "-j", "12", "vm0:/e") == []  # a path in the VM


def test_the_only_cluster_is_selected(site):
    site.add(3, "solo", 2)
    assert site.values("console", "") == ["vm0", "vm1"]
    assert site.values("nc", "") == ["vm0", "vm1"]
    assert site.values("exec", "-w", "") == ["vm0", "vm1", "all"]


def test_images_repositories_and_help_topics(site):
    assert site.values("image", "show", "") == ["orig:centos"]
    assert site.values("image", "list", "-R", "") == ["orig"]  # repos.yaml's
    assert site.values("image", "repo", "gc", "o") == ["orig"]
    assert {"exec", "templates", "exit-codes", "newvm-tutorial"} <= set(site.values("help", ""))
    assert site.values("help", "image", "l") == ["list"] and site.values("help", "in") == []  # internal is hidden
    assert site.values("nosuch", "") == []  # not a command: nothing (click would list the commands)


def test_a_broken_templates_file_or_store_completes_nothing_silently(site, cli, tmp_path, monkeypatch):
    cli.write("user/templates.yaml", "tiny:\n  image: [unclosed\n")
    assert site.ask("batch", "") == []
    assert site.values("") != []  # commands still complete
    # an etcd that refuses connections
    cli.write("etc/batch.yaml", "type: slurm\nsettings:\n  etcd-servers: [127.0.0.1]\n  etcd-client-port: 1\n  etcd-auth-type: none\n")
    assert site.ask("cancel", "") == []
    # an etcd that accepts and never answers: the lookup is given up after its bound
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        cli.write("etc/batch.yaml", "type: slurm\nsettings:\n  etcd-servers: [127.0.0.1]\n"
                  f"  etcd-client-port: {hung.getsockname()[1]}\n  etcd-auth-type: none\n")
        assert site.ask("console", "", PCOCC_COMPLETE_SECONDS="0.5") == []  # whatever the machine's speed
    # an invalid batch.yaml: no config at all
    cli.write("etc/batch.yaml", "type: nosuch\n")
    assert site.ask("cancel", "") == [] and site.ask("batch", "") == []


def test_a_failing_completer_completes_nothing(site, monkeypatch):
    def broken(self):
        raise RuntimeError("bug")

    monkeypatch.setattr(completion.Lookups, "templates", broken)
    assert site.ask("batch", "") == []


def test_zsh_gets_help_texts_and_escaped_colons(site):
    got = site.ask("template", "show", "tin", shell="zsh")
    assert got == [("plain", "tinier", "_"), ("plain", "tiny", "a small one")]  # a description is not inherited
    # with a help text, zsh's _describe splits at the first ':': click escapes it; without, compadd takes it as is
    assert site.ask("batch", "t", shell="zsh") == [("nospace", "tinier:", "_"), ("nospace", r"tiny\:", "a small one")]


def test_completion_command_prints_the_scripts_click_s_way_too(cli):
    r = cli("completion", "bash")
    assert r.status == 0 and "complete -o nosort -F _pcocc_completion pcocc" in r.stdout
    env = cli.env()
    env.environ[completion.COMPLETE_VAR] = "bash_source"
    assert run([], env) == 0 and env.stdout.getvalue() == r.stdout
    z = cli("completion", "zsh")
    assert z.status == 0 and z.stdout.startswith("#compdef pcocc\n") and "zsh_complete" in z.stdout
    r = cli("completion", "fish")
    assert r.status == 2 and "fish" in r.stderr


def _setup_completion_lines():
    """scripts/setup's lines that install the completion scripts."""
    lines = (Path(__file__).resolve().parents[2] / "scripts" / "setup").read_text().splitlines()
    return [line for line in lines if "share/bash-completion" in line or "share/zsh" in line or "pcocc completion" in line
            if not line.startswith("#")]


def test_the_bash_script_the_setup_installs_sources_registers_and_completes(cli, tmp_path):
    """scripts/setup's completion lines, run in a directory whose .venv/bin/pcocc is this pcocc;
    the bash script they install, sourced by bash: `complete -p pcocc` shows it, and its
    function, called as bash calls it, fills COMPREPLY through the installed pcocc."""
    bin_dir = os.path.dirname(sys.executable)
    assert os.access(os.path.join(bin_dir, "pcocc"), os.X_OK)
    top = tmp_path / "top"
    (top / ".venv" / "bin").mkdir(parents=True)
    os.symlink(os.path.join(bin_dir, "pcocc"), top / ".venv" / "bin" / "pcocc")
    lines = _setup_completion_lines()
    assert len(lines) == 3, lines
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(lines)], cwd=top, env=cli.environ,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    script = top / ".venv" / "share" / "bash-completion" / "completions" / "pcocc"
    assert script.read_text() == cli("completion", "bash").stdout
    assert (top / ".venv" / "share" / "zsh" / "site-functions" / "_pcocc").read_text().startswith("#compdef pcocc\n")
    cli.write("user/templates.yaml", TEMPLATES)
    env = {**cli.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    # COMP_WORDS as bash splits them (at ':' too), COMP_LINE and COMP_POINT: what bash gives the function
    body = f"""source {script} || exit 9
complete -p pcocc
call() {{ COMP_LINE="$1"; COMP_POINT=${{#1}}; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
    _pcocc_completion pcocc "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}" 2>/dev/null
    echo "[${{COMPREPLY[*]}}]"; }}
call "pcocc ima" pcocc ima
call "pcocc batch tiny:2,ti" pcocc batch tiny : 2,ti
call "pcocc nosuch " pcocc nosuch ""
"""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", body], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "complete -o nosort -F _pcocc_completion pcocc"
    assert lines[1] == "[image]"
    assert lines[2] == "[2,tinier: 2,tiny:]"  # bash's word is what follows the last ':'
    assert lines[3] == "[]"
