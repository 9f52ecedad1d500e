"""dvc.yaml's code deps cannot drift: each stage lists exactly the pipeline/ files its module imports.

Imports are followed statically (ast, every ``import`` in a file, those inside functions too), from the stage's
module ``pipeline/stages/<stage>.py``; importing a module runs its packages' ``__init__.py`` files, so they count.
"""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def module_file(name: str) -> Path | None:
    """``pipeline.data.ingest`` -> pipeline/data/ingest.py (or a package's __init__.py); None outside pipeline."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(path: Path) -> set[str]:
    """The pipeline modules ``path`` names in its imports (``from pipeline.x import y``: x, and x.y if a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def code_deps(module: str) -> set[str]:
    """Every pipeline/ file importing ``module`` runs, relative to the repository root."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages above it run first
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported(path))
    return {str(p.relative_to(ROOT)) for p in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_each_stage_lists_exactly_the_code_it_imports():
    for name, stage in stages().items():
        listed = {d for d in stage.get("deps", []) if d.startswith("pipeline/")}
        expected = code_deps(f"pipeline.stages.{name}")
        assert listed == expected, (
            f"dvc.yaml stage {name}: missing {sorted(expected - listed)}, not imported {sorted(listed - expected)}"
        )


def test_the_import_follower_sees_lazy_imports():
    deps = code_deps("pipeline.training.transfer")  # transfer imports pipeline.tracking inside a function
    assert "pipeline/tracking.py" in deps and "pipeline/__init__.py" in deps


def import_graph() -> dict[str, set[str]]:
    """Each pipeline/ file -> the pipeline/ files its imports run: the modules named and their packages'
    ``__init__.py``, except the packages the file itself is in (Python is already running those)."""
    graph = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        own = {p / "__init__.py" for p in path.parents}
        edges = set()
        for name in imported(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:i]))
                if found is not None and found != path and found not in own:
                    edges.add(str(found.relative_to(ROOT)))
        graph[str(path.relative_to(ROOT))] = edges
    return graph


def test_no_module_imports_a_module_above_it():
    """The imports, those inside functions included, form no circle: every module sits below what imports it."""
    graph, done, path = import_graph(), set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        path.append(node)
        for child in sorted(graph[node]):
            visit(child)
        path.pop()
        done.add(node)

    for node in graph:
        visit(node)


def test_the_trained_model_record_imports_no_torch():
    """run.json's reader (evaluate's report, a notebook, transfer's check) costs no deep-learning stack."""
    import subprocess
    import sys

    code = "import sys, pipeline.runinfo; print(' '.join(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert not {m for m in loaded.stdout.split() if m.split(".")[0] in ("torch", "lightning", "torchvision")}


def test_the_package_never_imports_the_benchmarks():
    for path in (ROOT / "pipeline").rglob("*.py"):
        assert not {n for n in imported(path) if n.split(".")[0] == "benchmarks"}, path


def write_deps() -> None:
    """Rewrite each stage's code deps in dvc.yaml from its imports (``python -m tests.test_dvc_deps``)."""
    import textwrap

    lines, out, stage, i = (ROOT / "dvc.yaml").read_text().split("\n"), [], None, 0
    declared = stages()
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.strip()[:-1] in declared:
            stage = line.strip()[:-1]
        if stage and line.startswith("    deps: ["):
            while not lines[i].rstrip().endswith("]"):
                i += 1
            others = [f'"{d}"' for d in declared[stage]["deps"] if not d.startswith("pipeline/")]
            items = sorted(code_deps(f"pipeline.stages.{stage}")) + others
            wrapped = textwrap.wrap(
                ", ".join(items), width=104, break_long_words=False, break_on_hyphens=False
            )
            out.append("    deps: [" + "\n           ".join(wrapped) + "]")
            stage = None
        else:
            out.append(line)
        i += 1
    (ROOT / "dvc.yaml").write_text("\n".join(out))


if __name__ == "__main__":
    write_deps()
