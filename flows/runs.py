"""The run record: which version of each stage one pipeline run used or made (storage/runs/<run_id>.json),
and the summary of it that the command line prints and the Prefect UI shows."""

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.plan import STAGE_ORDER
from storage.store import StageRef, Store, process_started, run_status
from tasks.artifacts import publish_markdown

# The artifact that ends every run, cached or not: its stages' versions and statuses, and the losses.
SUMMARY_ARTIFACT = "gptflow-summary"


class RunRecorder:
    """Collects each stage's outcome and writes the record after every change, so a run that dies midway
    still leaves an accurate record of what it did.

    A retried flow run keeps its run id: its record is the latest attempt, with the records of the earlier
    ones, oldest first, in its `attempts`."""

    def __init__(self, store: Store, run_id: str, **info: Any) -> None:
        self.store = store
        self.run_id = run_id
        attempts = earlier_attempts(store.read_run(run_id))
        self.record: dict[str, Any] = {
            "run_id": run_id,
            "attempt": len(attempts) + 1,
            "started_at": datetime.now(UTC).isoformat(),
            "finished_at": None,
            "status": "running",
            # Which process writes this record: gc keeps a running run's versions while it is alive.
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": process_started(os.getpid()),
            **info,
            "stages": {},
            "attempts": attempts,
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


def earlier_attempts(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The attempts before a new one of the run whose latest record is `previous`, oldest first. An attempt
    that still says `running` had its process killed (a retry starts only once a run has ended): `dead`."""
    if previous is None:
        return []
    attempts = list(previous.get("attempts") or [])
    last = {key: value for key, value in previous.items() if key != "attempts"}
    last["status"] = run_status(last)
    return [*attempts, last]


def retry_command(flow_run_id: object) -> str:
    """The command that retries a flow run started from the command line (no deployment): Prefect runs the
    flow at the entrypoint again under the same run id, and its completed stages come from the cache."""
    entrypoint = Path(__file__).resolve().with_name("pipeline.py")
    try:  # from where the run was started, as short as it can be
        entrypoint = entrypoint.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"prefect flow-run retry {flow_run_id} --entrypoint {entrypoint.as_posix()}:pipeline"


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- the summary ----------------------------------------------------------------------------------------

# The models whose validation loss ends a run's summary, as the evaluate stage names them.
LOSS_MODELS = ("pretrain", "finetune", "quantized")


def stage_rows(record: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(stage, version, status) of each stage of a run, in pipeline order (a record read back from its file
    lists its stages by name)."""
    stages = record["stages"]
    order = sorted(stages, key=lambda name: STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER))
    return [(name, stages[name]["version"], stages[name]["status"]) for name in order]


def val_losses(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(model, validation loss, note) of each model evaluated, then of the bigram and unigram baselines."""
    rows = [(name, summary[f"{name}_val_loss"], "") for name in LOSS_MODELS if f"{name}_val_loss" in summary]
    if "bigram_val_loss" in summary:
        rows.append(("bigram", summary["bigram_val_loss"], "baseline: the previous token only"))
    if "unigram_val_loss" in summary:
        rows.append(("unigram", summary["unigram_val_loss"], "baseline: token frequencies only"))
    return rows


def quarantine_note(summary: dict[str, Any]) -> str | None:
    """One line on the inner archives set aside as corrupt, when there were any."""
    extract = summary.get("data", {}).get("extract", {})
    if not extract.get("quarantined_archives"):
        return None
    return (
        f"extract: {extract['quarantined_archives']} of {extract.get('inner_archives', '?')} inner archives "
        f"quarantined as corrupt ({extract.get('corrupt_fraction', 0):.2%}); see the extract manifest"
    )


def summary_markdown(record: dict[str, Any]) -> str:
    """The run as the Prefect UI shows it at its end: each stage's version and status, and the losses."""
    title = record.get("flow_run_name") or record["run_id"]
    lines = [
        f"# {title}: {record['status']}",
        "",
        f"run `{record['run_id']}`, attempt {record.get('attempt', 1)}, started {record['started_at'][:19]}",
        "",
        "| stage | version | status |",
        "|---|---|---|",
        *(
            f"| {stage} | {f'`{version}`' if version else '-'} | {status} |"
            for stage, version, status in stage_rows(record)
        ),
    ]
    if record.get("failed_stage"):
        lines += ["", f"**{record['failed_stage']} {record['status']}**: {record.get('error', '')}"]
    summary = record.get("summary") or {}
    if quarantined := quarantine_note(summary):
        lines += ["", quarantined]
    if "champion" in summary:
        lines += ["", f"champion: **{summary['champion']}**"]
    if losses := val_losses(summary):
        lines += ["", "| model | val loss | |", "|---|---|---|"]
        lines += [f"| {name} | {loss:.4f} | {note} |" for name, loss, note in losses]
    return "\n".join(lines) + "\n"


@contextmanager
def summary_artifact(recorder: RunRecorder, log: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    """However the block ends (completed, failed, interrupted), the run's record as a markdown artifact."""
    try:
        yield
    finally:
        try:
            markdown = summary_markdown(recorder.record)
        except Exception as exc:  # a view of the record: never the error the run ends with
            log.warning("artifact %s not created: %s", SUMMARY_ARTIFACT, exc)
        else:
            description = f"run {recorder.run_id}: each stage's version and status, and the validation losses"
            publish_markdown(SUMMARY_ARTIFACT, markdown, description, log)
