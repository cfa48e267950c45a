"""The run record: which version of each stage one pipeline run used or made (storage/runs/<run_id>.json)."""

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from storage.store import StageRef, Store, process_started


class RunRecorder:
    """Collects each stage's outcome and writes the record after every change, so a run that dies midway
    still leaves an accurate record of what it did."""

    def __init__(self, store: Store, run_id: str, **info: Any) -> None:
        self.store = store
        self.run_id = run_id
        self.record: dict[str, Any] = {
            "run_id": run_id,
            "started_at": datetime.now(UTC).isoformat(),
            "finished_at": None,
            "status": "running",
            # Which process writes this record: gc keeps a running run's versions while it is alive.
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": process_started(os.getpid()),
            **info,
            "stages": {},
        }
        self._write()

    def stage(self, ref: StageRef, status: str) -> None:
        """status: ran (built now), cached (Prefect cache hit), reused (already stored), latest (taken as is)."""
        self.store.set_latest(ref.stage, ref.version)
        self.record["stages"][ref.stage] = {"version": ref.version, "status": status}
        self._write()

    @contextmanager
    def attempt(self, stage: str) -> Iterator[None]:
        """Whatever ends the block early (a failed stage, an interrupt) is written down before it goes on."""
        try:
            yield
        except BaseException as error:
            interrupted = isinstance(error, KeyboardInterrupt)
            self.record["stages"][stage] = {"version": None, "status": "interrupted" if interrupted else "failed"}
            self.record.update(
                status="interrupted" if interrupted else "failed", failed_stage=stage, error=one_line(error)
            )
            self._finish()
            raise

    def completed(self, **extra: Any) -> dict[str, Any]:
        self.record.update(status="completed", **extra)
        self._finish()
        return self.record

    def _finish(self) -> None:
        self.record["finished_at"] = datetime.now(UTC).isoformat()
        self._write()

    def _write(self) -> None:
        self.store.write_run(self.run_id, self.record)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
