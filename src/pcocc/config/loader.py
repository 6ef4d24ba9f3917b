"""Load and check every configuration file, reporting all problems at once.

System files come from PCOCC_SYSTEM_CONF_DIR (/etc/pcocc), user files from
PCOCC_USER_CONF_DIR (~/.pcocc). A missing system directory means the embedded
single-host default: local backend, SQLite store, a user image repository.
"""

import logging
import os
import re

from pcocc import networks, pathtpl
from pcocc.networks import ethernet
from pcocc.config import yamlfile
from pcocc.config.models import BatchConfig, Config, Network, Repo, ResourceSet
from pcocc.config.schema import INVALID, Anything, At, Bool, Enum, F, Int, ListOf, MapOf, Nullable, Problems, Str, Struct, line_of
from pcocc.errors import ConfigError
from pcocc.templates import SCHEMA as TEMPLATE_SCHEMA
from pcocc.templates import Template, TemplateSet

_NAME = r"[a-zA-Z][a-zA-Z0-9_.-]*"

BATCH_SCHEMA = Struct(
    {
        "type": F(Enum("slurm", "local"), required=True),
        "settings": F(
            Struct(
                {
                    "etcd-servers": F(ListOf(Str(), scalar_ok=True)),
                    "etcd-client-port": F(Int(min=1, max=65535), default=2379),
                    "etcd-protocol": F(Enum("http", "https"), default="http"),
                    "etcd-auth-type": F(Enum("password", "munge", "none"), default="none"),
                    "etcd-ca-cert": F(Str()),
                    "batch-args": F(ListOf(Str()), default=[]),
                    # Ours: where cluster state lives. Default: etcd when servers are listed, else SQLite.
                    "store": F(Enum("etcd", "sqlite")),
                    "store-path": F(Str(), default="%{homedir}/.pcocc/state.db"),
                    # Ours, local backend: how many vCPUs may share one host core.
                    "cpu-overcommit": F(Int(min=1, max=64), default=2),
                    # Ours, local backend: the directory shared by all users where each keeps its
                    # reservations of this host's cores and memory (root-owned, sticky, world-writable).
                    "reservation-dir": F(Str(), default="/dev/shm"),
                }
            ),
            default=None,
        ),
    },
    "batch configuration",
)

NETWORK_SCHEMA = Struct({"type": F(Str(), required=True), "settings": F(Anything(), default=None)}, "network definition")

# pcocc-resources.yaml(5): `networks` (empty: no network), ours `default` and `description`.
# The original ignores other keys: they are warned about, not refused.
RESOURCE_SCHEMA = Struct(
    {
        "networks": F(Nullable(ListOf(Str()), null=list), default=[]),
        "default": F(Nullable(Bool(), null=False), default=False),
        "description": F(Nullable(Str(), null=""), default=""),
    },
    "resource set",
    unknown_ok=True,
)

log = logging.getLogger("pcocc.config")

# Why etcd-auth-type: munge is refused (pcocc-batch.yaml(5) lists it).
MUNGE_REFUSAL = ("'munge' cannot be used: a stock etcd v3 server checks passwords or TLS client certificates, "
                 "never a munge credential, so every command would fail; use 'password' (see 'pcocc help batch.yaml')")

REPOS_SCHEMA = Struct(
    {
        "repos": F(ListOf(Struct({"name": F(Str(_NAME, "a repository name"), required=True), "path": F(Str(), required=True)})), default=[]),
        "cache": F(Struct({"path": F(Str(), required=True)})),
    },
    "repository list",
)

DEFAULT_USER_REPO = "%{homedir}/.pcocc/repo"


