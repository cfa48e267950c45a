"""Run records: written as the run goes, so that a failure or an interrupt leaves an accurate account; a
retried run keeps the record of every attempt; the summary the UI shows at the end of a run."""

import json
import socket
from pathlib import Path

import pytest

from flows.cli import print_run
from flows.runs import RunRecorder, retry_command, summary_markdown
from storage.errors import DataIntegrityError
from storage.store import StageRef, Store


def publish(store: Store, stage: str, version: str) -> None:
    store.publish(stage, version, lambda out: {}, params={}, inputs={}, code_version="c")


def saved(store: Store, run_id: str) -> dict:
    return json.loads((store.root / "runs" / f"{run_id}.json").read_text())


def test_each_stage_is_recorded_as_it_finishes_and_moves_latest(tmp_path):
    store = Store(tmp_path)
    publish(store, "extract", "e1")
    publish(store, "extract", "e2")
    recorder = RunRecorder(store, "r1", preset="tiny")
    assert saved(store, "r1")["status"] == "running"
    recorder.stage(StageRef("extract", "e1"), "cached")
    assert store.latest("extract") == "e1"  # the version this run used, even though e2 is newer
    assert saved(store, "r1")["stages"] == {"extract": {"version": "e1", "status": "cached"}}
    record = recorder.completed(summary={"val_loss": 1.0})
    assert saved(store, "r1") == record and record["status"] == "completed" and record["finished_at"]


def test_a_failure_and_an_interrupt_are_written_down_before_they_go_on(tmp_path):
    store = Store(tmp_path)
    failing = RunRecorder(store, "failing")
    with pytest.raises(DataIntegrityError), failing.attempt("extract"):
        raise DataIntegrityError("archive x.tar.xz is truncated\nmore detail")
    record = saved(store, "failing")
    assert record["status"] == "failed" and record["failed_stage"] == "extract"
    assert record["error"] == "DataIntegrityError: archive x.tar.xz is truncated"

    interrupted = RunRecorder(store, "interrupted")
    with pytest.raises(KeyboardInterrupt), interrupted.attempt("pretrain"):
        raise KeyboardInterrupt
    record = saved(store, "interrupted")
    assert record["status"] == "interrupted" and record["stages"]["pretrain"]["status"] == "interrupted"


def test_a_retried_run_keeps_the_record_of_each_attempt(tmp_path):
    """A retried flow run has the same run id: its record is the latest attempt, the earlier ones inside it."""
    store = Store(tmp_path)
    publish(store, "extract", "e1")
    first = RunRecorder(store, "r1", preset="tiny")
    first.stage(StageRef("extract", "e1"), "ran")
    with pytest.raises(OSError), first.attempt("clean"):
        raise OSError("disk unplugged")
    second = RunRecorder(store, "r1", preset="tiny")
    second.stage(StageRef("extract", "e1"), "cached")
    with pytest.raises(OSError), second.attempt("clean"):
        raise OSError("still unplugged")
    RunRecorder(store, "r1", preset="tiny").completed()

    record = saved(store, "r1")
    assert record["status"] == "completed" and record["attempt"] == 3
    assert [a["attempt"] for a in record["attempts"]] == [1, 2]
    assert [a["error"] for a in record["attempts"]] == ["OSError: disk unplugged", "OSError: still unplugged"]
    assert record["attempts"][0]["stages"]["extract"] == {"version": "e1", "status": "ran"}
    assert all("attempts" not in a for a in record["attempts"])  # each earlier attempt is kept once
    # The store still holds one record per run: `storage ls runs` and gc see the run once, as its latest attempt.
    assert [r["run_id"] for r in store.runs()] == ["r1"] and store.runs()[0]["status"] == "completed"


def test_an_attempt_whose_process_was_killed_is_kept_as_dead(tmp_path):
    store = Store(tmp_path)
    # Killed without a word (SIGKILL): its record says running, its pid (past Linux's pid_max) is gone.
    store.write_run("r1", {"run_id": "r1", "status": "running", "host": socket.gethostname(), "pid": 2**22 + 1})
    RunRecorder(store, "r1")
    assert saved(store, "r1")["attempts"][0]["status"] == "dead"


def test_the_summary_shows_each_stage_in_order_the_failure_and_the_losses(tmp_path, capsys):
    store = Store(tmp_path)
    publish(store, "extract", "e1")
    publish(store, "clean", "c1")
    recorder = RunRecorder(store, "r1", flow_run_name="tiny · until=pretrain")
    recorder.stage(StageRef("extract", "e1"), "cached")
    recorder.stage(StageRef("clean", "c1"), "ran")
    with pytest.raises(OSError), recorder.attempt("pretrain"):
        raise OSError("disk unplugged")
    text = summary_markdown(saved(store, "r1"))
    assert text.startswith("# tiny · until=pretrain: failed")
    # In pipeline order, though the record's file lists its stages by name.
    assert "| extract | `e1` | cached |\n| clean | `c1` | ran |\n| pretrain | - | failed |" in text
    assert "OSError: disk unplugged" in text
    print_run(saved(store, "r1"))
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:6]] == ["extract", "clean", "pretrain"]

    done = {
        **saved(store, "r1"),
        "status": "completed",
        "summary": {"pretrain_val_loss": 2.5, "unigram_val_loss": 5.25},
    }
    text = summary_markdown(done)
    assert "| pretrain | 2.5000 |" in text and "| unigram | 5.2500 | baseline: token frequencies only |" in text


def test_the_retry_command_names_the_run_and_the_flow_entrypoint(monkeypatch, tmp_path):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    assert retry_command("abc") == "prefect flow-run retry abc --entrypoint flows/pipeline.py:pipeline"
    monkeypatch.chdir(tmp_path)  # started elsewhere: the entrypoint's full path
    assert retry_command("abc").endswith(f"--entrypoint {root.as_posix()}/flows/pipeline.py:pipeline")
