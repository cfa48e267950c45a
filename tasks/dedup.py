"""Stage dedup: drop documents whose normalised text repeats an earlier document's.

Three passes joined by files, as in datatrove's `dedup/minhash.py`, so that each can run on another machine,
be resumed, and so that near-duplicate signatures can join later without changing the layout:

1. signatures, per shard: one 128-bit hash per document (scratch `signatures/<shard>.sig`, 16 bytes a row);
2. clusters: group equal hashes over all shards and keep the first document of each group in a stable
   order (shard order, then row order); `clusters/clusters.parquet` lists every group of two or more;
3. filter, per shard: copy every document that is not a dropped cluster member to `docs/<shard>`.

Memory holds one hash (and its position) per document, never the text of more than one batch.
"""

import hashlib
import os
import sys
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from storage.errors import DataIntegrityError
from tasks.shards import DOCS, input_shards, map_jobs, process_pool, read_batches
from tasks.stage import Stage, StageConfig, StageContext, stage_task

CLUSTERS = "clusters"
SIGNATURES = "signatures"
SIGNATURE_BYTES = 16

CLUSTER_SCHEMA = pa.schema(
    [
        pa.field("cluster_id", pa.int64()),
        pa.field("doc_id", pa.string()),
        pa.field("kept", pa.bool_()),
        pa.field("shard", pa.string()),  # the shard's file name under docs/, in clean's and dedup's versions
        pa.field("row", pa.int64()),  # the document's row in that shard of the clean version
    ]
)


