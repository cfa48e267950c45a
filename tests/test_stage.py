"""The stage framework: version ids, reuse, forced rebuilds, the cache key, and which errors are retried."""

import errno
import json
import logging
import time
from pathlib import Path
from typing import Literal

import pytest
from prefect import flow

from storage.errors import ConfigError, DataIntegrityError, DiskFullError, StoreError, TransientError
from storage.store import StageRef, Store
from tasks.stage import (
    RESULT_SERIALIZER,
    Stage,
    StageConfig,
    cache_key,
    is_transient,
    result_storage,
    stage_task,
    task_run_name,
)


class CountingConfig(StageConfig):
    RUNTIME_FIELDS = frozenset({"workers"})

    counter: str  # a file counting build attempts
    value: int = 1
    workers: int = 1
    fail_times: int = 0
    error: Literal["transient", "data", "disk_full"] = "transient"


def counting_build(ctx, cfg: CountingConfig) -> dict:
    counter = Path(cfg.counter)
    attempts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempts))
    (ctx.out / "value.json").write_text(json.dumps({"value": cfg.value, "attempt": attempts}))
    if attempts <= cfg.fail_times:
        if cfg.error == "transient":
            raise TransientError(f"attempt {attempts}: the server is busy")
        if cfg.error == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise DataIntegrityError(f"attempt {attempts}: archive x.tar.xz is truncated")
    return {"attempts": attempts}


COUNTING = Stage(name="counting", module="tasks.stage", config=CountingConfig, build=counting_build)
counting_task = stage_task(COUNTING, retries=3, backoff_seconds=0.0)
DOWNSTREAM = Stage(
    name="downstream", module="tasks.stage", config=CountingConfig, build=counting_build, inputs=("counting",)
)


def joining_build(ctx, cfg: CountingConfig) -> dict:
    ctx.require_common_ancestor("downstream", "counting")
    return {}


JOIN = Stage(
    name="join", module="tasks.stage", config=CountingConfig, build=joining_build, inputs=("counting", "downstream")
)


def attempts(cfg: CountingConfig) -> int:
    return int(Path(cfg.counter).read_text())


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TransientError("busy"), True),
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (DataIntegrityError("truncated"), False),
        (ConfigError("bad"), False),
        (StoreError("missing"), False),
        (ValueError("bad"), False),
        (OSError(errno.ENOSPC, "full"), False),
        (None, False),
    ],
)
def test_only_transient_errors_are_retried(error, transient):
    assert is_transient(error) is transient


def test_reuse_force_and_runtime_fields(tmp_path, caplog):
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    first = COUNTING.run(tmp_path / "store", cfg)
    assert not first.reused and attempts(cfg) == 1
    again = COUNTING.run(tmp_path / "store", cfg.model_copy(update={"workers": 8}))
    assert again == StageRef("counting", first.version, reused=True) and attempts(cfg) == 1
    with caplog.at_level(logging.WARNING):
        forced = COUNTING.run(tmp_path / "store", cfg, force=True)
    assert forced.version == first.version and not forced.reused and attempts(cfg) == 2
    assert "changed its output" in caplog.text  # value.json records the attempt: the bytes differ
    folder = Store(tmp_path / "store").path("counting", first.version)
    assert json.loads((folder / "value.json").read_text())["attempt"] == 2
    other = COUNTING.run(tmp_path / "store", cfg.model_copy(update={"value": 2}))
    assert other.version != first.version


def test_inputs_are_part_of_the_version_and_must_match_the_stage(tmp_path):
    store_dir = tmp_path / "store"
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    a = COUNTING.run(store_dir, cfg)
    b = COUNTING.run(store_dir, cfg.model_copy(update={"value": 2}))
    on_a = DOWNSTREAM.run(store_dir, cfg, {"counting": a})
    on_b = DOWNSTREAM.run(store_dir, cfg, {"counting": b.version})
    assert on_a.version != on_b.version
    assert Store(store_dir).manifest("downstream", on_b.version)["inputs"] == {"counting": b.version}
    with pytest.raises(ValueError, match="expects inputs"):
        DOWNSTREAM.run(store_dir, cfg, {})
    with pytest.raises(StoreError, match="counting/nope"):
        DOWNSTREAM.run(store_dir, cfg, {"counting": "nope"})


