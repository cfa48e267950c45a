"""The gptflow pipeline as one Prefect flow. The body only orders stages; the work lives in tasks/.

Every stage task is cached on its version id, so a rerun after a failure recomputes only the failed stage
and the ones after it, and a rerun with nothing changed computes nothing.
"""

import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.checks import CHECKED_STAGES, check_task
from flows.config import PipelineOverrides, Preset, overrides_dict, preset_config
from flows.deploy import skip_stale_schedule
from flows.plan import StageSelection, plan_stages, selection_label
from flows.preflight import check_run
from flows.runs import RunRecorder, summary_artifact
from storage.store import StageRef, Store
from tasks import clean, dedup, download, evaluate, extract, finetune, pretrain, quantize, tokenizer, tokens
from tasks.sample_data import default_source_dir, ensure_sample_archive
from tasks.shardmap import dask_cluster
from tasks.stage import result_storage

STAGES = {
    module.STAGE.name: (module.STAGE, getattr(module, f"{module.STAGE.name}_task"))
    for module in (download, extract, clean, dedup, tokenizer, tokens, pretrain, finetune, quantize, evaluate)
}

STAGE_INPUTS = {name: stage.inputs for name, (stage, _) in STAGES.items()}


def run_name() -> str:
    """A flow run's name in the Prefect UI: its preset and selection, e.g. `tiny · until=tokens · force=clean`."""
    parameters = flow_run.parameters
    return " · ".join([str(parameters.get("preset") or "tiny"), selection_label(parameters.get("selection"))])


@flow(
    name="gptflow-pipeline",
    description="Archives to an evaluated, quantized GPT; every stage versioned.",
    flow_run_name=run_name,
)
def pipeline(
    storage: str = "storage",
    preset: Preset = "tiny",
    sources: list[str] | None = None,
    config: PipelineOverrides | None = None,  # type: ignore[valid-type]
    selection: StageSelection | None = None,
    verify: bool = False,
    dask: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline (or the selected part of it) and return the run record.

    The workers of a Dask cluster (`dask`) must see the same store path and reach the same Prefect API.

    Args:
        storage: The store's root folder, as the machine running the flow sees it.
        preset: The settings to start from: tiny (CPU, minutes), small (one GPU, hours), gpt2 (several GPUs).
        sources: Archive URLs or paths (http, https, file:// or local); empty: the embedded default corpus.
        config: Changes to the preset, as a --config file holds them; fields left empty keep the preset's.
        selection: Which stages run (only, from, until) and which are recomputed even if stored (force).
        verify: Reuse a stored version only if every file matches its sha256 (reads every byte).
        dask: The address of a Dask scheduler (tcp://host:8786) to run the data stages' per-shard task runs.
    """
    log = get_run_logger()
    if (skipped := skip_stale_schedule()) is not None:  # a nightly run that starts too late does no work
        return skipped
    store = Store(storage)
    selection = selection or StageSelection()
    overrides = overrides_dict(config)
    cfg = preset_config(preset, overrides)
    plan = plan_stages(selection, STAGE_INPUTS)
    if sources:
        cfg = cfg.with_sources(sources)
    check_run(store, plan, selection, cfg, sources, verify)
    if "download" in plan.run and not cfg.sources:
        cfg = cfg.with_sources([str(ensure_sample_archive(default_source_dir()))])
    run_id = str(flow_run.id or uuid.uuid4())
    recorder = RunRecorder(
        store,
        run_id,
        flow_run_name=flow_run.name,
        preset=preset,
        overrides=overrides,
        plan=list(plan.run),
        config=cfg.model_dump(mode="json"),
    )

    refs: dict[str, StageRef] = {}
    with summary_artifact(recorder, log):  # however the run ends, its Artifacts tab says how far it got
        for name in plan.from_store:
            with recorder.attempt(name):
                refs[name] = StageRef(name, store.require_latest(name), reused=True)
                if name in CHECKED_STAGES:  # a stored corpus is checked too before a stage reads it
                    check_task(str(store.root), name, refs[name].version, cfg.checks, cfg.pretrain.block_size)
            recorder.stage(refs[name], "latest")
        with dask_cluster(dask):  # where the data stages' shards run: here, or on the cluster
            for name in plan.run:
                stage, stage_task = STAGES[name]
                with recorder.attempt(name):
                    state = stage_task.with_options(result_storage=result_storage(store.root))(
                        str(store.root),
                        cfg.stage_config(name),
                        {input_name: refs[input_name] for input_name in stage.inputs},
                        force=name in selection.force,
                        verify=verify,
                        return_state=True,
                    )
                    refs[name] = state.result()  # raises the stage's own error if it failed
                    if name in CHECKED_STAGES:  # its data checks: a bad corpus stops the run before pretraining
                        check_task(str(store.root), name, refs[name].version, cfg.checks, cfg.pretrain.block_size)
                status = "cached" if state.name == "Cached" else ("reused" if refs[name].reused else "ran")
                recorder.stage(refs[name], status)
                log.info("%-9s %s  %s", name, refs[name].version, status)
        return recorder.completed(summary=summarize(store, refs))


# What the end of a run shows of each data stage's manifest: how much data there was, and what was set aside.
DATA_COUNTS = {
    "extract": ("docs", "inner_archives", "quarantined_archives", "corrupt_fraction", "oversized_members"),
    "clean": ("docs_in", "kept", "removed", "removed_by_reason"),
    "dedup": ("docs_in", "kept", "exact_duplicates", "near_duplicates"),
    "tokens": ("train_tokens", "val_tokens", "train_docs", "val_docs"),
}


def summarize(store: Store, refs: dict[str, StageRef]) -> dict[str, Any]:
    """The few numbers a person wants at the end of a run: the data stages' counts (quarantined inner
    archives included) and the evaluation's headline metrics."""
    summary: dict[str, Any] = {}
    data = {}
    for stage, keys in DATA_COUNTS.items():
        if stage in refs:
            metrics = store.manifest(stage, refs[stage].version)["metrics"]
            data[stage] = {key: metrics[key] for key in keys if key in metrics}
    if data:
        summary["data"] = data
    if "evaluate" in refs:
        summary.update(store.manifest("evaluate", refs["evaluate"].version)["metrics"])
    return summary
