"""The project's modules import each other one way only (BRIEF / issue 11):

    bench.py -> kernel_bench.py -> run.py -> runners.py -> planner.py -> checkpoint.py -> model.py -> kernels.py

A module may import any module to its right, never one to its left (nor itself). Imports
inside functions count too: a lazy import is still a dependency. Read from the source with
ast, nothing is imported.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top first. kernel_bench sits right below bench.py: bench hands it the ceiling measurements.
LAYERS = ["bench", "kernel_bench", "run", "server", "runners", "planner", "checkpoint", "model", "kernels"]


def project_imports(path: str, project: set[str]) -> dict[str, int]:
    """{project module: first line number} for every import of a project module in `path`."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in project:
                found[name] = min(found.get(name, node.lineno), node.lineno)
    return found


def test_every_module_has_a_place_in_the_order():
    modules = {n[:-3] for n in os.listdir(REPO) if n.endswith(".py")}
    unplaced = sorted(modules - set(LAYERS))
    assert not unplaced, (f"{unplaced} not in tests/test_imports.py LAYERS: put each new module "
                          "where its imports allow (it may import only modules to its right)")
    assert set(LAYERS) <= modules, f"LAYERS names missing files: {sorted(set(LAYERS) - modules)}"


def test_no_module_imports_one_above_it():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for name in LAYERS:
        for imported, line in project_imports(os.path.join(REPO, name + ".py"), set(LAYERS)).items():
            if rank[imported] <= rank[name]:
                wrong.append(f"{name}.py:{line} imports {imported} (above it or itself)")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    # The checker itself, on a file written here: top-level, function-level and `from` forms.
    src = tmp_path / "m.py"
    src.write_text("import os\nimport model as m\n\ndef f():\n    from runners import x\n"
                   "    import kernels.sub\n    from . import bench\n")
    got = project_imports(str(src), set(LAYERS))
    assert got == {"model": 2, "runners": 5, "kernels": 6}
