"""No import circles between pcocc's modules (issue 12, section 7): two modules that import each
other, even lazily inside a function, are one module in two files. A package may import its own
submodules (a registry of drivers, a factory), which is not a circle of layers."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def modules():
    out = {}
    for path in (SRC / "pcocc").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def dependencies(mods):
    """{module: {module it imports, at any depth of its code}}, without a package's own submodules."""
    deps = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module in mods and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in mods else node.module)
        deps[name] = {d for d in found if d != name and not d.startswith(name + ".")}
    return deps


def cycles(deps):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in deps.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def test_the_detector_finds_a_lazy_circle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_pcocc_has_no_import_circle():
    assert cycles(dependencies(modules())) == []