class _Loader:
    def __init__(self, env):
        self.env = env
        self.problems = Problems()
        self.warnings = []  # "file:line: what": accepted, but worth a word (deprecated forms, ignored keys)
        self.files = []
        self.path_values = {"homedir": env.home, "user": env.user}
        self.refused_networks = set()  # defined in networks.yaml, refused there

    def read(self, path):
        """Parsed YAML of a file (None when absent); parse errors are recorded."""
        try:
            data = yamlfile.load(path)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return None
        if data is not None or os.path.exists(path):
            self.files.append(path)
        return data

    def warn(self, text):
        """Record a warning; show_warnings() shows them once the load succeeded (a failed load
        prints its errors alone: one line per problem)."""
        self.warnings.append(text)

    def show_warnings(self):
        """Show the warnings on the environment's stderr, as the CLI shows its own."""
        stream = getattr(self.env, "stderr", None)
        for text in self.warnings:
            if stream is not None:
                stream.write(f"pcocc: warning: {text}\n")
            else:
                log.warning("%s", text)

    def at(self, path, data):
        return At(path, line_of(data), "", self.problems)

    def expand(self, text, path, line, key):
        try:
            return os.path.expanduser(pathtpl.expand(text, self.path_values, self.env.environ))
        except ConfigError as exc:
            self.problems.append(f"{path}:{line}: {key}: {exc.problems[0]}")
            return text

    def check_placeholders(self, text, path, line, key):
        for name in pathtpl.unknown_placeholders(text):
            self.problems.append(f"{path}:{line}: {key}: unknown placeholder %{{{name}}} (known: {', '.join(pathtpl.KNOWN)})")

    # -- batch.yaml
    def batch(self, sysdir):
        path = os.path.join(sysdir, "batch.yaml")
        data = self.read(path)
        if data is None:
            return BatchConfig("local", self._batch_settings({}, "local", path, None), path)
        checked = BATCH_SCHEMA.check(data, self.at(path, data))
        if checked is INVALID:
            return BatchConfig("local", self._batch_settings({}, "local", path, None), path)
        return BatchConfig(checked["type"], self._batch_settings(checked["settings"], checked["type"], path, data), path)

    def _batch_settings(self, settings, btype, path, data):
        if not settings:
            settings = BATCH_SCHEMA.fields["settings"].kind.check({}, At(path, 1, "settings", Problems()))
        settings = dict(settings)
        if settings["store"] is None:
            settings["store"] = "etcd" if settings["etcd-servers"] else "sqlite"
        line = line_of(data.get("settings") if data else None) if data else 1
        if settings["etcd-auth-type"] == "munge":
            where = line_of(data.get("settings"), "etcd-auth-type") if data else line
            self.problems.append(f"{path}:{where}: settings.etcd-auth-type: {MUNGE_REFUSAL}")
        if settings["store"] == "etcd" and not settings["etcd-servers"]:
            self.problems.append(f"{path}:{line}: settings.etcd-servers: required with the etcd store")
        if btype == "slurm" and settings["store"] != "etcd":
            self.problems.append(f"{path}:{line}: settings.store: the slurm backend needs the etcd store (nodes share state)")
        settings["store-path"] = self.expand(settings["store-path"], path, line, "settings.store-path")
        return settings

    # -- networks.yaml
    def networks(self, sysdir):
        path = os.path.join(sysdir, "networks.yaml")
        data = self.read(path)
        out = {}
        if data is None:
            return out
        top = MapOf(NETWORK_SCHEMA, key=Str(_NAME, "a network name (a letter, then letters, digits, _ . -)"))
        checked = top.check(data, self.at(path, data))
        if checked is INVALID:
            checked = {}
        self.refused_networks = set(checked)  # each leaves the set once it loads: resources.yaml names the others apart
        for name, net in checked.items():
            raw = data[name]
            line = line_of(data, name)
            if net["type"] in ethernet.DEPRECATED_TYPES:
                converted = self._deprecated_network(path, name, raw, net["type"])
                if converted is not None:
                    out[name] = converted
                continue
            ntype = networks.lookup(net["type"]) if isinstance(net["type"], str) else None
            if ntype is None:
                self.problems.append(
                    f"{path}:{line_of(raw, 'type')}: {name}.type: unknown network type {net['type']!r} "
                    f"(known: {', '.join(networks.known_type_names())})"
                )
                continue
            settings = ntype.settings.check(raw.get("settings"), At(path, line_of(raw, "settings"), f"{name}.settings", self.problems))
            if settings is not INVALID:
                out[name] = Network(name, ntype.name, settings, path, line)
        self.refused_networks -= set(out)
        return out

    def _deprecated_network(self, path, name, raw, type_name):
        """A network of a type the original pcocc deprecated (pv, nat): the Network it stands for, or None.

        pv: an L2 `ethernet` network, with a warning that names the new form.
        nat: refused (no equivalent; see ethernet.NAT_REFUSAL).
        """
        where = f"{path}:{line_of(raw, 'type')}: {name}.type"
        if type_name == "nat":
            self.problems.append(f"{where}: {ethernet.NAT_REFUSAL}")
            return None
        settings = ethernet.PV_SETTINGS.check(raw.get("settings"), At(path, line_of(raw, "settings"), f"{name}.settings", self.problems))
        if settings is INVALID:
            return None
        converted = ethernet.from_pv(settings)
        self.warn(f"{where}: 'pv' is deprecated: read as type 'ethernet' with network-layer L2 and "
                  f"dev-prefix {converted['dev-prefix']!r} (write it so to silence this warning)")
        return Network(name, "ethernet", converted, path, line_of(raw, "type"))

    # -- resources.yaml
    def resources(self, sysdir, nets):
        path = os.path.join(sysdir, "resources.yaml")
        data = self.read(path)
        if data is None:
            return {"default": ResourceSet("default", (), True, "(built-in)", 0)}
        if not isinstance(data, dict):
            MapOf(RESOURCE_SCHEMA).check(data, self.at(path, data))  # records what was expected
            return {}
        checked = MapOf(RESOURCE_SCHEMA, key=Str(_NAME, "a resource set name")).check(data, self.at(path, data))
        out = {}
        if checked is INVALID:
            return out
        defaults = [n for n, r in checked.items() if r["default"]]
        if len(defaults) > 1:
            self.problems.append(f"{path}:{line_of(data, defaults[1])}: {defaults[1]}.default: only one resource set may be the default (also: {defaults[0]})")
        for name, rset in checked.items():
            raw = data[name] if isinstance(data[name], dict) else {}
            for key in RESOURCE_SCHEMA.unknown_keys(raw):
                self.warn(f"{path}:{line_of(raw, key)}: {name}.{key}: unknown key, ignored (known keys: {', '.join(sorted(RESOURCE_SCHEMA.fields))})")
            for i, net in enumerate(rset["networks"]):
                if net not in nets:
                    line = line_of(raw.get("networks"), i)
                    if net in self.refused_networks:  # its own problem is told at its line
                        self.problems.append(f"{path}:{line}: {name}.networks: network '{net}' is refused in networks.yaml (see its problem)")
                    else:
                        self.problems.append(f"{path}:{line}: {name}.networks: unknown network '{net}' (not in networks.yaml)")
            out[name] = ResourceSet(name, tuple(rset["networks"]), rset["default"], path, line_of(data, name))
        return out

    # -- templates.yaml, templates.d/*.yaml
    def templates(self, sysdir, userdir, rsets):
        files = [(os.path.join(sysdir, "templates.yaml"), "system"), (os.path.join(userdir, "templates.yaml"), "user")]
        tdir = os.path.join(userdir, "templates.d")
        if os.path.isdir(tdir):
            files += [(os.path.join(tdir, f), "user") for f in sorted(os.listdir(tdir)) if f.endswith(".yaml")]
        templates = {}
        name_check = Str(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", "a template name (letters, digits, _ . -; not starting with _)")
        for path, scope in files:
            data = self.read(path)
            if data is None:
                continue
            checked = MapOf(TEMPLATE_SCHEMA, key=name_check).check(data, self.at(path, data))
            if checked is INVALID:
                # Keep the templates that are valid so that cross-checks still report on them.
                checked = {}
                for name, raw in (data.items() if isinstance(data, dict) else ()):
                    one = TEMPLATE_SCHEMA.check(raw, At(path, line_of(data, name), name, Problems()))
                    if one is not INVALID and re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name):
                        checked[name] = one
            for name, values in checked.items():
                line = line_of(data, name)
                if name in templates:
                    first = templates[name]
                    self.problems.append(f"{path}:{line}: {name}: template already defined at {first.file}:{first.line}; choose another name and use 'inherits'")
                    continue
                raw = data[name]
                set_values = {k: v for k, v in values.items() if k in (raw or {})}  # None: written with no value
                templates[name] = Template(name, scope, path, line, set_values, dict(getattr(raw, "lines", {})))
        default_rset = next((r.name for r in rsets.values() if r.default), None)
        tset = TemplateSet(templates, default_rset)
        for tpl in templates.values():
            self._check_template(tpl, tset, rsets)
        self._check_resource_sets(tset, rsets, default_rset)
        return tset

    def _check_resource_sets(self, tset, rsets, default_rset):
        """Every template needs a resource set when resources.yaml defines sets and none is the
        default (pcocc-templates.yaml(5): resource-set is the one mandatory parameter, unless
        a default set exists). Without resources.yaml, the built-in default set stands."""
        if default_rset or not rsets:
            return
        names = ", ".join(sorted(rsets))
        for tpl in tset.templates.values():
            if not tset.resolve(tpl.name).values.get("resource-set"):  # a chain stops at a missing parent
                where = tpl.where("resource-set") if "resource-set" in tpl.values else tpl.where()
                self.problems.append(f"{where}: {tpl.name}: no resource-set, and resources.yaml marks none as the default: "
                                     f"set resource-set to one of {names}, or mark one 'default: true'")

    def _check_template(self, tpl, tset, rsets):
        parent = tpl.parent
        if parent is not None:
            where = tpl.where("inherits")
            if parent not in tset.templates:
                self.problems.append(f"{where}: {tpl.name}.inherits: no template named '{parent}'")
            elif tpl.scope == "system" and tset.templates[parent].scope == "user":
                self.problems.append(f"{where}: {tpl.name}.inherits: a system template cannot inherit the user template '{parent}'")
            else:
                seen, cur = [tpl.name], tset.templates[parent]
                while cur is not None:
                    if cur.name in seen:
                        cycle = " -> ".join(seen[seen.index(cur.name):] + [cur.name])
                        if cur.name == tpl.name:
                            self.problems.append(f"{where}: {tpl.name}.inherits: inheritance cycle: {cycle}")
                        break
                    seen.append(cur.name)
                    cur = tset.templates.get(cur.parent) if cur.parent else None
        rset = tpl.values.get("resource-set")
        if rset is not None and rset not in rsets:
            self.problems.append(f"{tpl.where('resource-set')}: {tpl.name}.resource-set: unknown resource set '{rset}' (not in resources.yaml)")
        for key in ("image", "user-data"):
            if isinstance(tpl.values.get(key), str):
                self.check_placeholders(tpl.values[key], tpl.file, tpl.key_lines.get(key, tpl.line), f"{tpl.name}.{key}")
        line = tpl.key_lines.get("mount-points", tpl.line)
        for tag, mount in (tpl.values.get("mount-points") or {}).items():
            self.check_placeholders(mount["path"], tpl.file, line, f"{tpl.name}.mount-points.{tag}.path")
        line = tpl.key_lines.get("persistent-drives", tpl.line)
        for drive in tpl.values.get("persistent-drives") or []:
            self.check_placeholders(drive["path"], tpl.file, line, f"{tpl.name}.persistent-drives")

    # -- repos.yaml (user first: it has priority)
    def repos(self, sysdir, userdir):
        out, seen = [], {}
        found_any = False
        for path, scope in ((os.path.join(userdir, "repos.yaml"), "user"), (os.path.join(sysdir, "repos.yaml"), "system")):
            data = self.read(path)
            if data is None:
                continue
            found_any = True
            checked = REPOS_SCHEMA.check(data, self.at(path, data))
            if checked is INVALID:
                continue
            items = data.get("repos") or []
            for i, repo in enumerate(checked["repos"]):
                line = line_of(items, i)
                if repo["name"] in seen:
                    self.problems.append(f"{path}:{line}: repos.{i}.name: repository '{repo['name']}' already defined at {seen[repo['name']]}")
                    continue
                seen[repo["name"]] = f"{path}:{line}"
                out.append(Repo(repo["name"], self.expand(repo["path"], path, line, f"repos.{i}.path"), scope, path, line))
        if not found_any:
            out.append(Repo("user", self.expand(DEFAULT_USER_REPO, "(built-in)", 0, "repos"), "user", "(built-in)", 0))
        return out


