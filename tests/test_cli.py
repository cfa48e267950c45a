"""The command line as a user meets it: a real `gptflow` process, one-line errors, exit codes."""

import logging
import os
import subprocess
import sys

import pytest

from flows.cli import ConsoleWithoutUserTracebacks
from storage.errors import DataIntegrityError


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
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.startswith("gptflow:")]
    assert last == [f"gptflow: error: source {missing}: {missing} does not exist"]
    record = next((tmp_path / "store" / "runs").glob("*.json")).read_text()
    assert '"failed_stage": "download"' in record


def test_usage_errors_exit_2_before_any_work(tmp_path):
    result = gptflow("run", "--storage", str(tmp_path / "store"), "--only", "nonsense")
    assert result.returncode == 2 and "invalid choice: 'nonsense'" in result.stderr
    for args, message in [
        (["--only", "tokens", "--source", "x.tar"], "--source is read by the download stage"),
        (["--until", "clean", "--force", "pretrain"], "--force pretrain: not among the stages this run executes"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: no such settings file"),
        (["--preset", "huge"], "unknown preset 'huge'"),
    ]:
        result = gptflow("run", "--storage", str(tmp_path / "store"), *args)
        assert result.returncode == 2, args
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("gptflow: error: ") and message in line
    assert not (tmp_path / "store").exists()
    result = gptflow("storage", "--storage", str(tmp_path / "store"), "show", "abc")
    assert result.returncode == 2
    assert result.stderr.strip() == f"gptflow: error: no version in {tmp_path / 'store'} match 'abc'"


def test_sample_data_writes_the_openwebtext_archive(tmp_path):
    result = gptflow("sample-data", str(tmp_path / "out"))
    assert result.returncode == 0
    archive = tmp_path / "out" / "openwebtext.tar.xz"
    assert result.stdout.strip() == str(archive)
    assert archive.read_bytes()[:6] == b"\xfd7zXZ\x00"  # xz magic
