"""alloc/batch -r DIR take the definition, cores and memory from the checkpoint; ckpt's hint can be pasted (issue 14)."""

import json
import shlex

import pytest

from fake_backend import install, local_site
from pcocc.cli.cluster import restart_options
from pcocc.cli.saving import restart_hint


def _manifest(vms=((2, 512),), definition="tiny:1"):
    return {"definition": definition, "vms": [{"rank": i, "vcpus": c, "memory_mb": m} for i, (c, m) in enumerate(vms)]}


@pytest.mark.parametrize("given, added", [
    ([], ["-c", "2", "--mem-per-cpu=256"]),
    (["-p", "batch"], ["-c", "2", "--mem-per-cpu=256"]),
    (["-c4"], ["--mem-per-cpu=256"]), (["--cpus-per-task=4"], ["--mem-per-cpu=256"]), (["--cpus-per-task", "4"], ["--mem-per-cpu=256"]),
    (["--mem-per-cpu=100"], ["-c", "2"]), (["--mem", "1G"], ["-c", "2"]), (["-c", "1", "--mem=1G"], []),
])
def test_slurm_gets_the_checkpoint_s_cores_and_memory_unless_given(given, added):
    assert restart_options(given, _manifest(), slurm=True) == [*given, *added]


@pytest.mark.parametrize("given, added", [([], ["-c", "2", "-m", "256"]), (["-m300"], ["-c", "2"]), (["--cpus-per-vm=3", "-m", "9"], [])])
def test_one_host_gets_the_checkpoint_s_cores_and_memory_unless_given(given, added):
    assert restart_options(given, _manifest(), slurm=False) == [*given, *added]


def test_vms_of_different_sizes_get_no_default():
    assert restart_options(["-p", "x"], _manifest(((1, 256), (2, 512))), slurm=True) == ["-p", "x"]


# ---- through the CLI

def _checkpoint(cli, tmp_path, vms=((2, 512),)):
    from pcocc.config.loader import load_config
    from pcocc.lifecycle import checkpoint

    settings = load_config(cli.env()).templates.resolve("tiny").values
    d = tmp_path / "my ckpt"
    d.mkdir()
    manifest = {"format": checkpoint.FORMAT, "jobid": 5, "name": "pcocc", "definition": f"tiny:{len(vms)}",
                "vms": [{"rank": i, "template": "tiny", "settings_digest": checkpoint.settings_digest(settings), "vcpus": c,
                         "memory_mb": m} for i, (c, m) in enumerate(vms)]}
    (d / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return d, manifest


@pytest.fixture
def site(cli, tmp_path):
    local_site(cli, tmp_path)
    cli.environ["SHELL"] = "/bin/true"  # alloc's shell: ends at once, writes no rc file
    with install() as backend:
        cli.backend = backend
        yield cli


@pytest.mark.parametrize("extra", [[], ["-J", "again"], ["tiny:1"], ["-J", "again", "tiny:1"]])
def test_batch_r_alone_restarts_with_the_checkpoint_s_definition_and_resources(site, tmp_path, extra):
    d, _ = _checkpoint(site, tmp_path)
    r = site("batch", "-r", d, *extra)
    assert r.status == 0, r.stderr
    ((n, opts),) = site.backend.submitted
    assert n == 1 and opts["definition"] == "tiny:1" and opts["cpus"] == 2 and opts["mem_per_core"] == 256
    assert opts["restart"]["dir"] == str(d) and opts["name"] == ("again" if "-J" in extra else "pcocc")


def test_other_resources_given_are_refused_by_the_restart_check(site, tmp_path):
    d, _ = _checkpoint(site, tmp_path)
    r = site("batch", "-r", d, "-c", "1")
    assert r.status == 2 and "had 2 core(s) when checkpointed, not 1" in r.stderr, r.stderr
    r = site("batch", "-r", d, "tiny:2")
    assert r.status == 2 and "is of a cluster 'tiny:1', not 'tiny:2'" in r.stderr, r.stderr
    assert site.backend.submitted == []


def test_the_ckpt_hint_works_when_pasted(site, tmp_path):
    d, manifest = _checkpoint(site, tmp_path)
    lines = restart_hint(str(d), manifest)
    assert "alloc|batch" not in "\n".join(lines)
    assert "definition tiny:1, 2 core(s) and 512 MiB per VM" in lines[-1]
    for line in lines[:2]:
        argv = shlex.split(line.split(": ", 1)[1])  # what a user pastes, as the shell splits it
        assert argv[:2] in (["pcocc", "batch"], ["pcocc", "alloc"]) and argv[3] == str(d)
        r = site(*argv[1:])
        assert r.status == 0, r.stderr
        opts = site.backend.submitted[-1][1]
        assert (opts["definition"], opts["cpus"], opts["mem_per_core"]) == ("tiny:1", 2, 256)


def test_slurm_restart_passes_the_checkpoint_s_resources_to_sbatch(cli, tmp_path, monkeypatch):
    from test_cli import _slurm_site

    recorded = _slurm_site(cli, tmp_path, monkeypatch)
    d, _ = _checkpoint(cli, tmp_path)
    r = cli("batch", "-pbatch", "-r", d)
    assert r.status == 0, r.stderr
    got = recorded.read_text().splitlines()
    passed = got[:got.index("--wrap")]
    assert "-pbatch" in passed and "--mem-per-cpu=256" in passed and passed[passed.index("-c") + 1] == "2", passed
    launcher = shlex.split(got[got.index("--wrap") + 1])
    assert launcher[launcher.index("--definition") + 1] == "tiny:1" and launcher[launcher.index("--restart-ckpt") + 1] == str(d)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("definition"), "'definition' is missing"),
    (lambda m: m["vms"][0].pop("rank"), "VM 0: its 'rank' is missing"),
    (lambda m: m["vms"][0].update(template=7), "VM 0: its 'template' is missing or not text"),
    (lambda m: m.update(overrides=7), "its 'overrides'"),
    (lambda m: m.update(overrides={"images": 3}), "its 'overrides'"),
])
def test_a_manifest_edited_by_hand_is_one_line(site, tmp_path, edit, words):
    """Review finding: a cut or hand-edited ckpt.json gave internal errors (KeyError, TypeError)."""
    from pcocc.lifecycle import checkpoint

    d, manifest = _checkpoint(site, tmp_path)
    edit(manifest)
    (d / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    r = site("batch", "-r", d)
    assert r.status != 0 and "internal error" not in r.stderr and words in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) <= 2 and site.backend.submitted == []


