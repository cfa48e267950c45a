"""Stage tokens: encode the deduplicated documents into nanoGPT's token files.

Output (storage contract):
- `train.bin`, `val.bin`: flat arrays of token ids (uint16, or uint32 past 65,536 ids), each document's ids
  followed by the <|endoftext|> id, in shard order then row order;
- `meta.json`: what a reader needs to interpret them (dtype, vocab_size, eot_token, counts, tokenizer), and
  how much of the validation text also appears in training documents (below);
- `index.parquet`: one row per document: doc_id, split, offset (in tokens, into that split's file) and
  n_tokens (the document's own tokens; the <|endoftext|> that follows is not counted);
- `tokenizer.json`: a copy of the tokenizer, so that a tokens version describes itself.

The split is the tokenizer's: its manifest records the SplitConfig it was trained with (a reused tokenizer
carries the one it was first trained with), and this stage reads it from there, so the tokenizer never saw a
validation document. A split given here too must match.

Each dedup shard is encoded by one shard job (`tasks.shardmap`), cached on the shard's sha256, the tokenizer
file's sha256 and the split: a nightly run that keeps its tokenizer re-encodes only its new shards. The
jobs' per-shard token arrays and index rows are then joined in shard order, giving the same bytes as one
pass over every shard would.

Leakage between the splits: the validation text's paragraphs (its lines of PARAGRAPH_CHARS characters or
more, surrounding whitespace stripped) are hashed, and the fraction of them, and of their characters, that a
training document also holds as a paragraph is reported (`val_paragraphs`, `val_leaked_paragraphs`,
`val_leakage`, `val_leakage_chars`). Memory holds the validation side's hashes and one shard's training
hashes at a time.
"""

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError

from model.tokenizer import FILENAME, Tokenizer
from storage.errors import ConfigError, DataIntegrityError
from storage.store import sha256_file
from storage.tokens import META, TokenFileWriter, token_dtype
from tasks.shardmap import ShardJob, map_shards, scope_of
from tasks.shards import DOCS, input_shards, read_batches
from tasks.split import SplitConfig, is_val
from tasks.stage import Stage, StageConfig, StageContext, stage_task

INDEX = "index.parquet"
SPLITS = ("train", "val")
ENCODED = "encoded"  # under the version's scratch: each shard's encoding, one folder per shard
TRAIN_PARAGRAPHS = "train_paragraphs.npy"  # a shard's training paragraphs: distinct hashes, sorted
VAL_PARAGRAPHS = "val_paragraphs.npy"  # a shard's validation paragraphs: (hash, characters) each, in order
# A line of 60 characters is about a sentence of prose; shorter ones (headings, "Returns:", a line of code)
# recur innocently between documents and would count as leakage that is not.
PARAGRAPH_CHARS = 60
INDEX_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("n_tokens", pa.int64()),
    ]
)


class TokensConfig(StageConfig):
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_docs", "workers"})

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
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Processes encoding shards at once (1 runs inline). Does not change the output.",
    )


def tokenizer_split(manifest: dict[str, Any], requested: SplitConfig | None) -> SplitConfig:
    """The split recorded in the tokenizer's manifest (its metrics' split_seed and val_fraction, which a
    reused tokenizer carries over; else, for a version trained before they were recorded, its params.split);
    ConfigError when `requested` differs from it."""
    where = f"tokenizer/{manifest.get('version', '?')}"
    metrics = manifest.get("metrics")
    params = manifest.get("params")
    if isinstance(metrics, dict) and "split_seed" in metrics and "val_fraction" in metrics:
        recorded = {"seed": metrics["split_seed"], "val_fraction": metrics["val_fraction"]}
    else:
        recorded = params.get("split") if isinstance(params, dict) else None
    try:
        trained = SplitConfig.model_validate(recorded)
    except ValidationError as exc:
        raise DataIntegrityError(
            f"{where}: its manifest records no valid split (metrics split_seed and val_fraction, or params.split)"
        ) from exc
    if requested is not None and requested != trained:
        raise ConfigError(
            f"tokens split (seed={requested.seed}, val_fraction={requested.val_fraction}) differs from the split "
            f"{where} was trained with (seed={trained.seed}, val_fraction={trained.val_fraction})"
        )
    return trained


# -- one shard ------------------------------------------------------------------------------------------


