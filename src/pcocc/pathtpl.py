"""Path templates in config values: %{env:VAR}, %{homedir}, %{user}, ...

Values are expanded where they are used, since some (%{clusterdir},
%{vm_rank}) are only known once a cluster runs.
"""

import re

from pcocc.errors import ConfigError

_PLACEHOLDER = re.compile(r"%\{([a-z_]+)(?::([^}]*))?\}")
KNOWN = ("env", "homedir", "user", "clusterdir", "vm_rank", "jobid")


def unknown_placeholders(text):
    """Names of placeholders in text that pcocc does not know (checked at load time)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1) not in KNOWN]


def expand(text, values, environ, where=""):
    """Replace placeholders in text with values (a dict) or environment variables."""

    def sub(m):
        name, arg = m.group(1), m.group(2)
        if name == "env":
            if not arg:
                raise ConfigError([f"{where}%{{env:VAR}} needs a variable name"])
            return environ.get(arg, "")
        if name in values and values[name] is not None:
            return str(values[name])
        raise ConfigError([f"{where}%{{{name}}} cannot be expanded here"])

    return _PLACEHOLDER.sub(sub, text)
