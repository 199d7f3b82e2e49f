"""The shape of the house: imports point one way (model.py imports nothing of kvnest), every file stays readable."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(path: Path) -> set:
    """Project modules a file imports, at the top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in MODULES and m != path.stem}


def test_imports_form_no_cycle_and_model_imports_nothing_of_the_project():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert graph["model"] == set()
    assert graph["errors"] == {"model"} and graph["losses"] == set()
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        if name in done:
            return
        visiting.append(name)
        for dep in graph[name]:
            visit(dep)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)
    methods = {"compress", "evict", "gate"}
    scripts = {"generate", "train", "search", "joint", "passkey", "bench", "eval", "kernels", "flags"}
    assert all(not graph[m] & scripts for m in methods | {"plan"}), "a method imports a script"


def test_every_file_stays_under_about_400_lines():
    long = {p.name: n for p in [*MODULES.values(), *ROOT.glob("tests/*.py")]
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
