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


def test_plumbing_is_left_out_but_not_what_it_alone_would_hide(tmp_path):
    make_project(tmp_path)
    (tmp_path / "tasks" / "frame.py").write_text("from model import unrelated\n")
    (tmp_path / "tasks" / "stage_c.py").write_text("from tasks import frame\nfrom model.helpers import f\n")
    plumbing = frozenset({"tasks.frame"})
    names = {p.relative_to(tmp_path).as_posix() for p in module_closure("tasks.stage_c", tmp_path, plumbing)}
    assert "tasks/frame.py" not in names and "model/unrelated.py" not in names
    assert "model/helpers.py" in names
    before = code_fingerprint("tasks.stage_c", tmp_path, plumbing)
    (tmp_path / "tasks" / "frame.py").write_text("from model import unrelated  # reworded\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint("tasks.stage_c", tmp_path, plumbing) == before


def test_real_stages_cover_their_helpers_and_skip_the_plumbing():
    clean = {p.relative_to(p.parents[1]).as_posix() for p in module_closure("tasks.clean")}
    assert {"tasks/clean.py", "tasks/shards.py", "storage/errors.py"} <= clean
    assert not clean & {"tasks/stage.py", "tasks/artifacts.py"}
    pretrain = {p.relative_to(p.parents[1]).as_posix() for p in module_closure("tasks.pretrain")}
    assert {"model/gpt.py", "model/train.py", "model/data.py", "storage/tokens.py"} <= pretrain
