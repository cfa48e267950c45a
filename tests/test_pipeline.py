"""The whole pipeline under a real (test) Prefect server: a first run builds every stage, a second is fully
cached, a failed stage is rerun alone with the stages after it, and the command line works on top."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.config import PipelineOverrides, deep_merge
from flows.pipeline import pipeline
from flows.plan import STAGE_ORDER, StageSelection
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store
from tasks.sample_data import default_corpus_documents, write_openwebtext_archive

pytestmark = pytest.mark.slow

# Small enough for seconds per stage on 2 CPU cores, large enough that every stage has real work.
TEST_SETTINGS = {
    "extract": {"shard_docs": 100},
    "tokenizer": {"kind": "bpe", "vocab_size": 320},
    "pretrain": {
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 32,
        "batch_size": 16,
        "max_steps": 200,
        "learning_rate": 1e-2,
        "min_lr": 1e-3,
        "warmup_steps": 5,
        "eval_interval": 50,
        "eval_steps": 2,
        "checkpoint_interval": 50,
    },
    "finetune": {"max_steps": 6, "warmup_steps": 1, "eval_interval": 3, "eval_steps": 1, "checkpoint_interval": 3},
    "quantize": {"eval_tokens": 2048, "latency_runs": 1},
    "evaluate": {"eval_tokens": 4096, "max_new_tokens": 8, "prompts": ["The module"]},
}


def config(**overrides) -> dict:
    """The flow's `config` parameter as the API sends it: changes laid over the (tiny) preset."""
    return deep_merge(TEST_SETTINGS, overrides)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "openwebtext.tar.xz"
    write_openwebtext_archive(default_corpus_documents()[:300], path, docs_per_subset=60, subsets_per_file=3)
    return path


@pytest.fixture(scope="module")
def first_run(prefect_harness, corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("store")
    record = pipeline(storage=str(storage), sources=[str(corpus)], config=config())
    return storage, record


def statuses(record: dict) -> dict[str, str]:
    return {stage: info["status"] for stage, info in record["stages"].items()}


def run_artifacts(run_id: str, key: str) -> list[str]:
    """The markdown of each artifact `key` that flow run `run_id` created, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    wanted = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        return [a.data for a in sorted(client.read_artifacts(artifact_filter=wanted), key=lambda a: a.created)]


def task_run_names(run_id: str, expected: set[str]) -> set[str]:
    """The names of flow run `run_id`'s task runs, once they include `expected` (the server records task runs
    from their events, a moment after they happen) or after 30 s."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            names = {run.name for run in runs}
            if expected <= names or time.monotonic() > deadline:
                return names
            time.sleep(0.5)


def all_versions(store: Store) -> set[tuple[str, str]]:
    return {(stage, m["version"]) for stage in store.stages() for m in store.versions(stage)}


def test_first_run_builds_every_stage_to_the_storage_contract(first_run):
    storage, record = first_run
    store = Store(storage)
    assert record["status"] == "completed"
    assert statuses(record) == {stage: "ran" for stage in STAGE_ORDER}
    saved = json.loads((storage / "runs" / f"{record['run_id']}.json").read_text())
    assert saved["stages"] == record["stages"]
    assert saved["preset"] == "tiny" and saved["overrides"]["pretrain"]["max_steps"] == 200
    assert saved["config"]["pretrain"]["max_steps"] == 200  # the full settings: the run is reproducible
    for stage in STAGE_ORDER:
        version = store.latest(stage)
        assert version == record["stages"][stage]["version"]
        manifest = store.manifest(stage, version)
        assert manifest["prefect"]["flow_run_id"] == record["run_id"]
        for name, info in manifest["files"].items():
            assert (store.path(stage, version) / name).stat().st_size == info["bytes"]
        for input_stage, input_version in manifest["inputs"].items():
            assert store.has(input_stage, input_version)
    for stage in ("extract", "clean", "dedup"):
        shards = sorted((store.path(stage, store.latest(stage)) / "docs").glob("*.parquet"))
        assert shards and {"doc_id", "text"} <= set(pq.read_schema(shards[0]).names)
    removed = list((store.path("clean", store.latest("clean")) / "removed").glob("*.parquet"))
    assert removed and "reason" in pq.read_schema(removed[0]).names
    tokens = store.path("tokens", store.latest("tokens"))
    meta = json.loads((tokens / "meta.json").read_text())
    assert (tokens / "train.bin").stat().st_size == meta["train_tokens"] * np.dtype(meta["dtype"]).itemsize
    assert meta["tokenizer_version"] == store.latest("tokenizer")
    metrics = [json.loads(line) for line in (store.path("pretrain", store.latest("pretrain")) / "metrics.jsonl").open()]
    assert metrics[-1]["step"] == 200 and any("val_loss" in m for m in metrics)
    report = json.loads((store.path("evaluate", store.latest("evaluate")) / "report.json").read_text())
    for name in ("pretrain", "finetune", "quantized"):
        assert {"val_loss", "perplexity", "bits_per_byte"} <= set(report["models"][name])
    # Even 200 steps of a 1-layer model beat predicting tokens by their frequency alone.
    assert report["models"]["pretrain"]["val_loss"] < report["unigram_val_loss"]
    assert record["summary"]["champion"] in report["models"]


