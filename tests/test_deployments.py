"""Every deployment loads its entrypoint and its parameters validate against the flow's signature."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
DEPLOYMENTS = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_declares_the_pipeline_and_a_nightly_schedule():
    names = {d["name"] for d in DEPLOYMENTS}
    assert {"pipeline", "nightly-retrain"} <= names
    nightly = next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain")
    assert nightly["schedules"] and all(s.get("cron") for s in nightly["schedules"])


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_loads_and_parameters_validate(deployment, monkeypatch):
    monkeypatch.chdir(ROOT)  # prefect deploy resolves entrypoints against the working directory
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    validated = flow.validate_parameters(deployment.get("parameters") or {})
    assert validated["preset"] in {"tiny", "small", "gpt2"}
    for schedule in deployment.get("schedules") or []:
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))


def test_bad_parameters_are_rejected(monkeypatch):
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(DEPLOYMENTS[0]["entrypoint"])
    with pytest.raises(Exception, match="preset"):
        flow.validate_parameters({"preset": "huge"})
    with pytest.raises(Exception, match="only"):
        flow.validate_parameters({"selection": {"only": "tokens", "until": "pretrain"}})


def test_served_deployments_match_the_yaml(tmp_path):
    from flows.deploy import build_deployments

    served = {d.name: d for d in build_deployments(str(tmp_path / "store"))}
    assert set(served) == {d["name"] for d in DEPLOYMENTS}
    assert served["nightly-retrain"].schedules
    assert served["pipeline"].parameters["storage"] == str(tmp_path / "store")


def test_the_nightly_retraining_keeps_its_tokenizer_in_both_forms(tmp_path):
    from flows.config import preset_config
    from flows.deploy import build_deployments

    served = {d.name: d for d in build_deployments(str(tmp_path / "store"))}
    declared = next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain")
    for parameters in (served["nightly-retrain"].parameters, declared["parameters"]):
        assert preset_config(parameters["preset"], parameters["config"]).tokenizer.reuse == "latest"
    assert "config" not in next(d for d in DEPLOYMENTS if d["name"] == "pipeline")["parameters"]


def nightly_declared() -> dict:
    return next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain")


def test_the_nightly_runs_one_at_a_time_in_both_forms(tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.deploy import build_deployments

    served = {d.name: d for d in build_deployments(str(tmp_path / "store"))}["nightly-retrain"]
    assert served.concurrency_limit == 1
    assert served.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    declared = nightly_declared()["concurrency_limit"]
    assert declared["limit"] == 1
    assert ConcurrencyLimitStrategy(declared["collision_strategy"]) == ConcurrencyLimitStrategy.ENQUEUE


def test_the_nightly_schedule_names_its_time_zone_in_both_forms(tmp_path):
    from flows.deploy import NightlySchedule, build_deployments

    (declared,) = nightly_declared()["schedules"]
    served = {d.name: d for d in build_deployments(str(tmp_path / "store"))}["nightly-retrain"]
    (default,) = served.schedules
    assert (
        (declared["cron"], declared["timezone"])
        == (default.schedule.cron, default.schedule.timezone)
        == (
            "0 2 * * *",
            "UTC",
        )
    )
    chosen = NightlySchedule(cron="30 1 * * *", timezone="Europe/Berlin")
    (schedule,) = {d.name: d for d in build_deployments(str(tmp_path / "store"), chosen)}["nightly-retrain"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 1 * * *", "Europe/Berlin")


def test_a_time_zone_or_cron_that_does_not_exist_is_refused_naming_it():
    from pydantic import ValidationError

    from flows.deploy import NightlySchedule

    with pytest.raises(ValidationError, match="unknown time zone 'Europe/Atlantis'"):
        NightlySchedule(timezone="Europe/Atlantis")
    with pytest.raises(ValidationError, match="0 25"):
        NightlySchedule(cron="0 25 * * *")


def test_serve_refuses_an_unknown_time_zone_in_one_line(capsys):
    from flows.cli import main

    assert main(["serve", "--storage", "unused", "--timezone", "Mars/Olympus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptflow: error: invalid settings: timezone:") and "Mars/Olympus" in err
    assert len(err.splitlines()) == 1


def test_the_lateness_bound_travels_with_the_nightly_deployment_in_every_form(tmp_path, monkeypatch):
    from flows.deploy import MAX_START_DELAY_ENV, NightlySchedule, build_deployments, max_start_delay_hours

    default = NightlySchedule().max_start_delay_hours
    declared = nightly_declared()["work_pool"]["job_variables"]["env"][MAX_START_DELAY_ENV]
    pooled = {d.name: d for d in build_deployments(str(tmp_path), NightlySchedule(max_start_delay_hours=2.5), "pool")}
    assert pooled["nightly-retrain"].job_variables["env"][MAX_START_DELAY_ENV] == "2.5"
    assert not pooled["pipeline"].job_variables  # on-demand runs are never judged late
    monkeypatch.setenv(MAX_START_DELAY_ENV, declared)
    assert max_start_delay_hours() == default == 6
    monkeypatch.delenv(MAX_START_DELAY_ENV)
    assert max_start_delay_hours() == default


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_lateness_bound_that_is_not_a_number_of_hours_is_refused_naming_the_variable(value, monkeypatch):
    from flows.deploy import MAX_START_DELAY_ENV, max_start_delay_hours
    from storage.errors import ConfigError

    monkeypatch.setenv(MAX_START_DELAY_ENV, value)
    with pytest.raises(ConfigError, match=f"GPTFLOW_MAX_START_DELAY_HOURS='{value}'"):
        max_start_delay_hours()


SCHEDULED = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def started(hours: float) -> dict:
    return {"scheduled": SCHEDULED, "started": SCHEDULED + timedelta(hours=hours), "max_delay_hours": 6.0}


def test_a_scheduled_run_that_starts_past_the_bound_is_skipped_saying_why():
    from flows.deploy import stale_start_reason

    reason = stale_start_reason(auto_scheduled=True, run_count=1, **started(6 + 1 / 60))
    assert reason is not None
    assert "6.0 h after its scheduled time 2026-03-01 02:00 UTC" in reason and "max_start_delay_hours=6" in reason


def test_a_scheduled_run_that_starts_late_but_within_the_bound_does_its_work():
    from flows.deploy import stale_start_reason

    assert stale_start_reason(auto_scheduled=True, run_count=1, **started(6)) is None  # exactly on the bound
    assert stale_start_reason(auto_scheduled=True, run_count=1, **started(0.1)) is None


def test_a_run_someone_asked_for_is_never_skipped_however_late():
    from flows.deploy import stale_start_reason

    assert stale_start_reason(auto_scheduled=False, run_count=1, **started(30)) is None  # triggered by hand
    assert stale_start_reason(auto_scheduled=True, run_count=2, **started(30)) is None  # the UI's Retry of it
