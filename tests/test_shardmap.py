"""Per-shard work: cached on each shard's own inputs, every shard attempted, failures raised, task runs."""

import os
from pathlib import Path

import pytest

from storage.errors import DataIntegrityError, TransientError
from tasks.shardmap import SHARDS, ShardJob, ShardScope, dask_cluster, map_shards


def write_job(out: str, calls: str, value: int) -> dict:
    """Writes `part-<value>.txt` and notes the call in `calls` (a folder), so tests can count real runs."""
    Path(calls).mkdir(parents=True, exist_ok=True)
    (Path(calls) / f"{value}-{os.getpid()}-{len(os.listdir(calls))}").touch()
    (Path(out) / "docs").mkdir()
    (Path(out) / "docs" / f"part-{value}.txt").write_text(f"value {value}\n" * value)
    return {"value": value, "pair": (value, value * 2)}


def flaky_job(out: str, calls: str, value: int, fail: str) -> dict:
    """Fails with `fail` (a kind of error) on value 2's first call: then succeeds like write_job."""
    seen = Path(calls).is_dir() and any(name.startswith(f"{value}-") for name in os.listdir(calls))
    if value == 2 and not seen:
        Path(calls).mkdir(parents=True, exist_ok=True)
        (Path(calls) / f"{value}-failed").touch()
        raise (
            TransientError("shard 2: the network went away")
            if fail == "transient"
            else DataIntegrityError("shard 2: corrupt")
        )
    return write_job(out, calls, value)


def calls_of(calls: Path) -> list[int]:
    return sorted(int(name.split("-")[0]) for name in os.listdir(calls)) if calls.is_dir() else []


def scope(root: Path, params: dict | None = None) -> ShardScope:
    return ShardScope("clean", root, {"code": "c1", "params": params or {}}, root / "scratch")


def jobs(dest: Path, calls: Path, values=(1, 2, 3), **extra) -> list[ShardJob]:
    args = tuple(extra.values())
    return [ShardJob(f"shard-{v}", (str(calls), v, *args), key={"input": f"sha-{v}"}, dest=dest) for v in values]


def test_results_come_back_in_order_and_files_are_placed(tmp_path):
    results = map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "out", tmp_path / "calls"), workers=1)
    assert results == [{"value": v, "pair": [v, 2 * v]} for v in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "out" / "docs").iterdir()) == ["part-1.txt", "part-2.txt", "part-3.txt"]
    assert (tmp_path / "out" / "docs" / "part-3.txt").read_text() == "value 3\n" * 3
    assert not list((tmp_path / "scratch").iterdir())  # nothing left behind


def test_a_shard_with_the_same_inputs_is_taken_from_the_cache(tmp_path):
    calls = tmp_path / "calls"
    first = map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "v1", calls), workers=2)
    again = map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "v2", calls, (1, 2, 3, 4)), workers=2)
    assert calls_of(calls) == [1, 2, 3, 4]  # only the new shard ran
    assert again[:3] == first
    for name in ("part-1.txt", "part-2.txt", "part-3.txt"):
        assert (tmp_path / "v2" / "docs" / name).read_bytes() == (tmp_path / "v1" / "docs" / name).read_bytes()
    assert len(list((tmp_path / "clean" / SHARDS / "step").rglob("result.json"))) == 4


def test_other_parameters_or_another_input_are_not_a_cache_hit(tmp_path):
    calls = tmp_path / "calls"
    map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "v1", calls, (1,)), workers=1)
    map_shards(scope(tmp_path, {"min_words": 5}), "step", write_job, jobs(tmp_path / "v2", calls, (1,)), workers=1)
    changed = [ShardJob("shard-1", (str(calls), 1), key={"input": "another-sha"}, dest=tmp_path / "v3")]
    map_shards(scope(tmp_path), "step", write_job, changed, workers=1)
    uncached = [ShardJob("shard-1", (str(calls), 1), key=None, dest=tmp_path / "v4")]
    map_shards(scope(tmp_path), "step", write_job, uncached, workers=1)
    assert calls_of(calls) == [1, 1, 1, 1]


