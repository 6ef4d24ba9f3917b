"""Config loading: upstream-format files, inheritance and precise errors."""

import re

import pytest

from pcocc.errors import ExitStatus


def test_upstream_config_loads(cli):
    cli.use_fixture("upstream")
    r = cli("config", "validate", "--json")
    assert r.status == 0, r.stderr
    assert r.json["valid"] is True
    r = cli("config", "show", "--json")
    nets = r.json["networks"]
    assert {n: v["type"] for n, v in nets.items()} == {"nat-rssh": "ethernet", "pv": "ethernet", "lan": "bridged", "ib": "infiniband"}
    assert nets["nat-rssh"]["settings"]["reverse-nat"] == {"vm-port": 22, "min-host-port": 60222, "max-host-port": 60322}
    assert nets["pv"]["settings"]["network-layer"] == "L2"
    assert r.json["batch"]["type"] == "slurm" and r.json["batch"]["settings"]["store"] == "etcd"
    # user repos come first, and path templates are expanded
    assert [x["name"] for x in r.json["repos"]] == ["user", "global"]
    assert r.json["repos"][0]["path"] == str(cli.home / ".pcocc/repo")


def test_template_list_json(cli):
    cli.use_fixture("upstream")
    r = cli("template", "list", "--json")
    assert r.status == 0, r.stderr
    by_name = {t["name"]: t for t in r.json}
    assert set(by_name) == {"centos-base", "centos-ib", "mydev", "myib"}
    assert by_name["mydev"]["scope"] == "user" and by_name["centos-base"]["scope"] == "system"
    assert by_name["myib"]["resource-set"] == "ib-cluster"  # inherited from centos-ib
    assert by_name["myib"]["image"] == "user:myimage@2"
    assert by_name["mydev"]["image"] == "global:centos8"  # inherited across files


def test_template_show_tells_where_values_come_from(cli):
    cli.use_fixture("upstream")
    r = cli("template", "show", "myib", "--json")
    assert r.status == 0, r.stderr
    s = {x["key"]: x for x in r.json["settings"]}
    assert r.json["chain"] == ["myib", "centos-ib", "centos-base"]
    assert s["image"] == {"key": "image", "value": "user:myimage@2", "from": "myib", "inherited": False}
    assert s["resource-set"]["from"] == "centos-ib" and s["resource-set"]["inherited"]
    assert s["user-data"]["from"] == "centos-base"
    assert "description" not in s  # description is not inherited
    r = cli("template", "show", "myib")
    assert "centos-ib" in r.stdout and "ib-cluster" in r.stdout


def test_template_show_defaults_with_all(cli):
    cli.use_fixture("upstream")
    r = cli("template", "show", "mydev", "--all", "--json")
    s = {x["key"]: x for x in r.json["settings"]}
    assert s["machine-type"] == {"key": "machine-type", "value": "pc", "from": "default", "inherited": False}
    assert s["mount-points"]["value"]["scratch"] == {"path": "/scratch/%{user}", "readonly": False, "type": "virtio-9p"}
    assert s["persistent-drives"]["value"][1] == {"path": "%{homedir}/vms/shared.raw", "mmp": "cluster", "cache": "none", "backup": None, "format": "raw"}


def test_unknown_template(cli):
    r = cli("template", "show", "nope")
    assert r.status == ExitStatus.NOT_FOUND
    assert "no template named 'nope'" in r.stderr


def test_embedded_default_without_any_config(cli):
    r = cli("config", "show", "--json")
    assert r.status == 0
    assert r.json["batch"]["type"] == "local" and r.json["batch"]["settings"]["store"] == "sqlite"
    assert r.json["resources"] == {"default": {"networks": [], "default": True}}


