"""User-given strings are data: names, counts, job ids, VM lists (issue 12, sections 4 and 5)."""

import pytest

from pcocc import names
from pcocc.cluster import MAX_VMS, parse_definition, parse_vmset
from pcocc.errors import NotFoundError, UsageError


class Templates:
    def __init__(self, *known):
        self.known = set(known)
        self.asked = []

    def get(self, name):
        self.asked.append(name)
        if name not in self.known:
            raise NotFoundError(f"no template {name}")


@pytest.mark.parametrize("text", ["tiny:³", "tiny:٣", "tiny:３", "tiny:+3", "tiny: 3", "tiny:1_0", "tiny:-1", "tiny:0x3", "tïny:1"])
def test_counts_are_ascii_digits_only(text):
    with pytest.raises(UsageError):
        parse_definition(text, Templates("tiny", "tïny"))


@pytest.mark.parametrize("text", ["tiny:99999999999999999999999", "tiny:" + "9" * 100000, f"tiny:{MAX_VMS + 1}",
                                  f"tiny:{MAX_VMS},tiny:1", ",".join(["tiny:4000"] * 1000), "tiny," * 5000 + "tiny"])
def test_bounds_are_checked_before_any_vm_is_made(text, monkeypatch):
    made = []
    import pcocc.cluster as cluster

    class Spy(cluster.VMSpec):
        def __init__(self, *a, **k):
            made.append(a)
            super().__init__(*a, **k)

    monkeypatch.setattr(cluster, "VMSpec", Spy)
    with pytest.raises(UsageError) as err:
        parse_definition(text, Templates("tiny"))
    assert made == []
    assert "\n" not in err.value.message and len(err.value.message) < 300


def test_the_largest_cluster_and_leading_zeros():
    assert len(parse_definition(f"tiny:{MAX_VMS}", Templates("tiny"))) == MAX_VMS
    assert len(parse_definition("tiny:0003", Templates("tiny"))) == 3
    with pytest.raises(UsageError):
        parse_definition("tiny:0", Templates("tiny"))


def test_unknown_template_is_found_before_expansion():
    t = Templates("tiny")
    with pytest.raises(NotFoundError):
        parse_definition("tiny:4000,ghost:1", t)
    assert t.asked == ["tiny", "ghost"]


@pytest.mark.parametrize("text", ["vm٣", "vm³", "vm[0-٣]", "vm[3-1]", "vm[0--2]", "vm1-", "vm", "vm[]", "x", ""])
def test_bad_vm_lists(text):
    with pytest.raises(UsageError):
        parse_vmset(text, 4)


def test_vm_lists_are_bounded_before_expansion():
    with pytest.raises(UsageError, match="no VM vm99999999999999999999 in this cluster"):
        parse_vmset("vm[0-99999999999999999999]", 4)
    with pytest.raises(UsageError, match="no VM vm4 "):
        parse_vmset("vm4", 4)
    assert parse_vmset("vm[0-2,1],vm3", 4) == [0, 1, 2, 3]
    assert parse_vmset("vm001", 4) == [1]


@pytest.mark.parametrize("name", ["alice", "a.b", "_svc", "u-1", "A9", "x" * 32])
def test_good_user_names(name):
    assert names.check_user_name(name) == name


@pytest.mark.parametrize("name", ["-c id", "-", "--help", "a b", "a\nb", "root;id", "é", "x" * 33, "", "a/b", "$(id)"])
def test_bad_user_names(name):
    with pytest.raises(UsageError) as err:
        names.check_user_name(name)
    assert "\n" not in err.value.message


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "\x1b[2J", "a\u2028b", "", "x" * (names.MAX_JOB_NAME + 1), "tab\there"])
def test_bad_job_names(name):
    with pytest.raises(UsageError) as err:
        names.check_job_name(name)
    assert all(c.isprintable() for c in err.value.message)


def test_good_job_names():
    for name in ("pcocc", "my job", "éè-ü_1", "x" * names.MAX_JOB_NAME):
        assert names.check_job_name(name) == name


@pytest.mark.parametrize("text,ok", [("12", 12), ("0", 0), ("00042", 42), (str(names.MAX_JOB_ID), names.MAX_JOB_ID),
                                     ("١٢", None), ("+1", None), ("-1", None), (" 1", None), ("1_0", None), ("", None),
                                     (str(names.MAX_JOB_ID + 1), None), ("9" * 5000, None)])
def test_job_ids(text, ok):
    if ok is None:
        with pytest.raises(UsageError):
            names.parse_job_id(text)
    else:
        assert names.parse_job_id(text) == ok


def test_shown_escapes_and_shortens():
    assert names.shown("a\nb") == "'a\\nb'"
    assert names.shown("x" * 500).endswith("...'") and len(names.shown("x" * 500)) < 100
    assert names.one_line("a\x1b[31m\r\n") == "a\\x1b[31m\\r\\n"


# A NUL reaches an os call as "ValueError: embedded null byte", an internal error. execve cannot pass
# one in argv, but a YAML "\0" escape can put one in any config value, and run() callers in argv.
def test_a_nul_in_a_config_value_is_a_config_error_with_its_line():
    from pcocc.config import yamlfile
    from pcocc.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        yamlfile.parse('a:\n  image: "x\\0/y"\n', "templates.yaml")
    lines = list(err.value.lines())
    assert lines[0].startswith("templates.yaml:2:") and "NUL" in lines[0], lines


def test_a_nul_in_an_image_directory_or_an_argument_is_a_usage_error():
    from pcocc.images import legacy_dir

    with pytest.raises(UsageError):
        legacy_dir.find("\x00/")