class DedupConfig(StageConfig):
    """How duplicates are found. Text normalisation follows datatrove's TextNormConfig defaults."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"workers"})

    method: Literal["exact"] = Field(
        default="exact",
        description="exact: documents whose normalised text is identical. Near-duplicates (MinHash) will "
        "add signatures beside the exact ones.",
    )
    strip_punctuation: bool = Field(
        default=True,
        description="Ignore punctuation (Unicode categories P*) when comparing, as datatrove does; case, "
        "Unicode compatibility forms and whitespace runs are always ignored.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Processes hashing and filtering shards at once (1 runs inline). Does not change the output.",
    )


# -- pass 1: signatures -----------------------------------------------------------------------------------


@cache
def _punctuation_table() -> dict[int, None]:
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def normalize_for_dedup(text: str, strip_punctuation: bool = True) -> str:
    """The text two documents must share to count as exact duplicates."""
    # Casefolding can leave text that is no longer NFKC (e.g. some ligatures), hence NFKC on both sides.
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    if strip_punctuation:
        text = text.translate(_punctuation_table())
    return " ".join(text.split())


def signature(text: str, strip_punctuation: bool = True) -> bytes:
    """128 bits of blake2b over the normalised text: collisions are negligible for any corpus size."""
    data = normalize_for_dedup(text, strip_punctuation).encode("utf-8")
    return hashlib.blake2b(data, digest_size=SIGNATURE_BYTES).digest()


def signature_shard(src: Path, dest: Path, strip_punctuation: bool) -> int:
    """Write the signatures of `src`'s documents, in row order, to `dest`; returns the number of documents.

    A complete `dest` from an earlier attempt (one signature per row) is reused: this pass resumes.
    """
    rows = _num_rows(src)
    if dest.is_file() and dest.stat().st_size == rows * SIGNATURE_BYTES:
        return rows
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for batch in read_batches(src, ["text"]):
                out.write(
                    b"".join(signature(text or "", strip_punctuation) for text in batch.column("text").to_pylist())
                )
        os.replace(tmp, dest)  # all or nothing, so that a resumed attempt can trust what it finds
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def _num_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise DataIntegrityError(f"{path}: not a readable Parquet file ({exc})") from exc


def _signature_job(src: str, dest: str, strip_punctuation: bool) -> int:
    return signature_shard(Path(src), Path(dest), strip_punctuation)


# -- pass 2: clusters -------------------------------------------------------------------------------------


def cluster_signatures(shards: list[Path], signature_files: list[Path], dest: Path) -> dict[str, int]:
    """Group equal signatures over all shards and write the groups of two or more to `dest`.

    Within a group the first document in (shard, row) order is kept. Clusters are numbered in the order of
    their kept document. Returns docs_in, kept, exact_duplicates, clusters.
    """
    parts = []
    for sig_path in signature_files:
        raw = np.fromfile(sig_path, dtype=np.uint64)
        parts.append(raw.reshape(-1, 2))  # (docs, 2): a 128-bit signature as two 64-bit halves
    sigs = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.uint64)
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    n = len(sigs)
    position = np.arange(n, dtype=np.int64)  # global order: shard order, then row order
    order = np.lexsort((position, sigs[:, 1], sigs[:, 0]))
    ordered = sigs[order]
    starts = np.ones(n, dtype=bool)  # True where a new group of equal signatures begins
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    group = np.cumsum(starts) - 1
    sizes = np.bincount(group) if n else np.zeros(0, dtype=np.int64)
    in_cluster = sizes[group] > 1
    members = order[in_cluster]  # positions of every document in a group of two or more
    member_group = group[in_cluster]
    kept = starts[in_cluster]
    # Number clusters by their kept document's position: the lexsort puts it first in its group.
    cluster_groups = member_group[kept]
    rank = np.empty(int(sizes.size), dtype=np.int64)
    rank[cluster_groups[np.argsort(order[in_cluster][kept], kind="stable")]] = np.arange(cluster_groups.size)
    cluster_id = rank[member_group]
    table_order = np.lexsort((members, cluster_id))
    members, cluster_id, kept = members[table_order], cluster_id[table_order], kept[table_order]

    shard_of = np.searchsorted(np.cumsum(counts), members, side="right")
    row_of = members - (np.cumsum(counts) - counts)[shard_of]
    doc_ids = np.empty(members.size, dtype=object)
    for index, shard in enumerate(shards):
        mine = np.flatnonzero(shard_of == index)
        if mine.size:
            column = pq.read_table(shard, columns=["doc_id"]).column("doc_id")
            doc_ids[mine] = column.take(pa.array(row_of[mine])).to_pylist()
    table = pa.table(
        {
            "cluster_id": cluster_id,
            "doc_id": pa.array(doc_ids.tolist(), pa.string()),
            "kept": kept,
            "shard": pa.array([shards[i].name for i in shard_of], pa.string()),
            "row": row_of,
        },
        schema=CLUSTER_SCHEMA,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest, compression="zstd")
    duplicates = int(np.count_nonzero(~kept))
    return {"docs_in": n, "kept": n - duplicates, "exact_duplicates": duplicates, "clusters": int(cluster_groups.size)}


# -- pass 3: filter ---------------------------------------------------------------------------------------


def filter_shard(src: Path, dest: Path, clusters: Path) -> int:
    """Copy `src` to `dest` without the rows that `clusters` marks as dropped; returns the rows kept."""
    dropped = pq.read_table(clusters, columns=["row"], filters=[("shard", "=", src.name), ("kept", "=", False)])
    drop = np.sort(dropped.column("row").to_numpy())
    schema = pq.read_schema(src)
    kept = 0
    start = 0
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        for batch in read_batches(src):
            rows = np.arange(start, start + batch.num_rows)
            keep = np.flatnonzero(~np.isin(rows, drop))
            writer.write_table(pa.Table.from_batches([batch]).take(pa.array(keep)).cast(schema))
            kept += int(keep.size)
            start += batch.num_rows
    return kept


def _filter_job(src: str, dest: str, clusters: str) -> int:
    return filter_shard(Path(src), Path(dest), Path(clusters))


# -- the stage --------------------------------------------------------------------------------------------


def build(ctx: StageContext, cfg: DedupConfig) -> dict[str, Any]:
    shards = input_shards(ctx.input_path("clean"))
    sig_dir = ctx.work / SIGNATURES
    sig_dir.mkdir(parents=True, exist_ok=True)
    signature_files = [sig_dir / f"{shard.stem}.sig" for shard in shards]
    clusters_path = ctx.out / CLUSTERS / "clusters.parquet"
    (ctx.out / DOCS).mkdir(parents=True, exist_ok=True)
    with process_pool(cfg.workers, len(shards)) as pool:  # one pool for passes 1 and 3: spawning costs seconds
        ctx.log.info("pass 1: hashing %d shard(s) with %d worker(s)", len(shards), min(cfg.workers, len(shards)))
        jobs = [(str(src), str(sig), cfg.strip_punctuation) for src, sig in zip(shards, signature_files, strict=True)]
        docs_in = sum(map_jobs(pool, _signature_job, jobs))
        if docs_in == 0:
            raise DataIntegrityError(f"{ctx.input_path('clean') / DOCS}: no documents to deduplicate")

        metrics = cluster_signatures(shards, signature_files, clusters_path)
        ctx.log.info(
            "pass 2: %d exact duplicate(s) in %d cluster(s) among %d documents",
            metrics["exact_duplicates"],
            metrics["clusters"],
            metrics["docs_in"],
        )

        jobs = [(str(src), str(ctx.out / DOCS / src.name), str(clusters_path)) for src in shards]
        kept = sum(map_jobs(pool, _filter_job, jobs))
    if kept != metrics["kept"]:
        raise DataIntegrityError(
            f"{ctx.input_path('clean') / DOCS}: pass 3 kept {kept} documents, pass 2 expected {metrics['kept']}"
        )
    ctx.log.info("pass 3: kept %d of %d documents", kept, docs_in)
    return metrics


STAGE = Stage(
    name="dedup", module=__name__, config=DedupConfig, build=build, inputs=("clean",), libraries=("pyarrow", "python")
)
dedup_task = stage_task(STAGE)
