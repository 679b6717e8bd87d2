"""The package's modules import each other without circles (issue 17: model <-> interop through
net.to_torch was one), counting imports inside functions too."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "npbptt"


def _graph():
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = ("npbptt",) + p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)]
                m = ".".join(base + ([n.module] if n.module else []))
                out |= {m} & mods.keys()
                out |= {f"{m}.{a.name}" for a in n.names} & mods.keys()
        graph[name] = out - {"npbptt"}      # the package's __init__ re-exports: not a dependency
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    g = _graph()
    assert "npbptt.interop" in g["npbptt.crosscheck"]      # the graph sees real imports
    assert _cycle(g) is None, " -> ".join(_cycle(g))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
