"""The package's layering (DESIGN.md): data flows one way, cli -> {analysis, train, infer,
serve, bench} -> {evaluate, weights, data, runtime} -> core; the feature packages never import
each other, with one exception: serve runs the inference path (infer's runner) behind HTTP
and shows explain's Grad-CAM on its page, so serve may import infer and explain (and nothing
may import serve). The page's
model card comes from analysis through the CLI, as data. Read from the import statements of
every module."""
import ast
import sys
from pathlib import Path

import pytest

import resnetkit

ROOT = Path(resnetkit.__file__).parent
CORE = {"errors", "config", "layers", "blocks", "features", "geometry", "model", "zoo", "options",
        "untrusted", "fused"}
BASE = {"runtime", "data", "weights", "evaluate"}
FEATURES = {"analysis", "explain", "train", "infer", "serve"}
# the feature -> feature edges: serving runs inference, and shows explain's heatmaps
SERVES = {"serve": {"infer", "explain"}}
TOP = {"bench", "experiments", "render", "cli", "cli_parser", "__main__", "__init__"}


def _part(module: str) -> str:
    """resnetkit.train.trainer -> train; resnetkit.zoo -> zoo."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The resnetkit modules a file imports, as absolute names."""
    here = "resnetkit." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = here.rsplit(".", 1)[0] if path.name != "__init__.py" else here.removesuffix(".__init__")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out |= {n for n in names if n.startswith("resnetkit")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("resnetkit")}
    return out


def test_every_module_is_placed():
    parts = {_part("resnetkit." + ".".join(p.relative_to(ROOT).with_suffix("").parts))
             for p in ROOT.rglob("*.py")}
    assert parts <= CORE | BASE | FEATURES | TOP, parts - (CORE | BASE | FEATURES | TOP)


def test_imports_flow_one_way():
    allowed = {**{p: CORE for p in CORE}, **{p: CORE | BASE for p in BASE},
               **{p: CORE | BASE | {p} | SERVES.get(p, set()) for p in FEATURES}}
    wrong = []
    for path in ROOT.rglob("*.py"):
        me = _part("resnetkit." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        if me in TOP:
            continue
        for target in _imports(path):
            t = _part(target)
            if t not in allowed[me] and not (t == "__init__" and target == "resnetkit"):
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert wrong == []


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (a package's __init__ named by
    the package; `from pkg import sub` counts as an import of pkg.sub where sub is a module,
    else of pkg), imports inside functions included."""
    mods = {("resnetkit." + ".".join(p.relative_to(ROOT).with_suffix("").parts))
            .removesuffix(".__init__"): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                        if node.level else "")
                mod = ".".join(x for x in (base, node.module or "") if x)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and not name.startswith(t + "."):
                    out.add(t)  # a module's own packages are loaded before it, not by it
        graph[name] = out
    return graph


def test_no_import_cycle():
    graph = _module_graph()
    assert len(graph) > 50 and graph["resnetkit.infer.source"] >= {"resnetkit.weights.checkpoint"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None
    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check itself, on a package of two modules that import each other in functions."""
    pkg = tmp_path / "resnetkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    with pytest.raises(AssertionError, match="resnetkit.a -> resnetkit.b -> resnetkit.a|"
                                             "resnetkit.b -> resnetkit.a -> resnetkit.b"):
        graph = _module_graph()
        monkeypatch.setattr(sys.modules[__name__], "_module_graph", lambda: {
            **graph, "resnetkit.infer.source": {"resnetkit.weights.checkpoint"},
            **{f"x{i}": set() for i in range(60)}})
        test_no_import_cycle()
