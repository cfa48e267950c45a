"""Document shards shared by the data stages: where they live, how they are read, and the process pool
that works on them one shard per job."""

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import DataIntegrityError

T = TypeVar("T")

DOCS = "docs"
# Documents per read batch and per output row group: bounds a worker's memory whatever the shard size.
BATCH_ROWS = 1024


def input_shards(folder: Path) -> list[Path]:
    """The document shards of an input version, in a stable (sorted) order."""
    shards = sorted((folder / DOCS).glob("*.parquet"))
    if not shards:
        raise DataIntegrityError(f"{folder / DOCS}: no *.parquet document shards")
    return shards


def read_batches(
    path: Path, columns: list[str] | None = None, batch_size: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet shard; unreadable or corrupt data is a DataIntegrityError naming it."""
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataIntegrityError(f"{path}: not a readable Parquet document shard ({exc})") from exc


@contextmanager
def process_pool(workers: int, jobs: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of up to `workers` processes for `jobs` jobs, or None when they run inline (one worker).

    Processes are spawned rather than forked so that no lock or thread of the parent (Prefect's logging and
    API client, the tokenizer library's thread pool) is inherited half-held. As with any spawned pool, a
    script that starts one needs an `if __name__ == "__main__":` guard.
    """
    workers = min(workers, jobs)
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def map_jobs(pool: ProcessPoolExecutor | None, fn: Callable[..., T], jobs: Sequence[tuple[Any, ...]]) -> list[T]:
    """`[fn(*job) for job in jobs]`, in `pool` when there is one; results come back in job order.

    `fn` must be a module-level function and the jobs picklable.
    """
    if pool is None:
        return [fn(*job) for job in jobs]
    return list(pool.map(fn, *zip(*jobs, strict=True)))