def test_a_damaged_cache_entry_is_recomputed(tmp_path):
    calls = tmp_path / "calls"
    map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "v1", calls, (3,)), workers=1)
    (cached,) = (tmp_path / "clean" / SHARDS / "step").rglob("part-3.txt")
    os.unlink(tmp_path / "v1" / "docs" / "part-3.txt")  # the version's link, so the write below hits only the cache
    cached.write_text("cut")
    result = map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "v2", calls, (3,)), workers=1)
    assert calls_of(calls) == [3, 3]
    assert result == [{"value": 3, "pair": [3, 6]}]
    assert (tmp_path / "v2" / "docs" / "part-3.txt").read_text() == "value 3\n" * 3


def test_every_shard_is_attempted_and_the_failure_raised_then_a_rerun_redoes_only_it(tmp_path):
    calls = tmp_path / "calls"
    with pytest.raises(DataIntegrityError, match="shard 2: corrupt"):
        map_shards(scope(tmp_path), "step", flaky_job, jobs(tmp_path / "v1", calls, fail="data"), workers=2)
    assert sorted(os.listdir(calls)) and calls_of(calls) == [1, 2, 3]  # 1 and 3 finished, 2 failed
    map_shards(scope(tmp_path), "step", flaky_job, jobs(tmp_path / "v2", calls, fail="data"), workers=2)
    assert calls_of(calls) == [1, 2, 2, 3]  # the rerun ran shard 2 alone


def test_jobs_may_be_a_generator_and_spooled_input_is_removed(tmp_path):
    spools = []

    def generate():
        for value in range(12):  # more than the window of shards in flight
            spool = tmp_path / f"spool-{value}"
            spool.write_text("input")
            spools.append(spool)
            yield ShardJob(f"s{value}", (str(tmp_path / "calls"), value), key=None, dest=tmp_path / "out", spool=spool)

    results = map_shards(scope(tmp_path), "step", write_job, generate(), workers=1)
    assert [r["value"] for r in results] == list(range(12))
    assert spools and not any(spool.exists() for spool in spools)


def test_shard_names_must_be_unique(tmp_path):
    twice = [ShardJob("same", (str(tmp_path), 1)), ShardJob("same", (str(tmp_path), 2))]
    with pytest.raises(ValueError, match="same"):
        map_shards(scope(tmp_path), "step", write_job, twice, workers=1)


# -- in a flow ------------------------------------------------------------------------------------------


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return run_coro_as_sync(read())


@pytest.mark.slow
def test_in_a_flow_each_shard_is_a_named_task_run_and_a_transient_fault_retries_that_shard_alone(
    tmp_path, prefect_harness
):
    from prefect import flow, task

    calls = tmp_path / "calls"

    @task(task_run_name="the-stage")
    def stage_task() -> list:  # as in the pipeline: a stage's task run maps its shards
        return map_shards(scope(tmp_path), "step", flaky_job, jobs(tmp_path / "out", calls, fail="transient"), 2)

    @flow
    def shards_flow() -> list:
        return stage_task()

    state = shards_flow(return_state=True)
    assert [r["value"] for r in state.result()] == [1, 2, 3]
    runs = {run.name: run for run in _task_runs(state.state_details.flow_run_id)}
    assert set(runs) == {"the-stage", "clean-step-shard-1", "clean-step-shard-2", "clean-step-shard-3"}
    runs.pop("the-stage")
    assert {name: run.run_count for name, run in runs.items()} == {
        "clean-step-shard-1": 1,
        "clean-step-shard-2": 2,  # retried alone, after the transient fault
        "clean-step-shard-3": 1,
    }
    assert calls_of(calls) == [1, 2, 2, 3]


