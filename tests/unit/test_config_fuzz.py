"""Property: any mutation of a valid config either loads, or fails with
file:line messages and the config exit status; never a traceback."""

import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import FIXTURES, Cli
from pcocc.errors import ExitStatus

SOURCES = sorted(p.relative_to(FIXTURES / "upstream") for p in (FIXTURES / "upstream").rglob("*.yaml"))
ERROR_LINE = re.compile(r"^pcocc: error: [^:]+\.yaml:\d+: ")

tokens = st.sampled_from(
    ["", " ", "  ", ":", "- ", "[", "]", "{", "}", "'", '"', "#", "&a", "*a", "!!int", "yes", "no", "null", "~", "0x2000",
     "inherits: centos-base", "inherits: mydev", "inherits: ghost", "type: token-ring", "type: ib", "image: false",
     "resource-set: nope", "%{bogus}", "%{env:HOME}", "-1", "1e99", "L2", "mtu: -5", "\t", "?", "|", ">", "@", "%"]
)


@st.composite
def mutation(draw):
    rel = draw(st.sampled_from(SOURCES))
    lines = (FIXTURES / "upstream" / rel).read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "replace-value", "splice", "indent"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if not lines:
            lines = [draw(tokens)]
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "insert":
            lines.insert(i, " " * draw(st.integers(0, 6)) + draw(tokens) + draw(tokens))
        elif op == "replace-value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(tokens)}{draw(st.text(max_size=4))}"
        elif op == "splice":
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + draw(tokens) + lines[i][j:]
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 5)) + lines[i].lstrip()
    return rel, "\n".join(lines) + "\n"


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutation())
def test_mutated_config_fails_cleanly(mut):
    rel, text = mut
    with tempfile.TemporaryDirectory() as tmp:
        cli = Cli(tmp)
        cli.use_fixture("upstream")
        target = Path(tmp) / rel
        target.write_text(text)
        for cmd in (("config", "validate"), ("template", "list", "--json")):
            r = cli(*cmd)
            assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
            assert r.status in (ExitStatus.OK, ExitStatus.CONFIG), (r.status, r.stderr)
            if r.status == ExitStatus.CONFIG:
                errors = [l for l in r.stderr.splitlines() if l.strip()]
                assert errors, "a config error must say something"
                for line in errors:
                    assert ERROR_LINE.match(line), line


# ---- the command line (issue 12, section 5): malformed definitions, options, image names, user-data
# files and job ids. Each gets one error line (and at most a hint), a documented exit status, no
# traceback, and nothing submitted or left behind (a fake backend records what the CLI asks).

import gzip  # noqa: E402
import os  # noqa: E402

from fake_backend import install, local_site  # noqa: E402

from pcocc import userdata  # noqa: E402
from pcocc.cluster import MAX_VMS  # noqa: E402

DOCUMENTED = {int(s) for s in ExitStatus}
CLI_SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
NASTY = ["", " ", "\n", "\r", "\t", "\x00", "\x1b[2J", "\u2028", "³", "٣", "３", "+", "-", "_", ":", ",", "@", "[", "]", "..",
         "/", "%{user}", "$(id)", "'", '"', "-c", "--", "9" * 25, "0", "tiny", "other", "ghost", "é"]
text = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=6)), max_size=8).map("".join)


def _check(r, backend, before, root):
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert r.status in DOCUMENTED, (r.status, r.stderr)
    if r.status != ExitStatus.OK:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert lines and lines[0].startswith("pcocc: error: "), r.stderr
        assert len(lines) <= 2, r.stderr  # the error, then at most a hint
        assert backend.submitted == [] and backend.cancelled == []
        assert _files(root) == before  # nothing left behind


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


class _Site:
    def __init__(self, tmp):
        self.root = tmp
        self.cli = Cli(tmp)
        local_site(self.cli, tmp)

    def __call__(self, *argv):
        before = _files(self.root)
        with install() as backend:
            r = self.cli(*argv)
        _check(r, backend, before, self.root)
        return r, backend


