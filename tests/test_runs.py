"""Run records: written as the run goes, so that a failure or an interrupt leaves an accurate account."""

import json

import pytest

from storage.errors import DataIntegrityError
from storage.store import StageRef, Store
from tasks.runs import RunRecorder


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
