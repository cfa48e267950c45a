"""The command line as a user meets it: a real `gptflow` process, one-line errors, exit codes."""

import logging
import os
import subprocess
import sys

import pytest
from builders import publish_docs

from flows.cli import ConsoleWithoutUserTracebacks, main
from storage.errors import DataIntegrityError
from storage.store import Store


def gptflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def log_line(formatter: logging.Formatter, error: BaseException) -> str:
    try:
        raise error
    except type(error):
        info = sys.exc_info()
    record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "stage failed", None, info)
    return formatter.format(record)


def test_console_hides_tracebacks_of_user_errors_only():
    console = ConsoleWithoutUserTracebacks(logging.Formatter("%(message)s"))
    assert log_line(console, DataIntegrityError("x.tar.xz is truncated")) == "stage failed"
    assert "Traceback" in log_line(console, RuntimeError("a bug"))


@pytest.mark.slow
def test_a_missing_source_is_one_line_on_stderr_without_a_traceback(tmp_path):
    missing = tmp_path / "missing.tar.xz"
    result = gptflow("run", "--storage", str(tmp_path / "store"), "--source", str(missing), "--until", "download")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"gptflow: error: source {missing}: {missing} does not exist"]
    assert not (tmp_path / "store").exists()  # refused before any stage, or any run record


def test_every_usage_mistake_is_one_line_and_exit_2_before_any_stage(tmp_path, capsys):
    store = tmp_path / "store"
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"x")
    (tmp_path / "settings.yaml").write_text("pretrain:\n  max_steps: true\n")
    (tmp_path / "file-store").write_text("not a folder")
    (tmp_path / "data.yaml").write_text(f"finetune:\n  data: {tmp_path / 'pairs.jsonl'}\n")
    (tmp_path / "reuse.yaml").write_text("tokenizer:\n  reuse: 0123abcd\n")
    for args, message in [
        (["--source", str(tmp_path)], f"source {tmp_path}: {tmp_path} is a folder, not a file"),
        (["--source", "ftp://example.org/a.tar"], "unsupported scheme 'ftp'"),
        (["--source", str(archive), "--source", str(archive)], "is listed twice"),
        (["--only", "tokens"], "--only tokens needs a stored dedup version and"),
        (["--config", str(tmp_path / "settings.yaml")], "pretrain.max_steps: Input should be a valid integer"),
        (["--config", str(tmp_path / "data.yaml"), "--source", str(archive)], "pairs.jsonl does not exist"),
        (["--config", str(tmp_path / "reuse.yaml"), "--source", str(archive)], "0123abcd"),
    ]:
        code, err = run_main(capsys, "--storage", str(store), *args)
        assert code == 2, args
        assert len(err) == 1 and err[0].startswith("gptflow: error: ") and message in err[0], (args, err)
    code, err = run_main(capsys, "--storage", str(tmp_path / "file-store"), "--source", str(archive))
    assert code == 2 and err == [f"gptflow: error: --storage {tmp_path / 'file-store'} is a file, not a folder"]
    assert not store.exists()


def test_a_damaged_or_mismatched_stored_input_is_refused_before_the_run(tmp_path, capsys):
    store = Store(tmp_path / "store")
    publish_docs(store.root, "dedup", [[("a", "text")]], version="d1")
    publish_docs(store.root, "dedup", [[("a", "text")]], version="d2")
    store.publish(
        "tokenizer",
        "t1",
        lambda out: (out / "tokenizer.json").write_text("{}"),
        params={},
        inputs={"dedup": "d1"},
        code_version="c",
    )
    store.set_latest("dedup", "d2")
    code, err = run_main(capsys, "--storage", str(store.root), "--only", "tokens")
    assert code == 2 and "the latest tokenizer (t1) was built from dedup/d1, but the latest dedup is d2" in err[0]
    store.set_latest("dedup", "d1")
    (store.path("tokenizer", "t1") / "tokenizer.json").unlink()
    code, err = run_main(capsys, "--storage", str(store.root), "--only", "tokens")
    assert code == 2 and "tokenizer/t1 in" in err[0] and "is damaged (tokenizer.json is missing)" in err[0]


def run_main(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["run", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--storage", str(tmp_path / "store"), "--only", "nonsense"])
    assert exited.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    for args, message in [
        (["--only", "tokens", "--source", "x.tar"], "--source is read by the download stage"),
        (["--until", "clean", "--force", "pretrain"], "--force pretrain: not among the stages this run executes"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: no such settings file"),
        (["--preset", "huge"], "unknown preset 'huge'"),
    ]:
        code, err = run_main(capsys, "--storage", str(tmp_path / "store"), *args)
        assert code == 2, args
        (line,) = err
        assert line.startswith("gptflow: error: ") and message in line
    assert not (tmp_path / "store").exists()
    assert main(["storage", "--storage", str(tmp_path / "store"), "show", "abc"]) == 2
    assert capsys.readouterr().err.strip() == f"gptflow: error: no version in {tmp_path / 'store'} match 'abc'"


@pytest.mark.slow
def test_sample_data_writes_the_openwebtext_archive(tmp_path):
    result = gptflow("sample-data", str(tmp_path / "out"))
    assert result.returncode == 0
    archive = tmp_path / "out" / "openwebtext.tar.xz"
    assert result.stdout.strip() == str(archive)
    assert archive.read_bytes()[:6] == b"\xfd7zXZ\x00"  # xz magic


def test_storage_ls_runs_shows_a_killed_run_as_dead(tmp_path, capsys):
    import socket

    store = Store(tmp_path / "store")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    base = {"status": "running", "host": socket.gethostname(), "stages": {}}
    store.write_run("killed", {**base, "run_id": "killed", "started_at": "2026-01-01", "pid": int(gone.stdout)})
    store.write_run("alive", {**base, "run_id": "alive", "started_at": "2026-01-02", "pid": os.getpid()})
    assert main(["storage", "--storage", str(store.root), "ls", "runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["killed", "alive"]
    assert lines[0].split()[2] == "dead" and lines[1].split()[2] == "running"