@pytest.mark.slow
def test_on_a_dask_cluster_the_shards_give_the_same_files(tmp_path, prefect_harness):
    from distributed import LocalCluster
    from prefect import flow

    @flow
    def shards_flow(address: str) -> list:
        with dask_cluster(address):
            return map_shards(scope(tmp_path), "step", write_job, jobs(tmp_path / "dask", tmp_path / "calls"), 2)

    local = map_shards(scope(tmp_path / "local"), "step", write_job, jobs(tmp_path / "local-out", tmp_path / "c"), 1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = shards_flow(cluster.scheduler_address)
    assert remote == local
    for name in ("part-1.txt", "part-2.txt", "part-3.txt"):
        assert (tmp_path / "dask" / "docs" / name).read_bytes() == (tmp_path / "local-out" / "docs" / name).read_bytes()
    assert len({name.split("-")[1] for name in os.listdir(tmp_path / "calls")} - {str(os.getpid())}) >= 1


def test_gc_drops_shard_entries_no_version_links_once_unused_for_a_while(tmp_path):
    from storage.store import Store

    calls = tmp_path / "calls"
    linked = jobs(tmp_path / "clean" / "v1", calls, (1,))  # placed into a version folder: linked
    scratch_only = [ShardJob("s2", (str(calls), 2), key={"input": "sha-2"}, dest=None)]
    recent = [ShardJob("s3", (str(calls), 3), key={"input": "sha-3"}, dest=None)]
    for batch in (linked, scratch_only, recent):
        map_shards(scope(tmp_path), "step", write_job, batch, workers=1)
    results = {part.name: part.parents[2] / "result.json" for part in (tmp_path / "clean" / SHARDS).rglob("part-*.txt")}
    for name in ("part-1.txt", "part-2.txt"):  # last used ten days ago
        os.utime(results[name], (results[name].stat().st_atime, results[name].stat().st_mtime - 10 * 86400))
    Store(tmp_path).gc(shard_days=7)
    left = sorted(p.name for p in (tmp_path / "clean" / SHARDS).rglob("part-*.txt"))
    assert left == ["part-1.txt", "part-3.txt"]  # the linked one and the recently used one
    map_shards(scope(tmp_path), "step", write_job, scratch_only, workers=1)
    assert calls_of(calls) == [1, 2, 2, 3]  # the collected one is simply recomputed


def test_the_modules_worker_processes_import_leave_prefect_out():
    """A shard's function is found by importing its stage module in each worker process: Prefect, which
    costs each worker ~1.5 s to import, must not come with it."""
    import subprocess
    import sys

    code = (
        "import sys, tasks.extract, tasks.clean, tasks.dedup, tasks.tokens; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_shards_run_outside_a_flow_without_importing_prefect(tmp_path):
    """A stage run from a script (or a benchmark's fresh process) maps its shards without a flow: asking
    whether one is in progress must not import Prefect (~1.5 s a process) when nothing has."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from tests.test_shardmap import jobs, scope, write_job; "
        "from tasks.shardmap import map_shards; "
        f"root = Path({str(tmp_path)!r}); "
        "out = map_shards(scope(root), 'clean', write_job, jobs(root / 'out', root / 'calls'), 1); "
        "print([r['value'] for r in out], sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[1, 2, 3] []"


def dying_job(out: str, calls: str, value: int) -> dict:
    """Writes half its files, then its process dies (the OOM killer, a kill -9) the first time for value 2."""
    marker = Path(calls) / f"died-{value}"
    if value == 2 and not marker.exists():
        Path(calls).mkdir(parents=True, exist_ok=True)
        marker.touch()
        (Path(out) / "docs").mkdir()
        (Path(out) / "docs" / f"part-{value}.txt").write_text("half")
        os._exit(9)
    return write_job(out, calls, value)


def test_a_worker_killed_mid_shard_leaves_no_entry_and_a_rerun_completes(tmp_path):
    from concurrent.futures.process import BrokenProcessPool

    calls = tmp_path / "calls"
    with pytest.raises(BrokenProcessPool):
        map_shards(scope(tmp_path), "step", dying_job, jobs(tmp_path / "v1", calls), workers=2)
    assert not list((tmp_path / "clean" / SHARDS).rglob("part-2.txt"))  # no half-written entry
    results = map_shards(scope(tmp_path), "step", dying_job, jobs(tmp_path / "v2", calls), workers=2)
    assert [r["value"] for r in results] == [1, 2, 3]
    assert (tmp_path / "v2" / "docs" / "part-2.txt").read_text() == "value 2\n" * 2
    assert len(list((tmp_path / "clean" / SHARDS / "step").rglob("result.json"))) == 3
