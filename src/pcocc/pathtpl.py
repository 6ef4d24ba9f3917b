"""Path templates in config values: %{env:VAR}, %{homedir}, %{user}, ...

Values are expanded where they are used, since some (%{clusterdir},
%{vm_rank}) are only known once a cluster runs.

The forms follow the original pcocc (pcocc-templates.yaml(5) and its path
expansion): a name may be braced (%{homedir}) or not (%homedir, the name being
the longest run of lowercase letters, digits and _ after the %), and %% stands
for a single %. A braced name pcocc does not know is a config error (caught at
load time); an unbraced one is left as written, as the original leaves it (a
path may hold a literal %, like /data/50%off).
"""

import re

from pcocc.errors import ConfigError

# one of: %% | %{name} | %{env:VAR} | %name
_PLACEHOLDER = re.compile(r"%(?:(?P<percent>%)|\{(?P<braced>[a-z_]+)(?::(?P<arg>[^}]*))?\}|(?P<bare>[_a-z][_a-z0-9]*))")
KNOWN = ("env", "homedir", "user", "clusteruser", "clusterdir", "vm_rank", "jobid")


def unknown_placeholders(text):
    """Names of braced placeholders in text that pcocc does not know (checked at load time)."""
    return [m["braced"] for m in _PLACEHOLDER.finditer(text) if m["braced"] and m["braced"] not in KNOWN]


def expand(text, values, environ, where=""):
    """text with its placeholders replaced.

    values: {name: value} of the names known where the path is used (homedir,
    user, clusterdir, vm_rank, jobid; clusteruser, the cluster owner's user
    name, defaults to user: a VM runs as its owner). environ: the variables
    %{env:VAR} reads (unset: empty). Returns a str. Raises ConfigError (one
    line, prefixed by where) for a known name with no value here, or
    %{env:} without a variable name.
    """
    values = dict(values)
    if values.get("clusteruser") is None:
        values["clusteruser"] = values.get("user")

    def sub(m):
        if m["percent"]:
            return "%"
        name = m["braced"] or m["bare"]
        if name == "env" and m["braced"]:
            if not m["arg"]:
                raise ConfigError([f"{where}%{{env:VAR}} needs a variable name"])
            return environ.get(m["arg"], "")
        if name in values and values[name] is not None:
            return str(values[name])
        if m["bare"] and (name not in KNOWN or name == "env"):
            return m.group(0)  # not a placeholder of ours: the text stays as written
        raise ConfigError([f"{where}%{{{name}}} cannot be expanded here"])

    return _PLACEHOLDER.sub(sub, text)
