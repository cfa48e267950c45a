"""Every deployment loads its entrypoint and its parameters validate against the flow's signature."""

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