class BrokenTemplates:
    """Stands for the templates when their files are invalid (load_config(strict=False)): any use
    raises the ConfigError that lists their problems (exit status 3), so that a command that needs
    templates fails as before, and one that does not (ps, cancel, exec, image list) works."""

    def __init__(self, error, warnings=()):
        self._error = error
        self.used = False  # whether a command tried them (then it failed with their problems)
        self.other_warnings = list(warnings)  # the load's other warnings, shown with this one

    @property
    def error(self):
        return self._error

    def warning(self):
        """The one-line warning for a command that worked without them."""
        return (f"the templates were ignored: {len(self._error.problems)} problem(s) in their files, the first: "
                f"{self._error.problems[0]} (commands that need templates fail; see 'pcocc config validate')")

    def _fail(self):
        self.used = True
        raise self._error

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        self._fail()

    def __contains__(self, name):
        self._fail()


def load_config(env, strict=True):
    """Load the whole configuration; raise ConfigError listing every problem.

    strict=False (what commands get through Context.config): problems in the template files
    alone (templates.yaml, templates.d/*.yaml, and the checks of their templates) do not
    stop the load: config.templates is a BrokenTemplates that raises them when a command uses
    templates (the CLI warns, at the end of a command that did not: BrokenTemplates.warning). Problems anywhere else still raise.
    `pcocc config validate` loads strictly and reports every problem.
    """
    loader = _Loader(env)
    sysdir, userdir = env.system_conf_dir, env.user_conf_dir
    batch = loader.batch(sysdir)
    nets = loader.networks(sysdir)
    rsets = loader.resources(sysdir, nets)
    before = len(loader.problems)
    templates = loader.templates(sysdir, userdir, rsets)
    template_problems = loader.problems[before:]
    repos = loader.repos(sysdir, userdir)
    templates.use_repositories(repos)  # per-image templates (templates.py) are looked up in them
    if loader.problems and (strict or len(template_problems) != len(loader.problems)):
        raise ConfigError(loader.problems)
    if template_problems:
        error = ConfigError(template_problems)  # every problem there is: the rest of the files are valid
        templates = BrokenTemplates(error, loader.warnings)  # shown by the CLI, if the command works
    else:
        loader.show_warnings()
    return Config(sysdir, userdir, batch, nets, rsets, templates, repos, loader.files, loader.warnings)


_PROBLEM = re.compile(r"(?P<file>[^:]*?):(?P<line>\d+)(?::\d+)?: (?:(?P<key>[^\s:][^:]*?): )?(?P<message>.*)", re.S)


def problem_fields(text):
    """A problem line ("file:line: key: message") as {file, line, key, message}; the parts it
    lacks are None (line: int). For `config validate --json`."""
    m = _PROBLEM.fullmatch(text)
    if not m:
        return {"file": None, "line": None, "key": None, "message": text}
    return {"file": m["file"], "line": int(m["line"]), "key": m["key"], "message": m["message"]}
