"""Document shards shared by the data stages: where they live and how they are read (the per-shard work
itself goes through tasks/shardmap.py)."""

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import DataIntegrityError

DOCS = "docs"
# Documents per read batch and per output row group: bounds a worker's memory whatever the shard size.
BATCH_ROWS = 1024
# ...and bytes per read batch, about: 1024 documents of 4 MB would be 4 GB at once. 16 MiB, the size at
# which extract closes its row groups: a stage that writes a row group per batch read (clean, dedup) then
# writes small ones too (pyarrow's writer takes several times a row group's size). 1024 OpenWebText
# documents are ~5 MB, so for them the row count decides.
READ_BATCH_BYTES = 16 << 20


def input_shards(folder: Path) -> list[Path]:
    """The document shards of an input version, in a stable (sorted) order."""
    shards = sorted((folder / DOCS).glob("*.parquet"))
    if not shards:
        raise DataIntegrityError(f"{folder / DOCS}: no *.parquet document shards")
    return shards


def read_batches(
    path: Path, columns: list[str] | None = None, batch_size: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet shard, of at most `batch_size` rows and, where its documents are large,
    fewer: about READ_BATCH_BYTES of the columns read at most. Unreadable or corrupt data is a
    DataIntegrityError naming it."""
    try:
        shard = pq.ParquetFile(path)
        for row_groups, rows in _batch_plan(shard.metadata, columns, batch_size):
            yield from shard.iter_batches(batch_size=rows, row_groups=row_groups, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataIntegrityError(f"{path}: not a readable Parquet document shard ({exc})") from exc


def _batch_plan(metadata: pq.FileMetaData, columns: list[str] | None, batch_size: int) -> list[tuple[list[int], int]]:
    """Runs of consecutive row groups read with one batch size: `batch_size` rows where a row group's rows
    are small enough (batches then run on across row groups, as one read of the file would give them), and
    fewer where they are larger on average than READ_BATCH_BYTES / batch_size."""
    plan: list[tuple[list[int], int]] = []
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        chunks = (group.column(j) for j in range(group.num_columns))
        size = sum(c.total_uncompressed_size for c in chunks if columns is None or c.path_in_schema in columns)
        rows = batch_size
        if size * batch_size > READ_BATCH_BYTES * group.num_rows:
            rows = max(1, READ_BATCH_BYTES * group.num_rows // size)
        if plan and plan[-1][1] == rows:
            plan[-1][0].append(index)
        else:
            plan.append(([index], rows))
    return plan