def test_a_template_s_emulator_cores_are_asked_for_again_at_restart():
    """A VM with emulator-cores ran on more cores than it has vCPUs: the restart asks for its
    slice (the checkpoint's "cores"), and the check takes that number, not the vCPUs."""
    from pcocc.errors import UsageError
    from pcocc.lifecycle import checkpoint

    manifest = {"definition": "tiny:1", "vms": [{"rank": 0, "template": "tiny", "settings_digest": "d", "vcpus": 1, "cores": 2,
                                                 "memory_mb": 512}]}
    assert restart_options([], manifest, slurm=True) == ["-c", "2", "--mem-per-cpu=256"]
    assert restart_options([], manifest, slurm=False) == ["-c", "2", "-m", "256"]
    assert "2 core(s) and 512 MiB per VM" in restart_hint("/ck", manifest)[2]
    assert checkpoint._manifest_problem(manifest) is None
    assert checkpoint._manifest_problem({**manifest, "vms": [{**manifest["vms"][0], "cores": "2"}]}) == \
        "VM 0: its 'cores' is missing or not a number"

    class Resolved:
        values = {}

    digest = checkpoint.settings_digest({})
    manifest["vms"][0]["settings_digest"] = digest
    vms = [type("VM", (), {"template": "tiny", "rank": 0})()]
    checkpoint.check_restart(manifest, "/ck", vms, {"tiny": Resolved}, cpus=2, memory_mb=512)
    with pytest.raises(UsageError, match=r"vm0 had 2 core\(s\) when checkpointed, not 1: restart with -c 2"):
        checkpoint.check_restart(manifest, "/ck", vms, {"tiny": Resolved}, cpus=1, memory_mb=512)
    del manifest["vms"][0]["cores"]  # an older manifest: its vCPUs
    assert restart_options([], manifest, slurm=False) == ["-c", "1", "-m", "512"]
