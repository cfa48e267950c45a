"""Code fingerprints cover the helpers a stage calls, not only the stage's own text."""

from pathlib import Path

from storage.fingerprint import code_fingerprint, module_closure


def make_project(root: Path) -> None:
    for pkg in ("tasks", "model", "storage"):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("")
    (root / "model" / "helpers.py").write_text("def f():\n    return 1\n")
    (root / "model" / "unrelated.py").write_text("X = 1\n")
    (root / "tasks" / "stage_a.py").write_text("import json\nfrom model.helpers import f\n")
    (root / "tasks" / "stage_b.py").write_text("from . import stage_a\n")


def test_closure_follows_absolute_and_relative_imports(tmp_path):
    make_project(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in module_closure("tasks.stage_b", tmp_path)}
    assert names == {
        "tasks/__init__.py",
        "tasks/stage_a.py",
        "tasks/stage_b.py",
        "model/__init__.py",
        "model/helpers.py",
    }


def test_changing_a_helper_changes_the_fingerprint(tmp_path):
    make_project(tmp_path)
    before = code_fingerprint("tasks.stage_b", tmp_path)
    (tmp_path / "model" / "unrelated.py").write_text("X = 2\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint("tasks.stage_b", tmp_path) == before
    (tmp_path / "model" / "helpers.py").write_text("def f():\n    return 2\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint("tasks.stage_b", tmp_path) != before


def test_real_stage_fingerprint_covers_the_store():
    files = {p.name for p in module_closure("tasks.stage")}
    assert {"stage.py", "store.py", "fingerprint.py", "errors.py"} <= files
