"""The layers: flows -> tasks -> model / storage, never upwards; and tasks/ holds stages and the machinery
they share, nothing that only the orchestration uses."""

import ast
from pathlib import Path

from storage.fingerprint import module_closure

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of the project's packages.
ALLOWED = {
    "storage": {"storage"},
    "model": {"model", "storage"},
    "tasks": {"tasks", "model", "storage"},
    "flows": {"flows", "tasks", "model", "storage"},
}


def project_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return [name for name in found if name.split(".")[0] in ALLOWED]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_no_package_imports_a_layer_above_it() -> None:
    wrong = [
        f"{module_name(path)} imports {name}"
        for package, allowed in ALLOWED.items()
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in project_imports(path)
        if name.split(".")[0] not in allowed
    ]
    assert wrong == []


def test_every_module_in_tasks_is_a_stage_or_used_by_one() -> None:
    modules = {module_name(path) for path in (ROOT / "tasks").rglob("*.py") if path.name != "__init__.py"}
    stages = {
        name for name in modules if "\nSTAGE = " in (ROOT / Path(*name.split("."))).with_suffix(".py").read_text()
    }
    used = {module_name(path) for stage in stages for path in module_closure(stage, ROOT, frozenset())}
    assert len(stages) == 10
    assert sorted(modules - used) == []
