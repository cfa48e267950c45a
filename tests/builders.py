"""Inputs that stage tests publish into a store of their own: document shards and token files."""

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import Store
from storage.tokens import TokenFileWriter

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)


def publish_docs(root, stage: str, shards, version: str | None = None, columns: Sequence[str] = DOC_SCHEMA.names):
    """A fake version of a document stage (extract, clean, dedup): one Parquet shard per list of
    (doc_id, text), with the given columns of the documents' schema."""
    version = version or f"{stage}-v1"

    def build(out):
        (out / "docs").mkdir()
        for i, rows in enumerate(shards):
            table = pa.table(
                {
                    "doc_id": [doc_id for doc_id, _ in rows],
                    "text": [text for _, text in rows],
                    "source": ["sample.tar.xz"] * len(rows),
                    "member": [f"{doc_id}.txt" for doc_id, _ in rows],
                    "n_bytes": [len(text.encode()) for _, text in rows],
                },
                schema=DOC_SCHEMA,
            ).select(list(columns))
            pq.write_table(table, out / "docs" / f"shard-{i:05d}.parquet", compression="zstd")

    Store(root).publish(stage, version, build, params={}, inputs={}, code_version="test")
    return version


def publish_dedup(root, shards, version="dedup-v1"):
    return publish_docs(root, "dedup", shards, version, columns=("doc_id", "text"))


def publish_tokens(
    root,
    train,
    val,
    *,
    vocab_size: int,
    eot_token: int = 0,
    version: str | None = None,
    tokenizer_version: str = "faketokenizer",
    inputs: dict[str, str] | None = None,
    **meta_changes,
) -> str:
    """A fake tokens version: uint16 train.bin / val.bin and a meta.json with every contract field (byte
    counts: one byte per token), `meta_changes` laid over it. The version id defaults to a hash of it all."""
    train, val = np.asarray(train, dtype=np.uint16), np.asarray(val, dtype=np.uint16)
    meta = {
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eot_token": eot_token,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "train_docs": 1,
        "val_docs": 1,
        "train_bytes": len(train),
        "val_bytes": len(val),
        "tokenizer_version": tokenizer_version,
        **meta_changes,
    }
    digest = hashlib.sha256(train.tobytes() + b"|" + val.tobytes() + json.dumps(meta, sort_keys=True).encode())
    version = version or f"tokens-{digest.hexdigest()[:10]}"

    def build(out) -> dict:
        for name, ids in (("train", train), ("val", val)):
            with TokenFileWriter(out / f"{name}.bin", np.dtype(np.uint16)) as writer:
                writer.write(ids)
        (out / "meta.json").write_text(json.dumps(meta))
        return {}

    Store(root).publish("tokens", version, build, params={}, inputs=inputs or {}, code_version="test")
    return version
