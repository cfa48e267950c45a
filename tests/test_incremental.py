"""Nightly runs on a growing corpus: only new shards are computed, and the versions are the same bytes as a
from-scratch build; on a Dask cluster too."""

from pathlib import Path

import pytest

from flows.pipeline import pipeline
from flows.plan import StageSelection
from storage.store import Store
from tasks.sample_data import default_corpus_documents, write_openwebtext_archive

pytestmark = pytest.mark.slow

SETTINGS = {
    "extract": {"shard_docs": 40},
    "tokenizer": {"kind": "bpe", "vocab_size": 320, "reuse": "latest"},
}
DATA_STAGES = ("download", "extract", "clean", "dedup", "tokenizer", "tokens")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> list[Path]:
    """Three sources of the real layout, as a nightly corpus grows: urlsf_subset00.tar.xz ... 02."""
    folder = tmp_path_factory.mktemp("sources")
    docs = default_corpus_documents()[:360]
    return [
        write_openwebtext_archive(docs[i * 120 : (i + 1) * 120], folder / f"urlsf_subset{i:02d}.tar.xz", 40, 3)
        for i in range(3)
    ]


def run(storage: Path, sources: list[Path], until: str = "tokens", **options) -> dict:
    return pipeline(
        storage=str(storage),
        sources=[str(s) for s in sources],
        config=SETTINGS,
        selection=StageSelection(until=until),
        **options,
    )


def shard_entries(storage: Path) -> dict[str, set[Path]]:
    """Every shard cache entry, by "<stage>/<step>"."""
    found: dict[str, set[Path]] = {}
    for result in storage.glob("*/.shards/*/*/*/result.json"):
        found.setdefault(f"{result.parents[4].name}/{result.parents[2].name}", set()).add(result.parent)
    return found


def files_of(storage: Path, record: dict, stage: str) -> dict:
    return Store(storage).manifest(stage, record["stages"][stage]["version"])["files"]


def test_a_nightly_run_with_one_new_archive_computes_only_its_shards(prefect_harness, archives, tmp_path):
    nightly = tmp_path / "nightly"
    first = run(nightly, archives[:2])
    before = shard_entries(nightly)
    second = run(nightly, archives)
    after = shard_entries(nightly)

    new = {step: len(after[step] - before.get(step, set())) for step in after}
    # One new archive: 3 inner archives, 120 documents, 3 extract shards of 40: those are all that is new.
    assert new["extract/units"] == 3, new
    assert new["clean/clean"] == 3, new
    assert new["dedup/signatures"] == 3, new
    assert all(before[step] <= after[step] for step in before)  # nothing of the first night was redone
    tokenizer = Store(nightly).manifest("tokenizer", second["stages"]["tokenizer"]["version"])
    assert tokenizer["metrics"]["reused_from"] == first["stages"]["tokenizer"]["version"]

    scratch = tmp_path / "scratch"
    from_scratch = run(scratch, archives, until="dedup")
    for stage in ("download", "extract", "clean", "dedup"):
        assert second["stages"][stage]["version"] == from_scratch["stages"][stage]["version"], stage
        assert files_of(nightly, second, stage) == files_of(scratch, from_scratch, stage), stage


def test_on_a_dask_cluster_the_versions_are_those_of_a_local_run(prefect_harness, archives, tmp_path):
    from distributed import LocalCluster

    local = run(tmp_path / "local", archives, until="tokens")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = run(tmp_path / "dask", archives, until="tokens", dask=cluster.scheduler_address)
    for stage in DATA_STAGES:
        assert remote["stages"][stage]["version"] == local["stages"][stage]["version"], stage
        assert files_of(tmp_path / "dask", remote, stage) == files_of(tmp_path / "local", local, stage), stage
    assert shard_entries(tmp_path / "dask")  # the shards went through the cache on the cluster's workers
