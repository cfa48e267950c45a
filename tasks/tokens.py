"""Stage tokens: encode the deduplicated documents into nanoGPT's token files.

Output (storage contract):
- `train.bin`, `val.bin`: flat arrays of token ids (uint16, or uint32 past 65,536 ids), each document's ids
  followed by the <|endoftext|> id, in shard order then row order;
- `meta.json`: what a reader needs to interpret them (dtype, vocab_size, eot_token, counts, tokenizer);
- `index.parquet`: one row per document: doc_id, split, offset (in tokens, into that split's file) and
  n_tokens (the document's own tokens; the <|endoftext|> that follows is not counted);
- `tokenizer.json`: a copy of the tokenizer, so that a tokens version describes itself.

The split is the tokenizer's: its parameters hold the SplitConfig it was trained with, and this stage
reads it from there, so the tokenizer never saw a validation document. A split given here too must match.
"""

import json
import shutil
from contextlib import ExitStack
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError

from model.tokenizer import FILENAME, Tokenizer
from storage.errors import ConfigError, DataIntegrityError
from storage.tokens import META, TokenFileWriter, token_dtype
from tasks.shards import DOCS, input_shards, read_batches
from tasks.split import SplitConfig, is_val
from tasks.stage import Stage, StageConfig, StageContext, stage_task

INDEX = "index.parquet"
SPLITS = ("train", "val")
INDEX_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("n_tokens", pa.int64()),
    ]
)


class TokensConfig(StageConfig):
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_docs"})

    split: SplitConfig | None = Field(
        default=None,
        description="Unset: the split the tokenizer was trained with. When set it must equal that one, so "
        "that no validation document shaped the tokenizer.",
    )
    batch_docs: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Documents encoded per batch (the tokenizer spreads a batch over all cores); bounds memory.",
    )


def tokenizer_split(manifest: dict[str, Any], requested: SplitConfig | None) -> SplitConfig:
    """The split recorded in the tokenizer's manifest; ConfigError when `requested` differs from it."""
    where = f"tokenizer/{manifest.get('version', '?')}"
    try:
        trained = SplitConfig.model_validate(manifest["params"]["split"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise DataIntegrityError(f"{where}: its manifest records no valid params.split") from exc
    if requested is not None and requested != trained:
        raise ConfigError(
            f"tokens split (seed={requested.seed}, val_fraction={requested.val_fraction}) differs from the split "
            f"{where} was trained with (seed={trained.seed}, val_fraction={trained.val_fraction})"
        )
    return trained


def build(ctx: StageContext, cfg: TokensConfig) -> dict[str, Any]:
    # The tokenizer must have been trained on these very documents' training split (--only tokens pairs each
    # input's latest version, and the two latest pointers can come from different runs).
    ctx.require_common_ancestor("tokenizer", "dedup")
    tokenizer_dir = ctx.input_path("tokenizer")
    split = tokenizer_split(ctx.input_manifest("tokenizer"), cfg.split)
    tokenizer = Tokenizer.load(tokenizer_dir / FILENAME)
    shutil.copyfile(tokenizer_dir / FILENAME, ctx.out / FILENAME)
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    source = ctx.input_path("dedup")
    shards = input_shards(source)
    docs = dict.fromkeys(SPLITS, 0)
    n_bytes = dict.fromkeys(SPLITS, 0)
    ctx.log.info(
        "encoding %d shard(s) with the %s tokenizer (%d ids, %s)",
        len(shards),
        tokenizer.kind,
        tokenizer.vocab_size,
        dtype.name,
    )
    with ExitStack() as stack:
        writers = {name: stack.enter_context(TokenFileWriter(ctx.out / f"{name}.bin", dtype)) for name in SPLITS}
        index = stack.enter_context(pq.ParquetWriter(ctx.out / INDEX, INDEX_SCHEMA, compression="zstd"))
        for shard in shards:
            for batch in read_batches(shard, ["doc_id", "text"], cfg.batch_docs):
                doc_ids = batch.column("doc_id").to_pylist()
                texts = [text or "" for text in batch.column("text").to_pylist()]
                rows: dict[str, list[Any]] = {name: [] for name in INDEX_SCHEMA.names}
                for doc_id, text, ids in zip(doc_ids, texts, tokenizer.encode_batch(texts), strict=True):
                    name = "val" if is_val(doc_id, split.seed, split.val_fraction) else "train"
                    offset = writers[name].write(np.array([*ids, eot], dtype=np.int64))
                    docs[name] += 1
                    n_bytes[name] += len(text.encode("utf-8"))
                    for key, value in zip(INDEX_SCHEMA.names, (doc_id, name, offset, len(ids)), strict=True):
                        rows[key].append(value)
                index.write_table(pa.table(rows, schema=INDEX_SCHEMA))
        tokens = {name: writer.close() for name, writer in writers.items()}

    if docs["train"] == 0 or docs["val"] == 0:
        raise DataIntegrityError(
            f"{source / DOCS}: the split is empty ({docs['train']} train and {docs['val']} val documents, "
            f"val_fraction {split.val_fraction}): use more documents or another val_fraction"
        )
    meta = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": eot,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "train_docs": docs["train"],
        "val_docs": docs["val"],
        "train_bytes": n_bytes["train"],
        "val_bytes": n_bytes["val"],
        "tokenizer_version": ctx.inputs["tokenizer"],
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_file": FILENAME,
        "split_seed": split.seed,
        "val_fraction": split.val_fraction,
    }
    (ctx.out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ctx.log.info(
        "train: %d tokens in %d documents; val: %d tokens in %d documents",
        meta["train_tokens"],
        meta["train_docs"],
        meta["val_tokens"],
        meta["val_docs"],
    )
    return meta


STAGE = Stage(
    name="tokens",
    module=__name__,
    config=TokensConfig,
    build=build,
    inputs=("dedup", "tokenizer"),
    libraries=("tokenizers", "numpy", "pyarrow"),
)
tokens_task = stage_task(STAGE)