def paragraphs(text: str) -> Iterator[str]:
    """The paragraphs of `text` the leakage measure compares: its lines, surrounding whitespace stripped,
    of PARAGRAPH_CHARS characters or more."""
    for line in text.split("\n"):
        line = line.strip()
        if len(line) >= PARAGRAPH_CHARS:
            yield line


def paragraph_hash(paragraph: str) -> int:
    """64 bits: among a million validation and a billion training paragraphs, a false match has odds of
    about 1e6 * 1e9 / 2**64 = 5e-5."""
    return int.from_bytes(hashlib.blake2b(paragraph.encode("utf-8"), digest_size=8).digest(), "little")


def encode_shard(
    out: str, shard: str, tokenizer_file: str, seed: int, val_fraction: float, batch_docs: int
) -> dict[str, int]:
    """Encode one document shard into `out`: `train.bin` and `val.bin` (each document's ids, then
    <|endoftext|>), `index.parquet` (offsets from the start of this shard's part of its split's file; a
    row group per batch read, as the stage's index has), and the paragraph hashes of the leakage measure.
    Returns the shard's counts per split."""
    folder = Path(out)
    tokenizer = Tokenizer.load(tokenizer_file)
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    counts = {f"{name}_{what}": 0 for name in SPLITS for what in ("docs", "tokens", "bytes")}
    train_hashes: list[np.ndarray] = []
    val_paragraphs: list[tuple[int, int]] = []
    with ExitStack() as stack:
        writers = {name: stack.enter_context(TokenFileWriter(folder / f"{name}.bin", dtype)) for name in SPLITS}
        index = stack.enter_context(pq.ParquetWriter(folder / INDEX, INDEX_SCHEMA, compression="zstd"))
        for batch in read_batches(Path(shard), ["doc_id", "text"], batch_docs):
            doc_ids = batch.column("doc_id").to_pylist()
            texts = [text or "" for text in batch.column("text").to_pylist()]
            rows: dict[str, list[Any]] = {name: [] for name in INDEX_SCHEMA.names}
            batch_hashes: list[int] = []
            for doc_id, text, ids in zip(doc_ids, texts, tokenizer.encode_batch(texts), strict=True):
                name = "val" if is_val(doc_id, seed, val_fraction) else "train"
                offset = writers[name].write(np.array([*ids, eot], dtype=np.int64))
                counts[f"{name}_docs"] += 1
                counts[f"{name}_bytes"] += len(text.encode("utf-8"))
                for key, value in zip(INDEX_SCHEMA.names, (doc_id, name, offset, len(ids)), strict=True):
                    rows[key].append(value)
                if name == "val":
                    val_paragraphs.extend((paragraph_hash(p), len(p)) for p in paragraphs(text))
                else:
                    batch_hashes.extend(paragraph_hash(p) for p in paragraphs(text))
            index.write_table(pa.table(rows, schema=INDEX_SCHEMA))
            train_hashes.append(np.unique(np.array(batch_hashes, dtype=np.uint64)))
        for name, writer in writers.items():
            counts[f"{name}_tokens"] = writer.close()
    np.save(folder / TRAIN_PARAGRAPHS, np.unique(np.concatenate([np.zeros(0, np.uint64), *train_hashes])))
    np.save(folder / VAL_PARAGRAPHS, np.array(val_paragraphs, dtype=np.uint64).reshape(-1, 2))
    return counts


# -- the whole corpus -----------------------------------------------------------------------------------


def join_shards(parts: list[Path], counts: list[dict[str, int]], out: Path) -> None:
    """Concatenate the shards' token files into `out`'s train.bin and val.bin, and their index rows (offsets
    moved by the tokens of the shards before) into index.parquet, row group for row group."""
    start = dict.fromkeys(SPLITS, 0)
    with ExitStack() as stack:
        files = {name: stack.enter_context(open(out / f"{name}.bin", "wb")) for name in SPLITS}
        index = stack.enter_context(pq.ParquetWriter(out / INDEX, INDEX_SCHEMA, compression="zstd"))
        for part, shard_counts in zip(parts, counts, strict=True):
            for name in SPLITS:
                with open(part / f"{name}.bin", "rb") as source:
                    shutil.copyfileobj(source, files[name], 1 << 20)
            with pq.ParquetFile(part / INDEX) as shard_index:
                for group in range(shard_index.num_row_groups):
                    rows = shard_index.read_row_group(group).to_pydict()
                    moved = zip(rows["offset"], rows["split"], strict=True)
                    rows["offset"] = [offset + start[name] for offset, name in moved]
                    index.write_table(pa.table(rows, schema=INDEX_SCHEMA))
            for name in SPLITS:
                start[name] += shard_counts[f"{name}_tokens"]


