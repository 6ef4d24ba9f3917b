"""A small declarative checker for YAML config values.

Each kind of value is a checker object with `check(value, at)`, which returns
the value converted (or INVALID) and records every problem in `at.problems`
as "file:line: key: what was expected". Checking goes on after a problem, so
that `pcocc config validate` can report every error at once.
"""

import re
from dataclasses import dataclass, field

from pcocc.config.yamlfile import LList, LMap

INVALID = object()


class Problems(list):
    """Collected config problems, in the order found."""


@dataclass(frozen=True)
class At:
    """Where a value sits: file, line and dotted key path."""

    file: str
    line: int
    key: str
    problems: Problems = field(compare=False)

    def child(self, key, line):
        path = f"{self.key}.{key}" if self.key else str(key)
        return At(self.file, line or self.line, path, self.problems)

    def error(self, message):
        self.problems.append(f"{self.file}:{self.line}: {self.key or '(top)'}: {message}")
        return INVALID


def _kind(value):
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {value!r}"
    return f"{type(value).__name__} {value!r}"


class Str:
    def __init__(self, pattern=None, what=None):
        self.pattern = re.compile(pattern) if pattern else None
        self.what = what or "a string"

    def check(self, value, at):
        # YAML turns 1.0 or 42 into numbers; a version or id written bare is still meant as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return at.error(f"expected {self.what}, got {_kind(value)}")
        if self.pattern and not self.pattern.fullmatch(value):
            return at.error(f"expected {self.what}, got {value!r}")
        return value


class Int:
    def __init__(self, min=None, max=None):
        self.min, self.max = min, max

    def check(self, value, at):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return at.error(f"expected an integer, got {_kind(value)}")
        if self.min is not None and value < self.min:
            return at.error(f"expected an integer >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            return at.error(f"expected an integer <= {self.max}, got {value}")
        return value


class Bool:
    WORDS = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}

    def check(self, value, at):
        if isinstance(value, str) and value.lower() in self.WORDS:
            return self.WORDS[value.lower()]
        if not isinstance(value, bool):
            return at.error(f"expected a boolean (true/false), got {_kind(value)}")
        return value


class Enum:
    def __init__(self, *choices):
        self.choices = choices

    def check(self, value, at):
        if value not in self.choices:
            return at.error(f"expected one of {', '.join(map(str, self.choices))}, got {_kind(value)}")
        return value


class ListOf:
    def __init__(self, item, scalar_ok=False):
        self.item = item
        self.scalar_ok = scalar_ok  # a single value stands for a list of one

    def check(self, value, at):
        if self.scalar_ok and not isinstance(value, (list, dict)) and value is not None:
            value = [value]
        if not isinstance(value, list):
            return at.error(f"expected a list, got {_kind(value)}")
        lines = getattr(value, "lines", {})
        out = [self.item.check(v, at.child(i, lines.get(i))) for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in out) else out


class MapOf:
    """A mapping with free keys (names chosen by the admin) and values of one kind."""

    def __init__(self, value, key=None):
        self.value = value
        self.key = key or Str()

    def check(self, value, at):
        if value is None:
            value = LMap()
        if not isinstance(value, dict):
            return at.error(f"expected a mapping, got {_kind(value)}")
        lines = getattr(value, "lines", {})
        out, bad = {}, False
        for k, v in value.items():
            sub = at.child(k, lines.get(k))
            if self.key.check(k, sub) is INVALID:
                bad = True
                continue
            out[k] = self.value.check(v, sub)
            bad = bad or out[k] is INVALID
        return INVALID if bad else out


@dataclass(frozen=True)
class F:
    """A field of a Struct."""

    kind: object
    required: bool = False
    default: object = None


class Struct:
    """A mapping with known keys; unknown keys are errors.

    unknown_ok: unknown keys are left out of the result instead (the caller may
    warn about them: see unknown_keys).
    """

    def __init__(self, fields, what="mapping", unknown_ok=False):
        self.fields = fields
        self.what = what
        self.unknown_ok = unknown_ok

    def unknown_keys(self, value):
        """The keys of a mapping value that are not fields, in file order."""
        return [k for k in value if k not in self.fields] if isinstance(value, dict) else []

    def check(self, value, at):
        if value is None:
            value = LMap()
        if not isinstance(value, dict):
            return at.error(f"expected a {self.what}, got {_kind(value)}")
        lines = getattr(value, "lines", {})
        out, bad = {}, False
        for k in value:
            if k not in self.fields and not self.unknown_ok:
                known = ", ".join(sorted(self.fields))
                at.child(k, lines.get(k)).error(f"unknown key (known keys: {known})")
                bad = True
        for name, f in self.fields.items():
            if name in value:
                out[name] = f.kind.check(value[name], at.child(name, lines.get(name)))
                bad = bad or out[name] is INVALID
            elif f.required:
                at.error(f"missing required key '{name}'")
                bad = True
            else:
                out[name] = f.default
        return INVALID if bad else out


def line_of(value, key=None, default=1):
    """Line of a loaded mapping or list, or of one of its keys."""
    if key is not None and isinstance(value, (LMap, LList)):
        return value.lines.get(key, getattr(value, "line", default))
    return getattr(value, "line", default) or default


class ByKind:
    """A value that may take several shapes, chosen by its YAML kind.

    `shapes` maps a Python type (str, dict, list, bool, int) to the checker used
    for values of that type; `convert` turns the checked value into one form.
    """

    def __init__(self, shapes, what, convert=None):
        self.shapes = shapes
        self.what = what
        self.convert = convert

    def check(self, value, at):
        for kind, checker in self.shapes.items():
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                out = checker.check(value, at)
                if out is INVALID or self.convert is None:
                    return out
                return self.convert(out)
        return at.error(f"expected {self.what}, got {_kind(value)}")


class Nullable:
    """A value that may also be written as nothing (`key:` or `key: null`), which gives `null`.

    The original pcocc reads a key set to nothing as "not set here": in a template
    it resets an inherited value to the default (pcocc-templates.yaml(5)), in
    resources.yaml an empty `networks:` is a set without networks.
    """

    def __init__(self, kind, null=None):
        self.kind = kind
        self.null = null

    def check(self, value, at):
        if value is None:
            return self.null() if callable(self.null) else self.null
        return self.kind.check(value, at)

    def __getattr__(self, name):  # the wrapped checker's attributes (what, choices, ...)
        if name in ("kind", "null") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.kind, name)


class Const:
    def __init__(self, value):
        self.value = value

    def check(self, value, at):
        if value != self.value:
            return at.error(f"expected {self.value!r}, got {_kind(value)}")
        return value


class Anything:
    """Free-form data (e.g. cloud-config user-data), passed on as is."""

    def check(self, value, at):
        return value


class OneKeyMap:
    """A mapping of exactly one key to its options: `- /path: {opt: value}`."""

    def __init__(self, value, key=None):
        self.inner = MapOf(value, key)

    def check(self, value, at):
        if len(value) != 1:
            return at.error(f"expected a mapping of one key to its options, got {len(value)} keys")
        return self.inner.check(value, at)