def test_a_full_disk_is_one_clear_error_and_publishes_nothing(tmp_path):
    cfg = CountingConfig(counter=str(tmp_path / "n"), fail_times=1, error="disk_full")
    with pytest.raises(DiskFullError, match="no space left on the device writing .*nothing was published") as raised:
        COUNTING.run(tmp_path / "store", cfg)
    assert "\n" not in str(raised.value) and not is_transient(raised.value)
    assert Store(tmp_path / "store").versions("counting") == []
    assert not COUNTING.run(tmp_path / "store", cfg).reused  # once there is room, the rerun completes


def test_cache_key_is_the_version_and_drops_a_stale_record(tmp_path):
    storage = tmp_path / "store"
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    params = {"storage": str(storage), "cfg": cfg, "inputs": {}, "force": False}
    key = cache_key(COUNTING)(None, params)
    version = COUNTING.version(cfg, {})
    assert key == f"gptflow-counting-{version}"
    # A record left by a version that has since been removed from the store must not be served.
    record = result_storage(storage) / key
    record.parent.mkdir(parents=True)
    record.write_text("stale")
    assert cache_key(COUNTING)(None, params) == key and not record.exists()
    COUNTING.run(storage, cfg)
    write_record(record, "counting", version)
    assert cache_key(COUNTING)(None, params) == key and record.exists()
    assert cache_key(COUNTING)(None, {**params, "force": True}) is None


@flow
def run_counting(storage: str, cfg: CountingConfig) -> tuple[bool, object]:
    """(completed?, the task's result or its exception): a failed task inside, a completed flow outside."""
    state = counting_task(storage, cfg, {}, return_state=True)
    return state.is_completed(), state.result(raise_on_failure=False)


@pytest.mark.slow
def test_prefect_retries_transient_faults_and_fails_bad_data_at_once(prefect_harness, tmp_path):
    flaky = CountingConfig(counter=str(tmp_path / "flaky"), fail_times=2, error="transient")
    completed, ref = run_counting(str(tmp_path / "store"), flaky)
    assert completed and attempts(flaky) == 3
    assert Store(tmp_path / "store").has("counting", ref.version)

    corrupt = CountingConfig(counter=str(tmp_path / "corrupt"), fail_times=5, error="data", value=2)
    completed, error = run_counting(str(tmp_path / "store"), corrupt)
    assert not completed and attempts(corrupt) == 1
    assert isinstance(error, DataIntegrityError) and "x.tar.xz is truncated" in str(error)
    assert Store(tmp_path / "store").latest("counting") == COUNTING.version(flaky, {})


def test_inputs_from_different_lineages_are_refused(tmp_path):
    store_dir = tmp_path / "store"
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    a1 = COUNTING.run(store_dir, cfg)
    a2 = COUNTING.run(store_dir, cfg.model_copy(update={"value": 2}))
    b_on_a1 = DOWNSTREAM.run(store_dir, cfg, {"counting": a1})
    assert Store(store_dir).lineage("downstream", b_on_a1.version) == {"counting": a1.version}
    with pytest.raises(ConfigError, match=f"downstream/{b_on_a1.version} was built from counting/{a1.version}"):
        JOIN.run(store_dir, cfg, {"counting": a2, "downstream": b_on_a1})
    assert not JOIN.run(store_dir, cfg, {"counting": a1, "downstream": b_on_a1}).reused


# -- what a reuse can trust ------------------------------------------------------------------------------


