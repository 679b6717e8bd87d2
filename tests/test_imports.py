"""The package's modules import each other without circles (issue 17: model <-> interop through
net.to_torch was one), counting imports inside functions too, relative and absolute; the
top-level kernels/ folder counts as npbptt.kernels, as it installs."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "npbptt"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _graph():
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = ("npbptt",) + p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    for p in KERNELS.glob("*.py"):
        mods["npbptt.kernels" if p.stem == "__init__" else f"npbptt.kernels.{p.stem}"] = p
    graph = {}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)]
                    m = ".".join(base + ([n.module] if n.module else []))
                else:
                    m = n.module or ""
                out |= {m} & mods.keys()
                out |= {f"{m}.{a.name}" for a in n.names} & mods.keys()
            elif isinstance(n, ast.Import):
                out |= {a.name for a in n.names} & mods.keys()
        graph[name] = out - {"npbptt", name}   # the package's __init__ re-exports: not a dependency
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


def test_kernel_modules_depend_one_way():
    """The CPU backend's paths never import its entry points (cpu.py chooses between them), and
    the CUDA backend imports nothing of the CPU backend's but the shared modules."""
    g = _graph()
    assert {"npbptt.kernels.cpu_small", "npbptt.kernels.cpu_layers"} <= g["npbptt.kernels.cpu"]
    for m in ("npbptt.kernels.cpu_small", "npbptt.kernels.cpu_layers"):
        assert "npbptt.kernels.cpu" not in g[m], m
    cpu_private = {"npbptt.kernels.cpu", "npbptt.kernels.cpu_small", "npbptt.kernels.cpu_layers",
                   "npbptt.kernels.runtime"}
    assert "npbptt.kernels.shared" in g["npbptt.kernels.gpu"]
    assert not g["npbptt.kernels.gpu"] & cpu_private, g["npbptt.kernels.gpu"] & cpu_private


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
