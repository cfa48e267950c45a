"""Code fingerprints: a hash of the project source a stage really runs.

Prefect's TASK_SOURCE hashes only the task function's own text, not the helpers it calls, so a change in
a helper would silently reuse stale outputs. Here a stage's fingerprint covers its module and, transitively,
every project module it imports (resolved statically from the import statements).
"""

import ast
import hashlib
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("flows", "tasks", "model", "storage")
# Plumbing every stage imports that cannot change a stage's output: how versions are published, retried
# and shown in the UI. Left out so that a fix there does not invalidate every stored version (a week of
# training included). A module that computes anything a stage writes never belongs here.
PLUMBING = frozenset({"tasks.stage", "tasks.results", "tasks.shardmap", "tasks.artifacts", "storage.fingerprint"})


def _module_file(root: Path, name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    as_module = root.joinpath(*parts).with_suffix(".py")
    if as_module.is_file():
        return as_module
    as_package = root.joinpath(*parts, "__init__.py")
    return as_package if as_package.is_file() else None


def _imports(root: Path, path: Path) -> set[str]:
    """Project modules imported by the file at `path` (and the packages they live in)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.rsplit(".", 1)[0] if "." in package else ""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    found: set[str] = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if _module_file(root, prefix) is not None:
                found.add(prefix)
    return found


def module_closure(module: str, root: Path = PROJECT_ROOT, plumbing: frozenset[str] = PLUMBING) -> list[Path]:
    """Every project source file that `module` runs: itself and its transitive project imports, less the
    `plumbing` modules (and what only they import) unless `module` is one of them."""
    start = _module_file(root, module)
    if start is None:
        raise ValueError(f"{module!r} is not a module of this project under {root}")
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (name in plumbing and name != module):
            continue
        path = _module_file(root, name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imports(root, path) - seen.keys())
    return sorted(seen.values())


@cache
def code_fingerprint(module: str, root: Path = PROJECT_ROOT, plumbing: frozenset[str] = PLUMBING) -> str:
    """A short hash of the sources in `module_closure(module)`, stable across machines and checkouts."""
    digest = hashlib.sha256()
    for path in module_closure(module, root, plumbing):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@cache
def _library_version(name: str) -> str:
    if name == "python":  # the interpreter's own modules (unicodedata's tables, tarfile) change by minor release
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """{name: installed version} of the distributions named (and "python"): what computes a stage's output
    besides its own code, so that an upgrade that can change the output makes new versions."""
    return {name: _library_version(name) for name in names}