def test_second_run_with_nothing_changed_computes_nothing(first_run, corpus):
    storage, _ = first_run
    store = Store(storage)
    before = all_versions(store)
    record = pipeline(storage=str(storage), sources=[str(corpus)], config=config())
    assert all_versions(store) == before
    # Download asks the source for its identity on every run and finds it unchanged; every other stage is a
    # Prefect cache hit.
    expected = {stage: "cached" for stage in STAGE_ORDER} | {"download": "reused"}
    assert statuses(record) == expected
    # The UI: each task run named by its stage and version, and a summary artifact though nothing ran.
    versions = {stage: info["version"] for stage, info in record["stages"].items()}
    named = {f"{stage} {version}" for stage, version in versions.items()}
    assert named <= task_run_names(record["run_id"], named)
    (summary,) = run_artifacts(record["run_id"], "gptflow-summary")
    assert all(f"| {stage} | `{versions[stage]}` | {expected[stage]} |" in summary for stage in STAGE_ORDER)
    assert f"| pretrain | {record['summary']['pretrain_val_loss']:.4f} |" in summary
    assert record["flow_run_name"] == "tiny · all stages" and summary.startswith("# tiny · all stages: completed")


def test_a_failed_stage_is_rerun_alone_with_the_stages_after_it(first_run, corpus):
    storage, _ = first_run
    store = Store(storage)
    changed = config(pretrain={"max_steps": 201})
    # Break the pretrain stage's scratch space so that it fails (as a full disk or a bad mount would).
    work = storage / "pretrain" / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.write_text("not a folder")
    with pytest.raises(OSError):
        pipeline(storage=str(storage), sources=[str(corpus)], config=changed)
    failed = max(store.runs(), key=lambda r: r["started_at"])
    assert failed["status"] == "failed" and failed["failed_stage"] == "pretrain"
    assert statuses(failed)["tokens"] == "cached"

    work.unlink()
    before = all_versions(store)
    record = pipeline(storage=str(storage), sources=[str(corpus)], config=changed)
    done = statuses(record)
    assert [s for s in STAGE_ORDER if done[s] == "ran"] == ["pretrain", "finetune", "quantize", "evaluate"]
    assert {done[s] for s in ("extract", "clean", "dedup", "tokenizer", "tokens")} == {"cached"}
    new = all_versions(store) - before
    assert {stage for stage, _ in new} == {"pretrain", "finetune", "quantize", "evaluate"}


def test_cli_only_runs_one_stage_on_the_latest_inputs(first_run, tmp_path, capsys):
    storage, _ = first_run
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(deep_merge(TEST_SETTINGS, {"quantize": {"eval_tokens": 1024}})))
    latest_finetune = Store(storage).latest("finetune")
    code = main(["run", "--storage", str(storage), "--only", "quantize", "--config", str(settings)])
    assert code == 0
    out = capsys.readouterr().out
    record = max(Store(storage).runs(), key=lambda r: r["started_at"])
    assert statuses(record) == {"finetune": "latest", "tokens": "latest", "quantize": "ran"}
    assert Store(storage).manifest("quantize", Store(storage).latest("quantize"))["inputs"]["finetune"] == (
        latest_finetune
    )
    assert "quantize" in out and "ran" in out