def write_record(path: Path, stage: str, version: str, serializer=RESULT_SERIALIZER) -> None:
    """A result record as Prefect persists it, with the serializer the record names."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    record = ResultRecord(
        metadata=ResultRecordMetadata(serializer=serializer, storage_key=str(path)), result=StageRef(stage, version)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.serialize())


class RunsCode:
    """Unpickling this touches a file: the proof that a record ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_a_record_that_is_not_ours_is_never_served(tmp_path):
    from prefect.serializers import PickleSerializer

    storage = tmp_path / "store"
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    params = {"storage": str(storage), "cfg": cfg, "inputs": {}, "force": False}
    version = COUNTING.run(storage, cfg).version
    record = result_storage(storage) / cache_key(COUNTING)(None, params)
    marker = tmp_path / "code-ran"
    # A pickled record (Prefect's default), whose loading would run code: removed, unread.
    write_record(record, "counting", version, PickleSerializer(picklelib="pickle"))
    record.write_bytes(record.read_bytes())
    cache_key(COUNTING)(None, params)
    assert not record.exists() and not marker.exists()
    # Damaged bytes, and a reference to another version: removed too, so Prefect never crashes on them.
    for content in (b"\x00garbage", None):
        if content is None:
            write_record(record, "counting", "another-version")
        else:
            record.write_bytes(content)
        cache_key(COUNTING)(None, params)
        assert not record.exists()
    # Ours, for this intact version: kept.
    write_record(record, "counting", version)
    cache_key(COUNTING)(None, params)
    assert record.exists()


def test_a_damaged_version_is_rebuilt_never_reused(tmp_path, caplog):
    storage = tmp_path / "store"
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    params = {"storage": str(storage), "cfg": cfg, "inputs": {}, "force": False}
    first = COUNTING.run(storage, cfg)
    folder = Store(storage).path("counting", first.version)
    record = result_storage(storage) / cache_key(COUNTING)(None, params)
    for damage in ("delete", "truncate"):
        write_record(record, "counting", first.version)
        if damage == "delete":
            (folder / "value.json").unlink()
        else:
            (folder / "value.json").write_text("{}")
        cache_key(COUNTING)(None, params)
        assert not record.exists()  # no Prefect cache hit on a damaged version
        with caplog.at_level(logging.WARNING):
            again = COUNTING.run(storage, cfg)
        assert again.version == first.version and not again.reused
        assert f"counting/{first.version} is damaged" in caplog.text
        assert Store(storage).damage("counting", first.version) is None
    # Same size, other bytes: only a verified run notices.
    before = attempts(cfg)
    text = (folder / "value.json").read_text()
    (folder / "value.json").write_text(text.replace('"value": 1', '"value": 7'))
    assert COUNTING.run(storage, cfg).reused and attempts(cfg) == before
    assert not COUNTING.run(storage, cfg, verify=True).reused and attempts(cfg) == before + 1


def test_library_versions_and_the_environment_are_part_of_the_version(tmp_path, monkeypatch):
    import storage.fingerprint as fingerprint

    cfg = CountingConfig(counter=str(tmp_path / "n"))
    with_libs = Stage(
        name="counting", module="tasks.stage", config=CountingConfig, build=counting_build, libraries=("numpy",)
    )
    base = with_libs.version(cfg, {})
    monkeypatch.setattr(fingerprint, "_library_version", lambda name: "0.0-other")
    assert with_libs.version(cfg, {}) != base
    assert COUNTING.version(cfg, {}) == COUNTING.version(cfg, {})  # no libraries named: unaffected
    on = {"device": "cpu", "precision": "fp32"}
    device = Stage(name="counting", module="tasks.stage", config=CountingConfig, build=counting_build)
    cpu = Stage(**{**device.__dict__, "environment": lambda c: on})
    cuda = Stage(**{**device.__dict__, "environment": lambda c: {"device": "cuda", "precision": "bf16"}})
    assert len({device.version(cfg, {}), cpu.version(cfg, {}), cuda.version(cfg, {})}) == 3
    assert cpu.version(cfg.model_copy(update={"workers": 8}), {}) == cpu.version(cfg, {})
    ref = cpu.run(tmp_path / "store", cfg)
    assert Store(tmp_path / "store").manifest("counting", ref.version)["environment"]["device"] == "cpu"