def measure_leakage(parts: list[Path]) -> dict[str, Any]:
    """How many validation paragraphs (and what share of them, and of their characters) a training document
    of any shard also holds."""
    val = np.concatenate([np.load(part / VAL_PARAGRAPHS) for part in parts])
    hashes, chars = val[:, 0], val[:, 1].astype(np.int64)
    found = np.zeros(hashes.size, dtype=bool)
    for part in parts:
        train = np.load(part / TRAIN_PARAGRAPHS)  # sorted: a binary search per validation paragraph
        if train.size and hashes.size:
            at = np.minimum(np.searchsorted(train, hashes), train.size - 1)
            found |= train[at] == hashes
    total_chars = int(chars.sum())
    return {
        "val_paragraphs": int(hashes.size),
        "val_leaked_paragraphs": int(found.sum()),
        "val_leakage": float(found.sum() / hashes.size) if hashes.size else 0.0,
        "val_leakage_chars": float(chars[found].sum() / total_chars) if total_chars else 0.0,
    }


def build(ctx: StageContext, cfg: TokensConfig) -> dict[str, Any]:
    # The tokenizer must have been trained on these very documents' training split (--only tokens pairs each
    # input's latest version, and the two latest pointers can come from different runs).
    ctx.require_common_ancestor("tokenizer", "dedup")
    tokenizer_dir = ctx.input_path("tokenizer")
    split = tokenizer_split(ctx.input_manifest("tokenizer"), cfg.split)
    tokenizer = Tokenizer.load(tokenizer_dir / FILENAME)
    shutil.copyfile(tokenizer_dir / FILENAME, ctx.out / FILENAME)
    tokenizer_sha256 = sha256_file(ctx.out / FILENAME)
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    source = ctx.input_path("dedup")
    shards = input_shards(source)
    listed = ctx.input_manifest("dedup").get("files", {})
    ctx.log.info(
        "encoding %d shard(s) with the %s tokenizer (%d ids, %s), %d worker(s)",
        len(shards),
        tokenizer.kind,
        tokenizer.vocab_size,
        dtype.name,
        min(cfg.workers, len(shards)),
    )
    jobs = []
    for shard in shards:
        name = f"{DOCS}/{shard.name}"
        if not isinstance(listed.get(name), dict) or "sha256" not in listed[name]:
            raise DataIntegrityError(f"{source}: its manifest lists no sha256 for {name}")
        # The shard's encoding depends on its content, the tokenizer's, the split and, for the row groups
        # of its index rows, the batch size.
        key = {
            "shard": listed[name]["sha256"],
            "tokenizer": tokenizer_sha256,
            "split": split.model_dump(mode="json"),
            "batch_docs": cfg.batch_docs,
        }
        args = (str(shard), str(ctx.out / FILENAME), split.seed, split.val_fraction, cfg.batch_docs)
        jobs.append(ShardJob(name=shard.stem, args=args, key=key, dest=ctx.work / ENCODED / shard.stem))
    counts = map_shards(scope_of(ctx), "encode", encode_shard, jobs, cfg.workers)
    parts = [job.dest for job in jobs]
    join_shards(parts, counts, ctx.out)
    docs = {name: sum(c[f"{name}_docs"] for c in counts) for name in SPLITS}
    tokens = {name: sum(c[f"{name}_tokens"] for c in counts) for name in SPLITS}
    n_bytes = {name: sum(c[f"{name}_bytes"] for c in counts) for name in SPLITS}

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
        **measure_leakage(parts),
    }
    (ctx.out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ctx.log.info(
        "train: %d tokens in %d documents; val: %d tokens in %d documents",
        meta["train_tokens"],
        meta["train_docs"],
        meta["val_tokens"],
        meta["val_docs"],
    )
    ctx.log.info(
        "leakage: %d of %d validation paragraphs (%.2f%%; %.2f%% of their characters) also appear in training "
        "documents",
        meta["val_leaked_paragraphs"],
        meta["val_paragraphs"],
        100 * meta["val_leakage"],
        100 * meta["val_leakage_chars"],
    )
    return meta


STAGE = Stage(
    name="tokens",
    module=__name__,
    config=TokensConfig,
    build=build,
    inputs=("dedup", "tokenizer"),
    libraries=("tokenizers", "tiktoken", "numpy", "pyarrow"),
)
tokens_task = stage_task(STAGE)
