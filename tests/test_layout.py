"""The package's layering (DESIGN.md): data flows one way, cli -> {analysis, train, infer,
serve, bench} -> {evaluate, weights, data, runtime} -> core; the feature packages never import
each other, with one exception: serve runs the inference path (infer's optimize and its
engines) behind HTTP, so serve may import infer (and nothing may import serve). The page's
model card comes from analysis through the CLI, as data. Read from the import statements of
every module."""
import ast
from pathlib import Path

import resnetkit

ROOT = Path(resnetkit.__file__).parent
CORE = {"errors", "config", "layers", "blocks", "features", "geometry", "model", "zoo", "options",
        "untrusted"}
BASE = {"runtime", "data", "weights", "evaluate"}
FEATURES = {"analysis", "explain", "train", "infer", "serve"}
SERVES = {"serve": {"infer"}}  # the one feature -> feature edge: serving runs inference
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
