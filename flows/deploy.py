"""The two deployments, declared once: **pipeline** (on demand) and **nightly-retrain** (on a schedule).

`gptflow serve` runs them from its own process (no work pool); `gptflow server start` (flows/server.py)
registers them to a process work pool of a local Prefect server; deployments/prefect.yaml declares the same
two for `prefect deploy`.

The nightly deployment runs one at a time, on a cron schedule read in a stated time zone, and a run the
schedule made that starts too late skips its work (`skip_stale_schedule`, the first thing the flow does).
"""

import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.errors import ConfigError

# A nightly retraining keeps its tokenizer (the first night, with none stored, trains one), so that its models
# stay comparable and the old shards' token encodings are reused.
NIGHTLY_CONFIG = {"tokenizer": {"reuse": "latest"}}

# How a nightly run learns its lateness bound: from the environment of the process that runs it (the serve
# process, or the work pool's job variables), since it is a property of the deployment, not a flow parameter.
MAX_START_DELAY_ENV = "GPTFLOW_MAX_START_DELAY_HOURS"


class NightlySchedule(BaseModel):
    """When the nightly retraining runs, and how late a scheduled run may still start."""

    model_config = ConfigDict(extra="forbid")

    cron: str = Field(
        "0 2 * * *",
        description="Cron expression of the nightly run (02:00: the machines are idle, and a tiny or small "
        "run is done by morning).",
    )
    timezone: str = Field(
        "UTC",
        description="IANA time zone the cron expression is read in, e.g. Europe/Berlin (UTC: the same night "
        "wherever the server is); the Prefect UI shows it beside the schedule.",
    )
    max_start_delay_hours: float = Field(
        6.0,
        ge=0,
        description="A scheduled run that starts more than this many hours after its scheduled time (the server "
        "or worker was down, or the previous night's run held the slot) skips its work: it ends Skipped (a "
        "Completed state) and says why. "
        "6: a 02:00 run not started by 08:00 would compete for the machines with the working day; the next "
        "night's run retrains on the same data, its unchanged stages cached.",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.schedules import Cron

        Cron(value)  # raises ValueError naming the expression
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Berlin)") from None
        return value


def build_deployments(storage: str, nightly: NightlySchedule | None = None, work_pool: str | None = None) -> list:
    """The pipeline and nightly-retrain deployments on the store at `storage`; with `work_pool`, for that pool
    (the nightly's lateness bound then travels as a job variable; served, it is the serve process's own)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    nightly = nightly or NightlySchedule()
    storage = str(Path(storage).expanduser().resolve())  # runs may start in another working directory
    # By module path, not file path: a worker finds the flow wherever gptflow is installed, whatever its
    # working directory (the process worker starts each run in a fresh temporary one).
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "work_pool_name": work_pool}
    on_demand = pipeline.to_deployment(
        name="pipeline",
        description="The whole pipeline, or part of it (selection: only / from_stage / until / force).",
        parameters={"storage": storage, "preset": "tiny"},
        tags=["gptflow"],
        **common,
    )
    retrain = pipeline.to_deployment(
        name="nightly-retrain",
        description="Nightly: re-checks the sources and retrains what changed, keeping the tokenizer; unchanged "
        "stages and shards are cached. One run at a time; a scheduled run that starts more than "
        f"{nightly.max_start_delay_hours:g} h late skips its work.",
        parameters={"storage": storage, "preset": "tiny", "config": NIGHTLY_CONFIG},
        schedules=[Cron(nightly.cron, timezone=nightly.timezone)],
        # Never two nightly runs at once: they would retrain the same models side by side. ENQUEUE, not
        # CANCEL_NEW: a run that finds the previous night's still going waits for it and then costs little
        # (its unchanged stages are cached), so the new night's data is not left for another day; how long it
        # may wait is bounded by max_start_delay_hours, past which it skips itself.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        job_variables={"env": {MAX_START_DELAY_ENV: f"{nightly.max_start_delay_hours:g}"}} if work_pool else None,
        tags=["gptflow", "nightly"],
        **common,
    )
    return [on_demand, retrain]


def serve(storage: str, nightly: NightlySchedule | None = None) -> None:
    """Serve both deployments from this process until it is stopped. Prefect then pauses both (the UI shows
    them Paused, and no nightly run is scheduled while nothing would run it); serving them again resumes them."""
    from prefect import serve as prefect_serve

    nightly = nightly or NightlySchedule()
    os.environ[MAX_START_DELAY_ENV] = f"{nightly.max_start_delay_hours:g}"  # the runs it starts inherit it
    prefect_serve(*build_deployments(storage, nightly))


# -- the staleness guard --------------------------------------------------------------------------------


def max_start_delay_hours() -> float:
    """The lateness bound of the running deployment: $GPTFLOW_MAX_START_DELAY_HOURS, else the default."""
    raw = os.environ.get(MAX_START_DELAY_ENV)
    if raw is None or not raw.strip():
        return NightlySchedule.model_fields["max_start_delay_hours"].default
    try:
        hours = float(raw)
    except ValueError:
        hours = math.nan
    if not hours >= 0 or math.isinf(hours):
        raise ConfigError(f"{MAX_START_DELAY_ENV}={raw!r}: not a number of hours >= 0")
    return hours


def stale_start_reason(
    *, auto_scheduled: bool, run_count: int, scheduled: datetime, started: datetime, max_delay_hours: float
) -> str | None:
    """Why a flow run should skip its work, or None to do it.

    Only a run the schedule made is judged, and only on its first attempt: a run someone triggered, or a
    retry someone asked for, is wanted now and always does its work. A run exactly `max_delay_hours` late
    still runs.
    """
    if not auto_scheduled or run_count > 1:
        return None
    late = started - scheduled
    if late <= timedelta(hours=max_delay_hours):
        return None
    return (
        f"scheduled run skipped: it started {late.total_seconds() / 3600:.1f} h after its scheduled time "
        f"{scheduled.astimezone(UTC):%Y-%m-%d %H:%M} UTC, more than max_start_delay_hours="
        f"{max_delay_hours:g}; the next scheduled run processes the same data"
    )


def skip_stale_schedule() -> Any:
    """The pipeline flow's first call: for a scheduled run that starts too late, the state the flow returns
    instead of doing its work; None otherwise (and outside a flow run, a plain `gptflow run`).

    That state is Completed, named Skipped, its message the reason: the UI lists the run as a green
    "Skipped" with the reason in its logs and state. Cancelled would read as someone's doing, and a flow
    that returns a Cancelled state makes Prefect 3.9.1 log an ERROR with a CancelledRun traceback.
    """
    from prefect import get_run_logger
    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run
    from prefect.states import Completed

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.expected_start_time is None:
        return None
    reason = stale_start_reason(
        auto_scheduled=bool(context.flow_run.auto_scheduled),
        run_count=flow_run.run_count,
        scheduled=flow_run.scheduled_start_time,
        started=datetime.now(UTC),
        max_delay_hours=max_start_delay_hours(),
    )
    if reason is None:
        return None
    get_run_logger().warning("%s", reason)
    return Completed(name="Skipped", message=reason)
