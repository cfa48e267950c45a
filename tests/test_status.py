"""`gptflow status`: a store built with the settings is up to date, and touching a setting, a stage's code,
a source or an upstream version makes exactly the stages it changes stale, each with its reason. Through the
flow: what status calls up to date a run reuses, and the versions status plans are those the run makes."""

import json
import shutil
from pathlib import Path

import pytest

import tasks.stage
from flows.cli import main
from flows.config import preset_config
from flows.pipeline import STAGES, pipeline
from flows.plan import STAGE_ORDER, StageSelection
from flows.status import StageStatus, pipeline_status
from storage.store import Store
from tasks.sample_data import default_corpus_documents, write_openwebtext_archive

SETTINGS = {
    "extract": {"shard_docs": 20},
    "clean": {"workers": 1},
    "dedup": {"workers": 1},
    "tokens": {"workers": 1},
    "tokenizer": {"kind": "bpe", "vocab_size": 300, "split": {"val_fraction": 0.2}},
}
DATA_STAGES = ("download", "extract", "clean", "dedup", "tokenizer", "tokens")


def settings(source: Path | str, **changes):
    cfg = preset_config("tiny", {**SETTINGS, **changes})
    return cfg.with_sources([str(source)])


def build(root: Path, cfg, stages=DATA_STAGES) -> dict[str, str]:
    """The stages built as the pipeline builds them: each on the versions the stages before it gave."""
    refs: dict[str, str] = {name: Store(root).latest(name) for name in STAGE_ORDER if Store(root).latest(name)}
    for name in stages:
        stage = STAGES[name][0]
        refs[name] = stage.run(root, cfg.stage_config(name), {i: refs[i] for i in stage.inputs}).version
    return refs


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "openwebtext.tar.xz"
    return write_openwebtext_archive(default_corpus_documents()[:40], path, docs_per_subset=20, subsets_per_file=2)


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("built")
    return root, build(root, settings(source))


@pytest.fixture
def store_copy(built, tmp_path) -> Path:
    """A copy of the built store, for a test that adds versions to it."""
    return Path(shutil.copytree(built[0], tmp_path / "store", symlinks=True))


def by_stage(statuses: list[StageStatus]) -> dict[str, StageStatus]:
    assert [s.stage for s in statuses] == list(STAGE_ORDER)
    return {s.stage: s for s in statuses}


def states(statuses: list[StageStatus]) -> dict[str, str]:
    return {s.stage: s.state for s in statuses}


def test_a_store_built_with_the_settings_is_up_to_date_and_the_rest_never_built(built, source):
    root, versions = built
    found = by_stage(pipeline_status(Store(root), settings(source)))
    for stage in DATA_STAGES:
        assert (found[stage].state, found[stage].planned, found[stage].latest) == (
            "up to date",
            versions[stage],
            versions[stage],
        )
        assert found[stage].reasons == ()
    assert {found[stage].state for stage in STAGE_ORDER if stage not in DATA_STAGES} == {"never built"}
    # Worker counts are not part of a version: more of them change nothing.
    more_workers = settings(source, clean={"workers": 2}, tokens={"workers": 2})
    assert set(states(pipeline_status(Store(root), more_workers)).values()) == {"up to date", "never built"}


def test_a_changed_setting_makes_its_stage_stale_and_those_built_from_it(built, source):
    root, versions = built
    found = by_stage(pipeline_status(Store(root), settings(source, clean={"workers": 1, "min_words": 21})))
    assert [found[s].state for s in DATA_STAGES] == ["up to date", "up to date", "stale", "stale", "stale", "stale"]
    assert found["clean"].reasons == ("its parameters changed: clean.min_words 20 -> 21",)
    assert found["clean"].latest == versions["clean"] and found["clean"].planned != versions["clean"]
    assert found["dedup"].reasons == (
        f"upstream clean changed: built from clean/{versions['clean']}; a run gives it "
        f"clean/{found['clean'].planned}, which a run builds first",
    )


def test_changed_code_makes_its_stage_stale_and_those_after_it(built, source, monkeypatch):
    root, versions = built
    real = tasks.stage.code_fingerprint
    monkeypatch.setattr(
        tasks.stage, "code_fingerprint", lambda m: "edited0000000000" if m == "tasks.dedup" else real(m)
    )
    found = by_stage(pipeline_status(Store(root), settings(source)))
    assert [found[s].state for s in DATA_STAGES] == ["up to date"] * 3 + ["stale"] * 3
    stored = Store(root).manifest("dedup", versions["dedup"])["code_version"]
    assert found["dedup"].reasons == (f"its code changed (fingerprint {stored} -> edited0000000000)",)
    assert found["tokenizer"].reasons[0].startswith(f"upstream dedup changed: built from dedup/{versions['dedup']}")


