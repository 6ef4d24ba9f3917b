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