@st.composite
def definition(draw):
    parts = draw(st.lists(st.tuples(st.sampled_from(["tiny", "other", "ghost", "t!ny", "", " tiny"]),
                                    st.one_of(st.none(), st.integers(0, 10**30).map(str), st.sampled_from(["³", "٣", "+1", "-1", "1_0", " 2", ""]))),
                          min_size=1, max_size=6))
    sep = draw(st.sampled_from([",", ", ", ",,", ";"]))
    d = sep.join(n if c is None else f"{n}:{c}" for n, c in parts)
    return d if draw(st.booleans()) else d + draw(text)


@CLI_SETTINGS
@given(definition())
def test_cli_definitions(defn):
    with tempfile.TemporaryDirectory() as tmp:
        r, backend = _Site(tmp)("batch", defn)
        if r.status == ExitStatus.OK:
            ((n, _),) = backend.submitted
            assert 1 <= n <= MAX_VMS


@CLI_SETTINGS
@given(st.sampled_from(["-J", "-c", "-m", "--job-name", "--cpus-per-vm", "--mem-per-core", "-x", "--user-data", "-r", "-b"]), text)
def test_cli_submission_options(opt, value):
    with tempfile.TemporaryDirectory() as tmp:
        r, backend = _Site(tmp)("batch", opt, value, "tiny:1")
        if r.status == ExitStatus.OK:  # submitted, or the help asked for (e.g. -J -h)
            assert len(backend.submitted) == 1 or r.stdout.startswith("Usage:"), r.stdout


@CLI_SETTINGS
@given(st.sampled_from([("cancel", "-j"), ("cancel", "-J"), ("exec", "-j"), ("exec", "-J"), ("exec", "-u"), ("exec", "-i"),
                        ("exec", "-w"), ("reset", "-j"), ("console", "-j"), ("save", "-j"), ("ckpt", "-j"), ("ps", "-u")]),
       st.one_of(text, st.integers(-5, 2**40).map(str)))
def test_cli_job_ids_and_names(cmd_opt, value):
    cmd, opt = cmd_opt
    extra = {"exec": ["id"], "reset": ["vm0"], "console": ["vm0"], "save": ["vm0"], "ckpt": ["/nonexistent/ckpt"]}.get(cmd, [])
    with tempfile.TemporaryDirectory() as tmp:
        r, _ = _Site(tmp)(cmd, opt, value, *extra)
        assert r.status != ExitStatus.OK or cmd == "ps"


@CLI_SETTINGS
@given(st.one_of(text, st.sampled_from(["r:tiny", "r:tiny@1", "r:tiny@99999999999999999999", "r:@1", "r:a@-1", "x:y:z", "r:" + "a" * 200])))
def test_cli_image_names(name):
    with tempfile.TemporaryDirectory() as tmp:
        r, _ = _Site(tmp)("image", "show", name)
        assert r.status in (ExitStatus.USAGE, ExitStatus.NOT_FOUND, ExitStatus.CONFIG), (r.status, r.stderr)


@st.composite
def user_data(draw):
    kind = draw(st.sampled_from(["text", "bytes", "gzip", "gzip-bytes", "mime", "truncated-gzip"]))
    body = draw(st.binary(max_size=300)) if "bytes" in kind else draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "mime":
        body = b'Content-Type: multipart/mixed; boundary="B"\nMIME-Version: 1.0\n\n--B\nContent-Type: text/x-shellscript\n\n' + body + b"\n--B--\n"
    if kind.startswith("gzip") or kind == "truncated-gzip":
        body = gzip.compress(body)
    if kind == "truncated-gzip":
        body = body[: draw(st.integers(0, len(body)))]
    return body


@CLI_SETTINGS
@given(user_data())
def test_cli_user_data_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        site = _Site(tmp)
        path = os.path.join(tmp, "ud")
        with open(path, "wb") as f:
            f.write(data)
        try:
            userdata.read(path)
            accepted = True
        except userdata.UserDataError:
            accepted = False
        r, backend = site("batch", "--user-data", path, "tiny:1")
        assert (r.status == ExitStatus.OK) == accepted, (r.status, r.stderr)
        assert r.status in (ExitStatus.OK, ExitStatus.USAGE)
