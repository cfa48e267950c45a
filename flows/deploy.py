"""Serving the deployments from one process, for the Prefect UI without a work pool (`gptflow serve`).

Teams with a work pool use deployments/prefect.yaml instead; both declare the same two deployments.
"""

from pathlib import Path

from prefect import serve as prefect_serve

from flows.pipeline import pipeline

NIGHTLY_CRON = "0 2 * * *"
# A nightly retraining keeps its tokenizer (the first night, with none stored, trains one), so that its models
# stay comparable and the old shards' token encodings are reused.
NIGHTLY_CONFIG = {"tokenizer": {"reuse": "latest"}}


def build_deployments(storage: str, cron: str = NIGHTLY_CRON) -> list:
    storage = str(Path(storage).expanduser().resolve())  # runs may start in another working directory
    on_demand = pipeline.to_deployment(
        name="pipeline",
        description="The whole pipeline, or part of it (selection: only / from_stage / until / force).",
        parameters={"storage": storage, "preset": "tiny"},
        tags=["gptflow"],
    )
    nightly = pipeline.to_deployment(
        name="nightly-retrain",
        description="Nightly: re-checks the sources and retrains what changed, keeping the tokenizer; unchanged "
        "stages and shards are cached.",
        parameters={"storage": storage, "preset": "tiny", "config": NIGHTLY_CONFIG},
        cron=cron,
        tags=["gptflow", "nightly"],
    )
    return [on_demand, nightly]


def serve(storage: str, cron: str = NIGHTLY_CRON) -> None:
    prefect_serve(*build_deployments(storage, cron))
