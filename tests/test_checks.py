"""The data checks after clean, dedup and tokens: bounds judged exactly at their limits, the tokenizer round
trip on real token files, and, through the flow, a bad corpus stopped at its check before pretraining, each
check its own task run on every run, and a check listed in checks.warn letting the run go on."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from flows.checks import (
    ChecksConfig,
    CleanChecks,
    DedupChecks,
    TokensChecks,
    clean_checks,
    dedup_checks,
    failure_line,
    run_checks,
    tokens_checks,
)
from flows.cli import main
from flows.pipeline import pipeline
from flows.plan import StageSelection
from storage.errors import QualityError
from storage.store import Store
from tasks.sample_data import default_corpus_documents, write_openwebtext_archive
from tasks.split import SplitConfig, is_val
from tasks.tokenizer import STAGE as TOKENIZER
from tasks.tokenizer import TokenizerConfig
from tasks.tokens import INDEX, TokensConfig
from tasks.tokens import STAGE as TOKENS
from tests.builders import publish_dedup


def publish_counts(root: Path, stage: str, metrics: dict) -> str:
    """A stage version whose manifest holds `metrics`, as clean and dedup write them."""
    version = f"{stage}-{metrics['kept']}-{metrics['docs_in']}"
    Store(root).publish(stage, version, lambda out: metrics, params={}, inputs={}, code_version="test")
    return version


def outcomes(results, warn=()) -> dict[str, str]:
    return {result.name: result.outcome(list(warn)) for result in results}


def test_the_drop_rate_on_its_bound_passes_and_just_above_it_fails(tmp_path):
    store = Store(tmp_path)
    bounds = CleanChecks(max_drop_rate=0.9)
    on_bound = publish_counts(tmp_path, "clean", {"docs_in": 1000, "kept": 100, "removed": 900})
    above = publish_counts(tmp_path, "clean", {"docs_in": 1000, "kept": 99, "removed": 901})
    assert outcomes(clean_checks(store, on_bound, bounds)) == {"clean.not_empty": "pass", "clean.drop_rate": "pass"}
    results = clean_checks(store, above, bounds)
    assert outcomes(results) == {"clean.not_empty": "pass", "clean.drop_rate": "fail"}
    line = failure_line("clean", above, [r for r in results if not r.passed])
    assert line.startswith(f"check clean/{above} failed: clean.drop_rate is 0.901, the bound is <= 0.9")
    assert "checks.clean.max_drop_rate" in line and "\n" not in line


def test_an_emptied_corpus_fails_both_clean_checks(tmp_path):
    version = publish_counts(tmp_path, "clean", {"docs_in": 40, "kept": 0, "removed": 40})
    results = clean_checks(Store(tmp_path), version, CleanChecks())
    assert outcomes(results) == {"clean.not_empty": "fail", "clean.drop_rate": "fail"}
    assert [r.value for r in results] == [0, 1.0]


def test_the_duplicate_rate_counts_every_document_dedup_removed(tmp_path):
    store = Store(tmp_path)
    half = {"docs_in": 200, "kept": 100, "exact_duplicates": 60, "near_duplicates": 40}
    on_bound = publish_counts(tmp_path, "dedup", half)
    above = publish_counts(tmp_path, "dedup", {**half, "kept": 99, "near_duplicates": 41})
    bounds = DedupChecks(max_duplicate_rate=0.5)
    assert outcomes(dedup_checks(store, on_bound, bounds))["dedup.duplicate_rate"] == "pass"
    (rate,) = [r for r in dedup_checks(store, above, bounds) if r.name == "dedup.duplicate_rate"]
    assert rate.outcome([]) == "fail" and rate.value == pytest.approx(0.505)
    assert rate.outcome(["dedup.duplicate_rate"]) == "warn"


# -- token files ----------------------------------------------------------------------------------------

SPLIT = SplitConfig(val_fraction=0.5)
DOC_IDS = [f"doc-{i:03d}" for i in range(24)]
VAL_IDS = {doc_id for doc_id in DOC_IDS if is_val(doc_id, SPLIT.seed, SPLIT.val_fraction)}
# Only validation documents hold these: a char tokenizer, trained on the training split, never saw them.
UNSEEN = " Grüße"


def text_of(doc_id: str, unseen: bool) -> str:
    text = f"Document {doc_id} tells of rivers, hills and the towns beside them, and of the roads between."
    return text + (UNSEEN if unseen and doc_id in VAL_IDS else "")


def build_tokens(root: Path, kind: str) -> tuple[str, dict[str, str]]:
    """A tokens version made by the tokenizer and tokens stages from two dedup shards; and the texts."""
    texts = {doc_id: text_of(doc_id, unseen=kind == "char") for doc_id in DOC_IDS}
    rows = list(texts.items())
    dedup = publish_dedup(root, [rows[:12], rows[12:]])
    tokenizer = TOKENIZER.run(root, TokenizerConfig(kind=kind, vocab_size=300, split=SPLIT), {"dedup": dedup})
    return TOKENS.run(root, TokensConfig(), {"dedup": dedup, "tokenizer": tokenizer}).version, texts


def by_name(results) -> dict:
    return {result.name: result for result in results}


def test_bpe_token_files_round_trip_and_the_counts_are_judged_at_their_bounds(tmp_path):
    assert 0 < len(VAL_IDS) < len(DOC_IDS)  # both splits hold documents
    store = Store(tmp_path)
    version, _ = build_tokens(tmp_path, "bpe")
    meta = store.manifest("tokens", version)["metrics"]
    train, val = meta["train_tokens"], meta["val_tokens"]
    exact = TokensChecks(min_train_tokens=train, min_val_tokens=val)
    results = by_name(tokens_checks(store, version, exact, block_size=min(train, val) - 1))
    assert {name: r.outcome([]) for name, r in results.items()} == {
        "tokens.train_tokens": "pass",
        "tokens.val_tokens": "pass",
        "tokens.block_size": "pass",
        "tokens.round_trip": "pass",  # byte-level BPE: no tokens.unknown_chars
    }
    assert results["tokens.round_trip"].setting == f"checks.tokens.sample_docs ({len(DOC_IDS)} sampled)"
    one_more = TokensChecks(min_train_tokens=train + 1, min_val_tokens=val + 1)
    results = by_name(tokens_checks(store, version, one_more, block_size=min(train, val)))
    assert {name for name, r in results.items() if not r.passed} == {
        "tokens.train_tokens",
        "tokens.val_tokens",
        "tokens.block_size",  # one window needs block_size + 1 tokens
    }


def test_token_files_that_do_not_decode_to_their_documents_fail_the_round_trip(tmp_path):
    import pyarrow.parquet as pq

    store = Store(tmp_path)
    version, _ = build_tokens(tmp_path, "bpe")
    folder = store.path("tokens", version)
    first = pq.read_table(folder / INDEX).slice(0, 1).to_pylist()[0]  # the first document is always sampled
    tokens = np.memmap(folder / f"{first['split']}.bin", dtype=np.uint16, mode="r+")
    tokens[first["offset"]] = (int(tokens[first["offset"]]) + 1) % 256  # another byte: the same file size
    tokens.flush()
    (check,) = [r for r in run_checks(tmp_path, "tokens", version, ChecksConfig(), 8) if r.name == "tokens.round_trip"]
    assert check.outcome([]) == "fail" and check.value == 1
    assert f"document {first['doc_id']}: {first['split']}.bin holds other ids than its encoding" in check.detail


def test_the_char_tokenizer_round_trips_with_unknown_characters_shown_and_bounds_their_share(tmp_path):
    version, texts = build_tokens(tmp_path, "char")
    seen = set("".join(text for doc_id, text in texts.items() if doc_id not in VAL_IDS))
    unknown = sum(char not in seen for text in texts.values() for char in text)
    assert unknown >= 2 * len(VAL_IDS)  # "ü" and "ß" of each validation document, at least
    share = unknown / sum(len(text) for text in texts.values())
    results = by_name(run_checks(tmp_path, "tokens", version, ChecksConfig(), 8))
    # Its text comes back, but for the characters it never saw, which come back as U+FFFD.
    assert results["tokens.round_trip"].outcome([]) == "pass"
    assert results["tokens.unknown_chars"].value == pytest.approx(share)
    assert results["tokens.unknown_chars"].outcome([]) == "fail"  # ~1.8% > the default 0.001
    allowing = ChecksConfig(tokens=TokensChecks(max_unknown_char_frac=share))
    assert by_name(run_checks(tmp_path, "tokens", version, allowing, 8))["tokens.unknown_chars"].passed


# -- through the flow -----------------------------------------------------------------------------------

SETTINGS = {
    "extract": {"shard_docs": 40},
    "clean": {"workers": 1},
    "dedup": {"workers": 1},
    "tokens": {"workers": 1},
    "tokenizer": {"kind": "bpe", "vocab_size": 300, "split": {"val_fraction": 0.2}},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "openwebtext.tar.xz"
    return write_openwebtext_archive(default_corpus_documents()[:80], path, docs_per_subset=40, subsets_per_file=2)


@pytest.fixture(scope="module")
def checked_store(prefect_harness, corpus, tmp_path_factory) -> tuple[Path, dict]:
    storage = tmp_path_factory.mktemp("store")
    record = pipeline(
        storage=str(storage), sources=[str(corpus)], config=SETTINGS, selection=StageSelection(until="tokens")
    )
    return storage, record


def task_runs(run_id: str, expected: set[str]) -> dict[str, str]:
    """{name: state name} of flow run `run_id`'s task runs, once they include `expected` (the server records
    them from events, a moment later) or after 30 s."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            found = {run.name: run.state.name for run in runs if run.state is not None}
            if expected <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def check_table(run_id: str, stage: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    wanted = ArtifactFilter(
        key=ArtifactFilterKey(any_=[f"check-{stage}"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
    )
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=wanted)
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def latest_record(storage: Path) -> dict:
    return max(Store(storage).runs(), key=lambda record: record["started_at"])


@pytest.mark.slow
def test_each_check_is_its_own_task_run_on_every_run_with_a_table_of_results(checked_store, corpus):
    storage, record = checked_store
    assert record["status"] == "completed"
    versions = {stage: record["stages"][stage]["version"] for stage in ("clean", "dedup", "tokens")}
    names = {f"check {stage} {version}" for stage, version in versions.items()}
    assert {
        name: state for name, state in task_runs(record["run_id"], names).items() if name in names
    } == dict.fromkeys(names, "Completed")
    rows = check_table(record["run_id"], "clean")
    assert [(row["check"], row["result"], row["bound"]) for row in rows] == [
        ("clean.not_empty", "pass", ">= 1"),
        ("clean.drop_rate", "pass", "<= 0.9"),
    ]
    # A second run computes no stage, and checks every version again: a check is never a cache hit.
    again = pipeline(
        storage=str(storage), sources=[str(corpus)], config=SETTINGS, selection=StageSelection(until="tokens")
    )
    assert {again["stages"][stage]["status"] for stage in versions} == {"cached"}
    assert {name: state for name, state in task_runs(again["run_id"], names).items() if name in names} == dict.fromkeys(
        names, "Completed"
    )


@pytest.mark.slow
def test_a_tightened_bound_fails_a_cached_stage_at_its_check_and_warn_lets_the_run_go_on(checked_store, corpus):
    storage, first = checked_store
    store = Store(storage)
    clean = first["stages"]["clean"]["version"]
    drop_rate = (lambda m: m["removed"] / m["docs_in"])(store.manifest("clean", clean)["metrics"])
    assert drop_rate > 0.01
    strict = {**SETTINGS, "checks": {"clean": {"max_drop_rate": 0.01}}}
    with pytest.raises(QualityError) as failed:
        pipeline(storage=str(storage), sources=[str(corpus)], config=strict, selection=StageSelection(until="tokens"))
    assert str(failed.value).startswith(
        f"check clean/{clean} failed: clean.drop_rate is {drop_rate:.4g}, the bound is <= 0.01 "
        "(checks.clean.max_drop_rate"
    )
    record = latest_record(storage)
    assert record["status"] == "failed" and record["failed_stage"] == "clean" and "dedup" not in record["stages"]

    # Turned into a warning, the same bound lets the run go on; clean's stored version is reused.
    warned = {**SETTINGS, "checks": {"clean": {"max_drop_rate": 0.01}, "warn": ["clean.drop_rate"]}}
    record = pipeline(
        storage=str(storage), sources=[str(corpus)], config=warned, selection=StageSelection(until="tokens")
    )
    assert record["status"] == "completed" and record["stages"]["clean"] == {"version": clean, "status": "cached"}
    states = task_runs(record["run_id"], {f"check clean {clean}"})
    assert states[f"check clean {clean}"] == "Warned"
    rows = {row["check"]: row["result"] for row in check_table(record["run_id"], "clean")}
    assert rows == {"clean.not_empty": "pass", "clean.drop_rate": "warn"}


@pytest.mark.slow
def test_a_corpus_cleaned_away_stops_at_its_check_in_one_line_and_pretrain_never_runs(
    prefect_harness, corpus, tmp_path, capsys
):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**SETTINGS, "clean": {"workers": 1, "min_words": 50_000}}))
    storage = tmp_path / "store"
    code = main(["run", "--storage", str(storage), "--source", str(corpus), "--config", str(settings)])
    err = capsys.readouterr().err.strip().splitlines()
    clean = Store(storage).latest("clean")
    assert code == 1 and err == [
        f"gptflow: error: check clean/{clean} failed: clean.not_empty is 0, the bound is >= 1 "
        "(checks.clean.min_kept_docs); clean.drop_rate is 1, the bound is <= 0.9 (checks.clean.max_drop_rate). "
        "Fix the data or the bound, or list the check in checks.warn to go on; the stage's version stays in the store"
    ]
    # The cleaned version stays in the store; nothing after it ran.
    assert Store(storage).manifest("clean", clean)["metrics"]["kept"] == 0
    assert sorted(Store(storage).stages()) == ["clean", "download", "extract"]
    assert latest_record(storage)["failed_stage"] == "clean"


@pytest.mark.slow
def test_a_stored_input_is_checked_before_a_stage_reads_it(checked_store):
    storage, first = checked_store
    dedup = first["stages"]["dedup"]["version"]
    kept = Store(storage).manifest("dedup", dedup)["metrics"]["kept"]
    strict = {**SETTINGS, "checks": {"dedup": {"min_kept_docs": kept + 1}}}
    with pytest.raises(QualityError, match=rf"^check dedup/{dedup} failed: dedup.not_empty is {kept}, the bound is "):
        pipeline(storage=str(storage), config=strict, selection=StageSelection(from_stage="tokenizer", until="tokens"))
    record = latest_record(storage)
    assert record["failed_stage"] == "dedup" and "tokenizer" not in record["stages"]