def logging_build(ctx, cfg: CountingConfig) -> dict:
    counting_build(ctx, cfg.model_copy(update={"counter": cfg.counter}))
    (ctx.out / "value.json").write_text(json.dumps({"value": cfg.value}))  # the output: the same every time
    (ctx.out / "timings.jsonl").write_text(json.dumps({"attempt": attempts(cfg)}))  # how the build went
    return {}


def test_a_forced_rebuild_warns_only_when_its_output_changed(tmp_path, caplog):
    stage = Stage(
        name="logging", module="tasks.stage", config=CountingConfig, build=logging_build, records=("*.jsonl",)
    )
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    first = stage.run(tmp_path / "store", cfg)
    with caplog.at_level(logging.WARNING):
        stage.run(tmp_path / "store", cfg, force=True)
    assert attempts(cfg) == 2 and "changed its output" not in caplog.text
    folder = Store(tmp_path / "store").path("logging", first.version)
    assert json.loads((folder / "timings.jsonl").read_text()) == {"attempt": 2}


@flow
def run_counting_twice(storage: str, cfg: CountingConfig) -> list[str]:
    in_store = counting_task.with_options(result_storage=result_storage(storage))  # as the pipeline runs it
    return [in_store(storage, cfg, {}, return_state=True).name for _ in range(2)]


def test_prefect_smoke_a_retry_a_cache_hit_and_no_pickle(prefect_harness, tmp_path):
    """The fast loop's one run through Prefect: a transient fault retried, then a cache hit; the persisted
    record is our JSON, and a pickled record put in its place is never loaded."""
    storage = tmp_path / "store"
    cfg = CountingConfig(counter=str(tmp_path / "n"), fail_times=1, error="transient")
    assert run_counting_twice(str(storage), cfg) == ["Completed", "Cached"]
    assert attempts(cfg) == 2  # one failure, one retry, then the cache
    version = COUNTING.version(cfg, {})
    record = result_storage(storage) / f"gptflow-counting-{version}"
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == RESULT_SERIALIZER.type

    import pickle

    marker = tmp_path / "code-ran"
    tampered = json.loads(record.read_bytes())
    tampered["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
    tampered["result"] = __import__("base64").b64encode(pickle.dumps(RunsCode(marker))).decode()
    record.write_text(json.dumps(tampered))
    states = run_counting_twice(str(storage), cfg)
    assert not marker.exists() and states == ["Completed", "Cached"]  # the stored version reused, then cached
    assert attempts(cfg) == 2


# -- what the Prefect UI shows -----------------------------------------------------------------------------

uncached_counting_task = stage_task(COUNTING, retries=0, cache=False)


@flow
def run_counting_named(storage: str, cfg: CountingConfig) -> list[str]:
    """The task run ids of a build, a cache hit, and an uncached stage's run."""
    in_store = counting_task.with_options(result_storage=result_storage(storage))
    states = [in_store(storage, cfg, {}, return_state=True) for _ in range(2)]
    states.append(uncached_counting_task(storage, cfg.model_copy(update={"value": 5}), {}, return_state=True))
    return [str(state.state_details.task_run_id) for state in states]


def test_task_runs_are_named_by_their_stage_and_version(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    cfg = CountingConfig(counter=str(tmp_path / "n"))
    ids = run_counting_named(str(tmp_path / "store"), cfg)
    built, uncached = (
        f"counting {COUNTING.version(cfg, {})}",
        f"counting {COUNTING.version(cfg.model_copy(update={'value': 5}), {})}",
    )
    expected = [built, built, uncached]
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30  # the server records task runs from their events, a moment later
        while (names := [client.read_task_run(i).name for i in ids]) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
    assert names == expected


def test_a_task_run_with_bad_settings_is_named_by_its_stage(tmp_path):
    name = task_run_name(COUNTING)
    cfg = CountingConfig(counter=str(tmp_path / "n"))
    assert (
        name(parameters={"storage": str(tmp_path), "cfg": cfg, "inputs": {}}) == f"counting {COUNTING.version(cfg, {})}"
    )
    # The task run itself reports what is wrong; its name must not fail first.
    assert name(parameters={"storage": str(tmp_path), "cfg": {"value": "x"}, "inputs": {}}) == "counting"