def test_a_new_upstream_version_makes_what_was_built_from_the_old_one_stale(built, source, store_copy):
    _, versions = built
    changed = settings(source, clean={"workers": 1, "min_words": 21})
    new_clean = build(store_copy, changed, stages=("clean",))["clean"]  # as `gptflow run --only clean` would
    found = by_stage(pipeline_status(Store(store_copy), changed))
    assert (found["clean"].state, found["clean"].latest) == ("up to date", new_clean)
    assert found["dedup"].state == "stale" and found["dedup"].reasons == (
        f"upstream clean changed: built from clean/{versions['clean']}; a run gives it clean/{new_clean}, "
        "which is stored",
    )
    # The settings the old clean was made with: a run reuses it, though it is no longer the latest.
    found = by_stage(pipeline_status(Store(store_copy), settings(source)))
    assert found["clean"].state == "up to date" and found["clean"].planned == versions["clean"]
    assert found["clean"].reasons == (f"a run reuses the stored {versions['clean']}, not the latest",)


def test_a_source_with_new_bytes_makes_download_stale(built, source, tmp_path):
    root, _ = built
    changed = tmp_path / "openwebtext.tar.xz"
    shutil.copyfile(source, changed)
    store = Store(tmp_path / "store")
    build(store.root, settings(changed), stages=("download",))
    write_openwebtext_archive(default_corpus_documents()[40:50], changed, docs_per_subset=10, subsets_per_file=1)
    found = by_stage(pipeline_status(store, settings(changed)))
    assert found["download"].state == "stale"
    assert found["download"].reasons == ("its sources changed (their content, ETag, Last-Modified or size)",)
    assert found["extract"].state == "never built"


def test_a_store_that_does_not_exist_is_never_built_and_not_created(tmp_path, source):
    statuses = pipeline_status(Store(tmp_path / "none"), settings(source))
    assert set(states(statuses).values()) == {"never built"} and not (tmp_path / "none").exists()


def test_cli_status_prints_each_stage_and_why(built, source, tmp_path, capsys):
    root, versions = built
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({**SETTINGS, "clean": {"workers": 1, "min_words": 21}}))
    code = main(["status", "--storage", str(root), "--source", str(source), "--config", str(config)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].split() == ["stage", "status", "latest", "a", "run", "uses", "why"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == list(STAGE_ORDER)
    assert rows["extract"].split() == ["extract", "up", "to", "date", versions["extract"], versions["extract"]]
    assert rows["clean"].startswith(f"clean      stale        {versions['clean']}  ")
    assert rows["clean"].endswith("its parameters changed: clean.min_words 20 -> 21")
    assert rows["pretrain"].split()[1:3] == ["never", "built"]
    config.write_text("clean: {min_words: -1}")
    assert main(["status", "--storage", str(root), "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("gptflow: error: invalid settings: clean.min_words")


@pytest.mark.slow
def test_what_status_calls_up_to_date_a_run_reuses_and_a_run_makes_the_versions_it_plans(
    prefect_harness, source, tmp_path
):
    storage = tmp_path / "store"
    until = StageSelection(until="tokens")

    def run(**changes) -> dict:
        overrides = {**SETTINGS, **changes}
        return pipeline(storage=str(storage), sources=[str(source)], config=overrides, selection=until)

    first = run()
    found = by_stage(pipeline_status(Store(storage), settings(source)))
    assert {stage: found[stage].state for stage in DATA_STAGES} == dict.fromkeys(DATA_STAGES, "up to date")
    assert {stage: found[stage].planned for stage in DATA_STAGES} == {
        stage: first["stages"][stage]["version"] for stage in DATA_STAGES
    }
    changed = {"clean": {"workers": 1, "min_words": 21}}
    planned = by_stage(pipeline_status(Store(storage), settings(source, **changed)))
    second = run(**changed)
    for stage in DATA_STAGES:
        expected = "cached" if planned[stage].state == "up to date" else "ran"
        assert second["stages"][stage]["version"] == planned[stage].planned, stage
        assert second["stages"][stage]["status"] in ({expected, "reused"} if stage == "download" else {expected})
    assert [planned[s].state for s in DATA_STAGES] == ["up to date"] * 2 + ["stale"] * 4


def test_a_source_that_sends_no_validators_is_not_fetched_and_what_follows_is_unknown(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[str] = []

    class NoValidators(BaseHTTPRequestHandler):
        """Answers with a body of unknown length and no ETag or Last-Modified."""

        def do_HEAD(self) -> None:
            requests.append("HEAD")
            self.send_response(200)
            self.end_headers()

        def do_GET(self) -> None:
            requests.append("GET")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"not an archive")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoValidators)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/openwebtext.tar.xz"
        (tmp_path / "store").mkdir()
        found = by_stage(pipeline_status(Store(tmp_path / "store"), settings(url)))
    finally:
        server.shutdown()
    assert requests == ["HEAD"]  # its validators asked for, its body never fetched
    assert found["download"].state == "unknown" and found["download"].reasons[0].startswith(
        f"{url} sends no ETag, Last-Modified or Content-Length: only a run"
    )
    assert found["extract"].reasons == ("the version of its input download cannot be told",)
    assert {found[stage].state for stage in STAGE_ORDER} == {"unknown"}
