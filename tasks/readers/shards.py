"""Writing documents into Parquet shards (zstd), bounded by bytes: one row group at most in memory."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)
# Rows per Parquet row group, or fewer: a row group also closes at ROW_GROUP_BYTES of text, whatever the
# documents' size. pyarrow's writer takes ~6 times a row group's size while writing it (measured here: ~400
# MiB for 64 MiB of 4 MB documents, ~100 MiB for 16 MiB), and readers (tasks/shards.py) read batches of
# about that size. 1024 OpenWebText documents (~5 KB each) are ~5 MB, so for them the row count decides.
ROW_GROUP_DOCS = 1024
ROW_GROUP_BYTES = 16 << 20


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str
    member: str
    n_bytes: int
    invalid_utf8: bool


def default_shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class ShardWriter:
    """Writes documents to `name(0)`, `name(1)`, ... (default `shard-00000.parquet`, ...) in `folder`, with at
    most `shard_docs` rows each; holds one row group at most in memory, of at most `row_group_bytes` of text
    (or ROW_GROUP_DOCS rows) and one document. `rows` lists each shard's row count as it is written."""

    def __init__(
        self,
        folder: Path,
        shard_docs: int,
        row_group_bytes: int | None = None,
        name: Callable[[int], str] = default_shard_name,
    ) -> None:
        self.folder = Path(folder)
        self.shard_docs = shard_docs
        self.row_group_bytes = ROW_GROUP_BYTES if row_group_bytes is None else row_group_bytes
        self.name = name
        self.paths: list[Path] = []
        self.rows: list[int] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._rows: dict[str, list[Any]] = {column: [] for column in SCHEMA.names}
        self._bytes = 0

    @property
    def shards(self) -> int:
        return len(self.paths)

    def add(self, doc: Document) -> None:
        for column in SCHEMA.names:
            self._rows[column].append(getattr(doc, column))
        self._in_shard += 1
        self._bytes += doc.n_bytes
        full = len(self._rows["doc_id"]) >= ROW_GROUP_DOCS or self._bytes >= self.row_group_bytes
        if full or self._in_shard >= self.shard_docs:
            self._flush()
        if self._in_shard >= self.shard_docs:
            self._close_shard()

    def _flush(self) -> None:
        if not self._rows["doc_id"]:
            return
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / self.name(len(self.paths))
            self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
            self.paths.append(path)
            self.rows.append(0)
        table = pa.Table.from_pydict(self._rows, schema=SCHEMA)
        self._rows = {column: [] for column in SCHEMA.names}  # the table holds the rows now: let the lists go
        self._bytes = 0
        self._writer.write_table(table)
        self.rows[-1] += table.num_rows

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._in_shard = 0

    def close(self) -> int:
        """Write what is left; returns the number of shards."""
        self._flush()
        self._close_shard()
        return self.shards

    def discard(self) -> None:
        """Drop everything written so far: the shards' files too."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.paths, self.rows = [], []
        self._rows = {column: [] for column in SCHEMA.names}
        self._in_shard = self._bytes = 0