BROKEN = [
    # (file, content, expected line, expected text)
    ("etc/templates.yaml", "a:\n  image: x\n  bogus: 1\n", 3, "a.bogus: unknown key"),
    ("etc/templates.yaml", "a:\n  image: [1, 2]\n", 2, "a.image: expected an image URI"),
    ("etc/templates.yaml", "a:\n  emulator-cores: many\n", 2, "a.emulator-cores: expected an integer"),
    ("etc/templates.yaml", "a:\n  inherits: b\nb:\n  inherits: a\n", 2, "inheritance cycle: a -> b -> a"),
    ("etc/templates.yaml", "a:\n  image: x\n  inherits: ghost\n", 3, "a.inherits: no template named 'ghost'"),
    ("etc/templates.yaml", "a:\n  image: 'x'\n b: 1\n", 3, "invalid YAML"),
    ("etc/networks.yaml", "n1:\n  type: ethernet\n  settings: {dev-prefix: ok}\nn2:\n  type: token-ring\n", 5, "n2.type: unknown network type 'token-ring'"),
    ("etc/networks.yaml", "n1:\n  type: ethernet\n  settings:\n    dev-prefix: p\n    mtu: big\n", 5, "n1.settings.mtu: expected an integer"),
    ("etc/networks.yaml", "n1:\n  type: bridged\n  settings:\n    tap-prefix: t\n", 3, "missing required key 'host-bridge'"),
    ("etc/resources.yaml", "r:\n  networks: [nope]\n", 2, "unknown network 'nope'"),
    ("etc/batch.yaml", "type: pbs\n", 1, "type: expected one of slurm, local"),
    ("etc/templates.yaml", "a:\n  mount-points:\n    home: {path: '%{bogus}'}\n", 2, "unknown placeholder %{bogus}"),
    ("etc/templates.yaml", "_hidden:\n  image: x\n", 1, "expected a template name"),
    ("etc/repos.yaml", "repos:\n  - name: a\n    where: /x\n", 3, "repos.0.where: unknown key"),
]


@pytest.mark.parametrize("relpath,content,line,text", BROKEN, ids=[b[3][:30] for b in BROKEN])
def test_broken_config_reports_file_and_line(cli, relpath, content, line, text):
    path = cli.write(relpath, content)
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert f"{path}:{line}: " in r.stderr, r.stderr
    assert text in r.stderr, r.stderr


def test_user_template_cannot_reuse_a_system_name(cli):
    cli.write("etc/templates.yaml", "base:\n  image: x\n")
    path = cli.write("user/templates.yaml", "base:\n  image: y\n")
    r = cli("template", "list")
    assert r.status == ExitStatus.CONFIG
    assert f"{path}:1: base: template already defined at" in r.stderr


def test_system_template_cannot_inherit_user_template(cli):
    path = cli.write("etc/templates.yaml", "sys:\n  inherits: mine\n")
    cli.write("user/templates.yaml", "mine:\n  image: y\n")
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG
    assert f"{path}:2: sys.inherits: a system template cannot inherit the user template 'mine'" in r.stderr


def test_validate_reports_every_problem(cli):
    cli.write("etc/templates.yaml", "a:\n  bogus: 1\nb:\n  inherits: ghost\n")
    cli.write("etc/networks.yaml", "n:\n  type: nope\n")
    cli.write("user/templates.d/x.yaml", "c:\n  disk-cache: sometimes\n")
    r = cli("config", "validate")
    errors = [l for l in r.stderr.splitlines() if l.startswith("pcocc: error: ")]
    assert len(errors) == 4, r.stderr
    for e in errors:
        assert re.match(r"pcocc: error: \S+\.yaml:\d+: ", e), e


def test_resource_set_default(cli):
    cli.write("etc/networks.yaml", "n:\n  type: eth\n  settings: {dev-prefix: p}\n")
    cli.write("etc/resources.yaml", "main:\n  default: true\n  networks: [n]\nother:\n  networks: []\n")
    cli.write("etc/templates.yaml", "a:\n  image: x\nb:\n  image: x\n  resource-set: other\n")
    r = cli("template", "list", "--json")
    assert {t["name"]: t["resource-set"] for t in r.json} == {"a": "main", "b": "other"}
    path = cli.write("etc/resources.yaml", "main:\n  default: true\nother:\n  default: yes\n")
    r = cli("config", "validate")
    assert f"{path}:3: other.default: only one resource set may be the default" in r.stderr


def test_yaml_is_loaded_safely(cli):
    path = cli.write("etc/templates.yaml", "a: !!python/object/apply:os.system ['touch /tmp/pwned']\n")
    r = cli("config", "validate")
    assert r.status == ExitStatus.CONFIG
    assert f"{path}:1:" in r.stderr
