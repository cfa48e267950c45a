"""Inputs that several stage tests publish into a store of their own."""

import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import Store


def publish_dedup(root, shards, version="dedup-v1"):
    def build(out):
        (out / "docs").mkdir()
        for i, rows in enumerate(shards):
            table = pa.table(
                {"doc_id": [d for d, _ in rows], "text": [t for _, t in rows]},
                schema=pa.schema([("doc_id", pa.string()), ("text", pa.string())]),
            )
            pq.write_table(table, out / "docs" / f"shard-{i:05d}.parquet")

    Store(root).publish("dedup", version, build, params={}, inputs={}, code_version="test")
    return version
