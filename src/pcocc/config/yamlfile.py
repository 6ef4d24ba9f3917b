"""Safe YAML loading that remembers the line of every key and item.

Mappings load as LMap and sequences as LList: plain dict and list with a
`line` attribute (the node's own line) and `lines` (line of each key or item),
so that every config error can say file:line.
"""

import yaml

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - libyaml missing
    from yaml import SafeLoader as _Loader

from pcocc.errors import ConfigError


class LMap(dict):
    line = 0
    lines = {}


class LList(list):
    line = 0
    lines = {}


class _ScalarConstructor(yaml.constructor.SafeConstructor):
    pass


def _convert(node, ctor, path, active=frozenset()):
    line = node.start_mark.line + 1
    if id(node) in active:
        raise ConfigError([f"{path}:{line}: recursive alias"])
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out = LMap()
        out.line, out.lines = line, {}
        ctor.flatten_mapping(node)  # merge keys (<<)
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise ConfigError([f"{path}:{knode.start_mark.line + 1}: a mapping key must be a plain value"])
            key = _convert(knode, ctor, path, active)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise ConfigError([f"{path}:{knode.start_mark.line + 1}: invalid key {key!r}"])
            key = str(key)
            if key in out:
                raise ConfigError([f"{path}:{knode.start_mark.line + 1}: {key}: duplicate key (first on line {out.lines[key]})"])
            out[key] = _convert(vnode, ctor, path, active)
            out.lines[key] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LList()
        out.line, out.lines = line, {}
        for i, item in enumerate(node.value):
            out.append(_convert(item, ctor, path, active))
            out.lines[i] = item.start_mark.line + 1
        return out
    if "\x00" in node.value:  # a "\0" escape: no path, name or argument of pcocc may hold one
        raise ConfigError([f"{path}:{line}: invalid value: it holds a NUL character"])
    try:
        return ctor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}:{line}: invalid value: {getattr(exc, 'problem', exc)}"]) from None
    except (ValueError, TypeError, IndexError, OverflowError):  # e.g. '!!int' on an empty value
        raise ConfigError([f"{path}:{line}: invalid value for tag {node.tag}: {node.value!r}"]) from None


def parse(text, path):
    """Parse YAML text; an empty document gives None."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{path}:{line}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError([f"{path}:{line}: invalid YAML: unacceptable character {exc.character!r}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}:1: invalid YAML: {' '.join(str(exc).split())}"]) from None
    if node is None:
        return None
    return _convert(node, _ScalarConstructor(), path)


def load(path):
    """Load a YAML file; a missing file gives None."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:1: cannot read: {exc}"]) from None
    return parse(text, path)