def test_cli_rejects_bad_settings_before_running(tmp_path, capsys):
    settings = tmp_path / "bad.yaml"
    settings.write_text("pretrain:\n  n_layer: 0\n")
    assert main(["run", "--storage", str(tmp_path / "s"), "--config", str(settings)]) == 2
    err = capsys.readouterr().err
    assert "pretrain.n_layer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_cli_storage_ls_and_show(first_run, capsys):
    storage, record = first_run
    assert main(["storage", "--storage", str(storage), "ls"]) == 0
    listing = capsys.readouterr().out
    assert all(stage in listing for stage in STAGE_ORDER)
    version = record["stages"]["tokens"]["version"]
    assert main(["storage", "--storage", str(storage), "show", version[:8]]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "tokens"
    assert main(["storage", "--storage", str(storage), "show", "zzzz"]) == 2


def test_cli_generate_samples_from_the_finetuned_model(first_run, capsys):
    storage, record = first_run
    args = ["generate", "--storage", str(storage), "--prompt", "The", "--max-new-tokens", "5", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # a fixed seed gives the same sample
    assert first.startswith("The")
    assert main([*args[:3], "--prompt", "textwrap.wrap(text)", "--instruction", "--max-new-tokens", "5"]) == 0
    assert "### Response" not in capsys.readouterr().out  # only the answer is printed
    assert main([*args[:3], "--model", record["stages"]["tokens"]["version"], "--prompt", "x"]) == 2
    assert "is not a model" in capsys.readouterr().err


def test_selection_rejects_contradictions():
    with pytest.raises(ValueError, match="--only cannot be combined"):
        StageSelection(only="tokens", until="pretrain")
    with pytest.raises(ValueError, match="comes after"):
        StageSelection(from_stage="pretrain", until="tokens")


def test_default_source_is_the_embedded_corpus(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    storage = tmp_path / "store"
    record = pipeline(storage=str(storage), config=config(), selection=StageSelection(until="extract"))
    assert statuses(record) == {"download": "ran", "extract": "ran"}
    assert record["flow_run_name"] == "tiny · until=extract"
    store = Store(storage)
    archive = tmp_path / "cache" / "default-corpus" / "openwebtext.tar.xz"
    download = store.manifest("download", store.latest("download"))
    assert download["metrics"]["sources"][0]["url"] == str(archive)
    assert store.manifest("extract", store.latest("extract"))["metrics"]["docs"] == len(default_corpus_documents())
    # The store's top level holds stages and run records only (the storage contract).
    assert sorted(p.name for p in storage.iterdir()) == ["download", "extract", "runs"]


def test_the_ui_shows_training_progress_and_each_versions_summary(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    storage, record = first_run
    keys = ["evaluate-version", "pretrain-version", "pretrain-progress", "finetune-progress"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    first = {a.key: a for a in sorted(artifacts, key=lambda a: a.created) if str(a.flow_run_id) == record["run_id"]}
    assert set(first) == set(keys)
    assert float(first["pretrain-progress"].data) == 100.0
    report = first["evaluate-version"].data
    assert record["stages"]["evaluate"]["version"] in report
    assert "| model |" in report and "data:image/png;base64," in report  # the report and its plots
    assert "val_loss" in first["pretrain-version"].data


def test_the_ui_form_is_laid_over_the_preset(prefect_harness, corpus, tmp_path):
    """The `config` a UI form sends holds every field, the untouched ones empty: those keep the preset's
    values, exactly as with `--config`, instead of the stage defaults."""

    def empty(schema: dict, defs: dict) -> dict:
        fields = {}
        for name, prop in schema["properties"].items():
            ref = next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None)
            fields[name] = empty(defs[ref.rsplit("/", 1)[-1]], defs) if ref else None
        return fields

    schema = PipelineOverrides.model_json_schema()
    form = empty(schema, schema["$defs"])
    for field in ("extract", "tokenizer", "pretrain"):
        assert field in form and all(value is None or isinstance(value, dict) for value in form[field].values())
    form["pretrain"]["max_steps"] = 700
    record = pipeline(
        storage=str(tmp_path / "store"),
        preset="small",
        sources=[str(corpus)],
        config=form,
        selection=StageSelection(until="download"),
    )
    settings = record["config"]
    assert settings["pretrain"]["max_steps"] == 700  # the one field changed
    assert settings["pretrain"]["n_embd"] == 384 and settings["tokenizer"]["vocab_size"] == 16_384  # small's
    assert record["overrides"] == {"pretrain": {"max_steps": 700}}


def test_a_ui_run_refuses_usage_mistakes_before_any_stage(prefect_harness, corpus, tmp_path):
    storage = tmp_path / "store"
    with pytest.raises(ConfigError, match="--only tokens needs a stored dedup version"):
        pipeline(storage=str(storage), selection=StageSelection(only="tokens"))
    with pytest.raises(ConfigError, match="is listed twice"):
        pipeline(storage=str(storage), sources=[str(corpus), str(corpus)])
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        pipeline(storage=str(storage), sources=[str(tmp_path)])
    assert not storage.exists()  # no stage ran, no run record was written


def test_verify_rebuilds_a_version_whose_bytes_changed_but_not_its_size(first_run, corpus):
    storage, _ = first_run
    store = Store(storage)
    version = store.latest("tokens")
    meta = store.path("tokens", version) / "meta.json"
    original = meta.read_bytes()
    meta.write_bytes(original.replace(b'"', b"'", 1) if b'"' in original else original)  # same size
    # Names and sizes still match, so without --verify the version is reused; the tokens check reads its
    # meta.json and stops the run before training, in one line naming the file and the way out.
    with pytest.raises(DataIntegrityError, match=r"meta\.json: damaged, not JSON .*--verify"):
        pipeline(storage=str(storage), sources=[str(corpus)], config=config(), selection=StageSelection(until="tokens"))
    record = pipeline(
        storage=str(storage),
        sources=[str(corpus)],
        config=config(),
        selection=StageSelection(until="tokens"),
        verify=True,
    )
    assert statuses(record)["tokens"] == "ran" and record["stages"]["tokens"]["version"] == version
    assert meta.read_bytes() == original and store.damage("tokens", version, verify=True) is None


def test_a_failed_run_prints_the_retry_command_and_the_retry_keeps_each_attempt(
    prefect_harness, corpus, tmp_path, monkeypatch, capsys
):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # where the command line is run from
    source = tmp_path / "openwebtext.tar.xz"
    source.write_bytes(corpus.read_bytes()[: corpus.stat().st_size // 2])  # a download cut short
    storage = tmp_path / "store"
    code = main(["run", "--storage", str(storage), "--source", str(source), "--until", "extract"])
    out = capsys.readouterr()
    assert code == 1 and len(out.err.strip().splitlines()) == 1
    failed = Store(storage).runs()[-1]
    run_id = failed["run_id"]
    command = f"prefect flow-run retry {run_id} --entrypoint flows/pipeline.py:pipeline"
    assert out.out.rstrip().endswith(command)
    assert re.search(r"^download +\w+ +ran\nextract +- +failed$", out.out, re.M)  # the run's table, so far

    # The retry runs the same flow run again, once the source is whole.
    shutil.copyfile(corpus, source)
    argv = shlex.split(command)
    argv[0] = str(Path(sys.executable).with_name("prefect"))
    retried = subprocess.run(
        argv,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert retried.returncode == 0, retried.stdout + retried.stderr
    record = Store(storage).read_run(run_id)
    assert record["status"] == "completed" and record["attempt"] == 2
    assert statuses(record) == {"download": "ran", "extract": "ran"}
    (first,) = record["attempts"]
    assert first["status"] == "failed" and first["failed_stage"] == "extract" and first["error"] == failed["error"]
    assert [r["run_id"] for r in Store(storage).runs()] == [run_id]
    summaries = run_artifacts(run_id, "gptflow-summary")
    assert len(summaries) == 2 and "extract failed" in summaries[0]
    assert summaries[1].startswith("# tiny · until=extract: completed") and "attempt 2" in summaries[1]
