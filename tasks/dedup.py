"""Stage dedup: drop exact duplicates, then near-duplicates (MinHash LSH), then optionally repeated paragraphs.

Passes joined by files, as in datatrove's `dedup/minhash.py`, so that each can run on another machine and be
resumed; the per-shard passes are `map_shards` steps, cached on their input shard's sha256, so a nightly
run with one new shard hashes only that shard:

1. signatures, per shard (`map_shards` step "signatures"): from the normalised text, one 128-bit hash per
   document, its (hash, row) records sorted by hash (`signatures/<shard>.hashes.npy`, the high and low 64
   bits, and `.rows.npy`) and, for `method: minhash`, its MinHash signature over word n-grams and one hash
   per LSH band, each band's (hash, row) records sorted by hash (`minhash/<shard>.*.npy`), all in scratch
   under `ctx.work`;
2. exact clusters: the records of every shard are merged one range of the high 64 bits at a time (sized to
   SORT_BUDGET_BYTES as in pass 3), and documents whose 128 bits are equal form a group; the first document
   of each group in (shard, row) order is kept (memory: one range's records, and a position and its group's
   first for each document that has an exact duplicate);
3. buckets (minhash): for each band, the records of every shard are merged one hash range at a time (the
   ranges are sized so that one range's records take at most SORT_BUDGET_BYTES), documents sharing a
   band hash become candidate pairs, and a pair is kept when the fraction of equal values in the two
   signatures (the estimated Jaccard similarity) reaches `threshold`; verified pairs go to
   `buckets/band-<b>.npy` in scratch;
4. clusters (minhash): connected components of the verified pairs, deterministic (the root of a component is
   its first document); each is merged with the exact groups of its members. The first document of a
   cluster in (shard, row) order is kept. `clusters/clusters.parquet` lists every member of every cluster
   with its doc_id, shard, row, kind (kept, exact, near) and estimated similarity to the kept document;
5. paragraphs (`paragraphs: true`, dolma-style): each shard's lines of at least MIN_PARAGRAPH_CHARS
   characters are hashed (`map_shards` step "paragraphs", `paragraphs/<shard>.*.npy`, sorted by hash);
   merged one hash range at a time, every occurrence but the first in (shard, row, line) order among the
   documents still kept is marked for removal;
6. filter, per shard (`map_shards` step "filter", keyed on the input's sha256, the rows it drops and the
   lines it cuts): `docs/<shard>` without the dropped rows and cut lines, `removed/<shard>` with each
   dropped row's doc_id and reason (exact_duplicate, near_duplicate, paragraphs: no text left).

No pass holds the corpus's text, nor a hash per document: the stage process holds, for every document, only
`alive` (1 byte: not yet removed), and per shard its offset among the documents; besides them, a few bytes
per duplicate, candidate pair and repeated paragraph, and one hash range of exact, band or paragraph records
at a time.
"""

import hashlib
import math
import sys
import time
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from storage.errors import DataIntegrityError
from tasks.minhash import (
    MinHashParams,
    bucket_pairs,
    connected_components,
    estimated_jaccard,
    hash_ranges,
    range_slice,
)
from tasks.minhash import band_hashes as minhash_band_hashes
from tasks.minhash import signatures as minhash_signatures
from tasks.shardmap import ShardJob, map_shards, scope_of, worker_pool
from tasks.shards import DOCS, input_shards, read_batches
from tasks.stage import Stage, StageConfig, StageContext, stage_task

CLUSTERS = "clusters"
SIGNATURES = "signatures"
MINHASH = "minhash"
BUCKETS = "buckets"
PARAGRAPHS = "paragraphs"
REMOVED = "removed"
SIGNATURE_BYTES = 16
# A line shorter than this is never a paragraph to deduplicate: headings, list items and blank lines repeat
# legitimately (dolma's paragraph dedup counts every line; 60 characters keeps boilerplate sentences in).
MIN_PARAGRAPH_CHARS = 60
# Records (band or paragraph hashes) of one hash range held at once by a global pass, sort included.
SORT_BUDGET_BYTES = 256 << 20

CLUSTER_SCHEMA = pa.schema(
    [
        pa.field("cluster_id", pa.int64()),
        pa.field("doc_id", pa.string()),
        pa.field("kept", pa.bool_()),
        pa.field("shard", pa.string()),  # the shard's file name under docs/, in clean's and dedup's versions
        pa.field("row", pa.int64()),  # the document's row in that shard of the clean version
        pa.field("kind", pa.string()),  # kept; exact: same normalised text as a member; near: MinHash match
        pa.field("similarity", pa.float64()),  # estimated Jaccard similarity to the kept document
    ]
)
REMOVED_SCHEMA = pa.schema([("doc_id", pa.string()), ("row", pa.int64()), ("reason", pa.string())])
EXACT, NEAR, EMPTIED = "exact_duplicate", "near_duplicate", "paragraphs"


class DedupConfig(StageConfig):
    """How duplicates are found. Text normalisation follows datatrove's TextNormConfig defaults; the MinHash
    defaults are datatrove's MinhashConfig (5-grams, 14 bands of 8 hashes, seed 1)."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"workers"})

    method: Literal["exact", "minhash"] = Field(
        default="minhash",
        description="exact: only documents whose normalised text is identical. minhash: those, then "
        "near-duplicates found by MinHash LSH over word n-grams.",
    )
    strip_punctuation: bool = Field(
        default=True,
        description="Ignore punctuation (Unicode categories P*) when comparing, as datatrove does; case, "
        "Unicode compatibility forms and whitespace runs are always ignored.",
    )
    ngram_size: int = Field(
        default=5, ge=1, le=64, description="Words per shingle (datatrove's and FineWeb's 5-grams)."
    )
    bands: int = Field(default=14, ge=1, le=128, description="LSH bands (datatrove: 14 buckets).")
    rows_per_band: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Hashes per band (datatrove: 8). With 14 bands a pair is a candidate with probability "
        "1/2 at similarity (1/14)^(1/8) = 0.72 and 0.92 at 0.8.",
    )
    seed: int = Field(default=1, ge=0, le=2**32 - 1, description="Seed of the MinHash functions (datatrove: 1).")
    threshold: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="A candidate pair is a near-duplicate when the fraction of equal signature values (the "
        "estimated Jaccard similarity of its 5-gram sets) is at least this. 0.7, measured with "
        "benchmarks/dedup_bench.py (8 and 25 MB of prose, 1-3% of words changed in planted copies): recall "
        "0.97-0.98 of planted pairs of true similarity >= 0.8, and 0.985-0.996 of removed documents >= 0.7 "
        "similar to the one kept.",
    )
    paragraphs: bool = Field(
        default=False,
        description="Also remove, dolma-style, every line of at least 60 characters that already occurred "
        "(normalised) in an earlier kept document in (shard, row) order; a document left empty is dropped.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Processes hashing and filtering shards at once (1 runs inline). Does not change the output.",
    )

    @model_validator(mode="after")
    def _check_signature_size(self) -> "DedupConfig":
        if self.bands * self.rows_per_band > 1024:
            raise ValueError(
                f"bands x rows_per_band = {self.bands * self.rows_per_band}: at most 1024 hashes per signature"
            )
        return self

    def minhash(self) -> MinHashParams:
        return MinHashParams(self.ngram_size, self.bands, self.rows_per_band, self.seed)


# -- normalisation ----------------------------------------------------------------------------------------


# Every code point of a text is looked up in a table of the punctuation code points. Building it costs each
# worker process about 0.15 s for the whole range and 0.02 s for the first two planes (which hold all the
# punctuation of Unicode 14, Python 3.11's), so the rest is only built for a text that goes past them.
COMMON_PLANES = 0x20000
_ASCII_PUNCTUATION = bytes(cp for cp in range(128) if unicodedata.category(chr(cp)).startswith("P"))


@cache
def _punctuation_mask(size: int) -> np.ndarray:
    """True at each code point below `size` whose Unicode category is punctuation (P*)."""
    mask = np.zeros(size, dtype=bool)
    mask[[cp for cp in range(size) if unicodedata.category(chr(cp)).startswith("P")]] = True
    return mask


def normalize_for_dedup(text: str, strip_punctuation: bool = True) -> str:
    """The text two documents must share to count as exact duplicates."""
    # Casefolding can leave text that is no longer NFKC (e.g. some ligatures), hence NFKC on both sides.
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    if strip_punctuation and text.isascii():  # most web text: bytes.translate deletes at C speed
        text = text.encode("ascii").translate(None, _ASCII_PUNCTUATION).decode("ascii")
    elif strip_punctuation:
        # A lookup table over code points: str.translate with a dict runs at ~20 MB/s, this at ~100 MB/s.
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        size = COMMON_PLANES if points.max() < COMMON_PLANES else sys.maxunicode + 1
        text = points[~_punctuation_mask(size)[points]].tobytes().decode("utf-32-le")
    return " ".join(text.split())


def signature(text: str, strip_punctuation: bool = True) -> bytes:
    """128 bits of blake2b over the normalised text: collisions are negligible for any corpus size."""
    return _exact_hash(normalize_for_dedup(text, strip_punctuation))


def _exact_hash(normalised: str) -> bytes:
    return hashlib.blake2b(normalised.encode("utf-8"), digest_size=SIGNATURE_BYTES).digest()


def paragraph_lines(text: str) -> list[tuple[int, str]]:
    """(line index, line) of each line of `text` that counts as a paragraph (MIN_PARAGRAPH_CHARS or more)."""
    return [(i, line) for i, line in enumerate(text.split("\n")) if len(line.strip()) >= MIN_PARAGRAPH_CHARS]


# -- pass 1: signatures -----------------------------------------------------------------------------------


def _text_batches(src: Path) -> Any:
    """The `text` column of `src` batch by batch, as lists of str (a null text reads as "")."""
    try:
        field = pq.read_schema(src).field("text")
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise DataIntegrityError(f"{src}: not a Parquet document shard with a text column ({exc})") from exc
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise DataIntegrityError(f"{src}: column text is {field.type}, not a string")
    for batch in read_batches(src, ["text"]):
        yield [text or "" for text in batch.column("text").to_pylist()]


def write_exact_hashes(digests: bytes, folder: Path, stem: str) -> int:
    """Write one shard's exact hashes (`digests`: SIGNATURE_BYTES a row, in row order) sorted by (hash, row):
    `<stem>.hashes.npy`, (2, rows) uint64, the digests' first 8 bytes then their last 8 (each read
    little-endian), and `<stem>.rows.npy`, (rows,) uint32, the row of each. Returns the number of rows."""
    halves = np.frombuffer(digests, dtype="<u8").reshape(-1, 2).astype(np.uint64)
    rows = np.arange(len(halves), dtype=np.uint32)
    order = np.lexsort((rows, halves[:, 1], halves[:, 0]))
    folder.mkdir(parents=True, exist_ok=True)  # one folder holds every shard's files
    # (2, rows), not (rows, 2): the high halves are one contiguous array that a range is cut from.
    np.save(folder / f"{stem}.hashes.npy", np.ascontiguousarray(halves[order].T))
    np.save(folder / f"{stem}.rows.npy", rows[order])
    return len(rows)


def hash_shard(src: Path, out: Path, strip_punctuation: bool, params: MinHashParams | None) -> int:
    """Write `src`'s exact hashes sorted with their rows (and, with `params`, its MinHash signatures and
    sorted band records) under `out`; returns the number of documents."""
    exact = []
    minhash = []
    for texts in _text_batches(src):
        normalised = [normalize_for_dedup(text, strip_punctuation) for text in texts]
        exact.append(b"".join(_exact_hash(text) for text in normalised))
        if params is not None:
            minhash.append(minhash_signatures(normalised, params))
    rows = write_exact_hashes(b"".join(exact), out / SIGNATURES, src.stem)
    if params is not None:
        sigs = np.concatenate(minhash) if minhash else np.zeros((0, params.permutations), dtype=np.uint32)
        bands = minhash_band_hashes(sigs, params)  # (bands, docs)
        order = np.argsort(bands, axis=1, kind="stable")  # by hash, then row
        (out / MINHASH).mkdir(parents=True)
        np.save(out / MINHASH / f"{src.stem}.sig.npy", sigs)
        np.save(out / MINHASH / f"{src.stem}.bands.npy", np.take_along_axis(bands, order, axis=1))
        np.save(out / MINHASH / f"{src.stem}.rows.npy", order.astype(np.uint32))
    return rows


def _signature_job(out: str, src: str, strip_punctuation: bool, params: tuple[int, ...] | None) -> dict[str, int]:
    minhash = MinHashParams(*params) if params is not None else None
    return {"docs": hash_shard(Path(src), Path(out), strip_punctuation, minhash)}


# -- pass 2: exact clusters -------------------------------------------------------------------------------


def exact_groups(folder: Path, stems: list[str], budget: int = SORT_BUDGET_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The positions (shard order, then row order) of every document whose exact hash another document
    shares, and for each the position of its group's first document (the one kept); sorted by position.

    The shards' sorted hashes (`write_exact_hashes`) are merged one range of the high 64 bits at a time, the
    ranges sized so that one range's records take at most `budget`; the result does not depend on it."""
    hash_maps = [np.load(folder / f"{stem}.hashes.npy", mmap_mode="r") for stem in stems]
    row_maps = [np.load(folder / f"{stem}.rows.npy", mmap_mode="r") for stem in stems]
    offsets = np.concatenate([[0], np.cumsum([rows.size for rows in row_maps])]).astype(np.int64)
    members, reps = [], []
    for low, high in hash_ranges(_range_count(int(offsets[-1]), 24, budget)):  # high, low half, position
        his, los, positions = [], [], []
        for index, (hashes, rows) in enumerate(zip(hash_maps, row_maps, strict=True)):
            part = range_slice(hashes[0], low, high)
            his.append(np.asarray(hashes[0][part]))
            los.append(np.asarray(hashes[1][part]))
            positions.append(np.asarray(rows[part], dtype=np.int64) + offsets[index])
        hi, lo, position = (np.concatenate(parts) for parts in (his, los, positions))
        order = np.lexsort((position, lo, hi))  # a group's first position comes first
        hi, lo, position = hi[order], lo[order], position[order]
        # Equal high halves never fall in two ranges (ranges split on them), so a group lies in one range;
        # both halves must match for the 128 bits to be equal.
        starts = np.ones(position.size, dtype=bool)  # True where a new group of equal hashes begins
        starts[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        group = np.cumsum(starts) - 1
        in_group = np.bincount(group)[group] > 1
        members.append(position[in_group])
        reps.append(position[starts][group][in_group])
    member_array, rep_array = np.concatenate(members), np.concatenate(reps)
    by_position = np.argsort(member_array, kind="stable")
    return member_array[by_position], rep_array[by_position]


# -- pass 3: buckets --------------------------------------------------------------------------------------


class _Signatures:
    """The MinHash signatures of every shard, memory-mapped, looked up by global position."""

    def __init__(self, files: list[Path]) -> None:
        self.maps = [np.load(path, mmap_mode="r") for path in files]
        counts = np.array([m.shape[0] for m in self.maps], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        width = self.maps[0].shape[1] if self.maps else 0
        result = np.empty((positions.size, width), dtype=np.uint32)
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        for index in np.unique(shard):
            mine = np.flatnonzero(shard == index)
            result[mine] = self.maps[index][positions[mine] - self.offsets[index]]
        return result

    def similarity(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return estimated_jaccard(self.rows(left), self.rows(right))


def _range_count(total_records: int, record_bytes: int, budget: int) -> int:
    # A range's records, their sorted copy and the sort's permutation: about three times the records.
    return max(1, math.ceil(3 * total_records * record_bytes / budget))


def verified_pairs(
    minhash_dir: Path,
    stems: list[str],
    offsets: np.ndarray,
    alive: np.ndarray,
    params: MinHashParams,
    threshold: float,
    dest: Path,
    budget: int = SORT_BUDGET_BYTES,
) -> tuple[int, int]:
    """For each band, the candidate pairs among documents still `alive` (by global position) that share the
    band's hash, kept when their estimated similarity reaches `threshold`: written to `dest/band-<b>.npy`
    as (pairs, 2) int64 positions. Returns (candidate pairs, verified pairs), each summed over bands."""
    sigs = _Signatures([minhash_dir / f"{stem}.sig.npy" for stem in stems])
    band_maps = [np.load(minhash_dir / f"{stem}.bands.npy", mmap_mode="r") for stem in stems]
    row_maps = [np.load(minhash_dir / f"{stem}.rows.npy", mmap_mode="r") for stem in stems]
    ranges = hash_ranges(_range_count(int(offsets[-1]), 12, budget))  # 8 bytes of hash, 4 of row
    dest.mkdir(parents=True, exist_ok=True)
    candidates = verified = 0
    for band in range(params.bands):
        found = []
        for low, high in ranges:
            hashes, positions = [], []
            for index, (bands, rows) in enumerate(zip(band_maps, row_maps, strict=True)):
                part = range_slice(bands[band], low, high)
                hashes.append(np.asarray(bands[band][part]))
                positions.append(np.asarray(rows[band][part], dtype=np.int64) + offsets[index])
            hash_array, position_array = np.concatenate(hashes), np.concatenate(positions)
            keep = alive[position_array]
            hash_array, position_array = hash_array[keep], position_array[keep]
            order = np.lexsort((position_array, hash_array))
            pairs = bucket_pairs(hash_array[order], position_array[order])
            candidates += len(pairs)
            if len(pairs):
                similar = sigs.similarity(pairs[:, 0], pairs[:, 1]) >= threshold
                found.append(pairs[similar])
        band_pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
        verified += len(band_pairs)
        np.save(dest / f"band-{band:03d}.npy", band_pairs)
    return candidates, verified


# -- pass 4: clusters -------------------------------------------------------------------------------------


def cluster_table(
    exact_members: np.ndarray,
    exact_reps: np.ndarray,
    near_pairs: np.ndarray,
    sigs: _Signatures | None,
) -> dict[str, np.ndarray]:
    """Every member of every cluster: its position, cluster id, root (the kept position), kind and estimated
    similarity to the kept document; sorted by (cluster id, position). Clusters are numbered by the
    position of their kept document."""
    near_nodes, near_roots = (
        connected_components(near_pairs) if len(near_pairs) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    )
    members = np.union1d(exact_members, near_nodes)
    # Each member's exact representative (itself when it has no exact duplicate)...
    rep = members.copy()
    rep[np.searchsorted(members, exact_members)] = exact_reps
    # ...and that representative's near-duplicate root (itself when it has none).
    root = rep.copy()
    in_near = np.isin(rep, near_nodes)
    root[in_near] = near_roots[np.searchsorted(near_nodes, rep[in_near])]
    kind = np.where(members == root, "kept", np.where(members != rep, "exact", "near"))
    similarity = np.ones(members.size, dtype=np.float64)
    differ = rep != root  # documents whose text is not the kept one's
    if sigs is not None and differ.any():
        similarity[differ] = sigs.similarity(members[differ], root[differ])
    roots = np.unique(root)
    cluster_id = np.searchsorted(roots, root)
    order = np.lexsort((members, cluster_id))
    return {
        "position": members[order],
        "cluster_id": cluster_id[order],
        "root": root[order],
        "kind": kind[order],
        "similarity": similarity[order],
    }


def write_clusters(table: dict[str, np.ndarray], shards: list[Path], offsets: np.ndarray, dest: Path) -> None:
    """`clusters/clusters.parquet`: the members with their doc_id, shard and row."""
    positions = table["position"]
    shard_of = np.searchsorted(offsets, positions, side="right") - 1
    row_of = positions - offsets[shard_of]
    doc_ids = np.empty(positions.size, dtype=object)
    for index in np.unique(shard_of):
        mine = np.flatnonzero(shard_of == index)
        column = pq.read_table(shards[index], columns=["doc_id"]).column("doc_id")
        doc_ids[mine] = column.take(pa.array(row_of[mine])).to_pylist()
    result = pa.table(
        {
            "cluster_id": table["cluster_id"],
            "doc_id": pa.array(doc_ids.tolist(), pa.string()),
            "kept": table["kind"] == "kept",
            "shard": pa.array([shards[i].name for i in shard_of], pa.string()),
            "row": row_of,
            "kind": pa.array(table["kind"].tolist(), pa.string()),
            "similarity": table["similarity"],
        },
        schema=CLUSTER_SCHEMA,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result, dest, compression="zstd")


# -- pass 5: paragraphs -----------------------------------------------------------------------------------


def hash_paragraphs(src: Path, out: Path, strip_punctuation: bool) -> int:
    """Write the 128-bit hash of each paragraph line of `src`'s normalised text, sorted by hash, with its
    row and line index (`<shard>.hi.npy`, `.lo.npy`, `.row.npy`, `.line.npy`); returns the paragraphs."""
    hashes, rows, lines = [], [], []
    row = 0
    for texts in _text_batches(src):
        for text in texts:
            for line_index, line in paragraph_lines(text):
                hashes.append(_exact_hash(normalize_for_dedup(line, strip_punctuation)))
                rows.append(row)
                lines.append(line_index)
            row += 1
    pairs = np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(-1, 2)
    row_array, line_array = np.array(rows, dtype=np.uint32), np.array(lines, dtype=np.uint32)
    order = np.lexsort((line_array, row_array, pairs[:, 1], pairs[:, 0]))
    folder = out / PARAGRAPHS
    folder.mkdir(parents=True)
    for name, values in (("hi", pairs[:, 0]), ("lo", pairs[:, 1]), ("row", row_array), ("line", line_array)):
        np.save(folder / f"{src.stem}.{name}.npy", np.ascontiguousarray(values[order]))
    return len(rows)


def _paragraph_job(out: str, src: str, strip_punctuation: bool) -> dict[str, int]:
    return {"paragraphs": hash_paragraphs(Path(src), Path(out), strip_punctuation)}


def repeated_paragraphs(
    folder: Path, stems: list[str], offsets: np.ndarray, alive: np.ndarray, budget: int = SORT_BUDGET_BYTES
) -> np.ndarray:
    """(position, line) of every paragraph of an `alive` document whose normalised text occurred before, in
    (shard, row, line) order, in an alive document: (paragraphs, 2) int64, sorted."""
    maps = {
        name: [np.load(folder / f"{stem}.{name}.npy", mmap_mode="r") for stem in stems]
        for name in ("hi", "lo", "row", "line")
    }
    total = sum(m.size for m in maps["hi"])
    repeats = []
    for low, high in hash_ranges(_range_count(total, 24, budget)):
        hi, lo, pos, line = [], [], [], []
        for index, his in enumerate(maps["hi"]):
            part = range_slice(his, low, high)
            hi.append(np.asarray(his[part]))
            lo.append(np.asarray(maps["lo"][index][part]))
            pos.append(np.asarray(maps["row"][index][part], dtype=np.int64) + offsets[index])
            line.append(np.asarray(maps["line"][index][part], dtype=np.int64))
        hi_a, lo_a, pos_a, line_a = (np.concatenate(parts) for parts in (hi, lo, pos, line))
        keep = alive[pos_a]
        hi_a, lo_a, pos_a, line_a = hi_a[keep], lo_a[keep], pos_a[keep], line_a[keep]
        order = np.lexsort((line_a, pos_a, lo_a, hi_a))
        hi_a, lo_a = hi_a[order], lo_a[order]
        later = np.zeros(order.size, dtype=bool)
        later[1:] = (hi_a[1:] == hi_a[:-1]) & (lo_a[1:] == lo_a[:-1])  # not the first of its hash
        repeats.append(np.stack([pos_a[order][later], line_a[order][later]], axis=1))
    found = np.concatenate(repeats) if repeats else np.zeros((0, 2), dtype=np.int64)
    return found[np.lexsort((found[:, 1], found[:, 0]))]


# -- pass 6: filter ---------------------------------------------------------------------------------------


def filter_shard(src: Path, out: Path, drops: list[list[Any]], cuts: list[list[Any]]) -> dict[str, int]:
    """Write `src` to `out/docs/<shard>` without the rows of `drops` ([row, reason]) and without the lines of
    `cuts` ([row, [line, ...]]); a document left with no text is dropped with reason "paragraphs". Each
    dropped row goes to `out/removed/<shard>`. Returns kept, paragraphs_removed, paragraph_docs_dropped."""
    drop = {row: reason for row, reason in drops}
    cut = {row: set(lines) for row, lines in cuts}
    schema = pq.read_schema(src)
    (out / DOCS).mkdir(parents=True)
    (out / REMOVED).mkdir(parents=True)
    removed: dict[str, list[Any]] = {"doc_id": [], "row": [], "reason": []}
    counts = {"kept": 0, "paragraphs_removed": 0, "paragraph_docs_dropped": 0}
    start = 0
    with pq.ParquetWriter(out / DOCS / src.name, schema, compression="zstd") as writer:
        for batch in read_batches(src):
            table = pa.Table.from_batches([batch])
            rows = range(start, start + batch.num_rows)
            if any(row in cut for row in rows):  # rewrite the text of the documents that lose lines
                texts = table.column("text").to_pylist()
                for offset, row in enumerate(rows):
                    if row in cut and row not in drop:
                        lines = texts[offset].split("\n")
                        texts[offset] = "\n".join(line for i, line in enumerate(lines) if i not in cut[row])
                        counts["paragraphs_removed"] += len(cut[row])
                        if not texts[offset].strip():
                            drop[row] = EMPTIED
                            counts["paragraph_docs_dropped"] += 1
                table = table.set_column(schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
                if "n_bytes" in schema.names:
                    n_bytes = pa.array([len(text.encode("utf-8")) for text in texts], pa.int64())
                    table = table.set_column(schema.get_field_index("n_bytes"), "n_bytes", n_bytes)
            gone = [offset for offset, row in enumerate(rows) if row in drop]
            if gone:
                doc_ids = table.column("doc_id").take(pa.array(gone)).to_pylist()
                removed["doc_id"] += doc_ids
                removed["row"] += [start + offset for offset in gone]
                removed["reason"] += [drop[start + offset] for offset in gone]
            keep = np.setdiff1d(np.arange(batch.num_rows), gone)
            writer.write_table(table.take(pa.array(keep)).cast(schema))
            counts["kept"] += int(keep.size)
            start += batch.num_rows
    pq.write_table(pa.table(removed, schema=REMOVED_SCHEMA), out / REMOVED / src.name, compression="zstd")
    return counts


def _filter_job(out: str, src: str, drops: list[list[Any]], cuts: list[list[Any]]) -> dict[str, int]:
    return filter_shard(Path(src), Path(out), drops, cuts)


# -- the stage --------------------------------------------------------------------------------------------


def _input_sha256(ctx: StageContext, shard: Path) -> str:
    name = f"{DOCS}/{shard.name}"
    info = ctx.input_manifest("clean")["files"].get(name)
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        raise DataIntegrityError(f"{shard}: not listed with a sha256 in the manifest of clean/{ctx.inputs['clean']}")
    return info["sha256"]


def _per_shard(positions: np.ndarray, values: list[Any], offsets: np.ndarray, shards: int) -> list[list[Any]]:
    """[row, value] lists per shard for sorted global `positions`."""
    shard_of = np.searchsorted(offsets, positions, side="right") - 1
    result: list[list[Any]] = [[] for _ in range(shards)]
    for position, index, value in zip(positions.tolist(), shard_of.tolist(), values, strict=True):
        result[index].append([position - int(offsets[index]), value])
    return result


def _timed(ctx: StageContext, name: str, began: float, message: str, *args: Any) -> float:
    """Log a pass's outcome with its duration (`extra` lets a caller's handler read the figures)."""
    seconds = time.perf_counter() - began
    ctx.log.info(
        "pass %s: " + message + " (%.2f s)", name, *args, seconds, extra={"dedup_pass": name, "seconds": seconds}
    )
    return time.perf_counter()


def build(ctx: StageContext, cfg: DedupConfig) -> dict[str, Any]:
    shards = input_shards(ctx.input_path("clean"))
    stems = [shard.stem for shard in shards]
    digests = [_input_sha256(ctx, shard) for shard in shards]
    params = cfg.minhash() if cfg.method == "minhash" else None
    as_args = None if params is None else (params.ngram_size, params.bands, params.rows_per_band, params.seed)
    scope = scope_of(ctx)
    metrics: dict[str, Any] = {}
    began = time.perf_counter()
    with worker_pool(cfg.workers, len(shards)) as pool:  # one pool for every per-shard step: spawning costs seconds
        jobs = [
            ShardJob(
                name=shard.stem,
                args=(str(shard), cfg.strip_punctuation, as_args),
                key={"input": digest, "name": shard.name},
                dest=ctx.work,
            )
            for shard, digest in zip(shards, digests, strict=True)
        ]
        counts = [result["docs"] for result in map_shards(scope, "signatures", _signature_job, jobs, cfg.workers, pool)]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        docs_in = int(offsets[-1])
        if docs_in == 0:
            raise DataIntegrityError(f"{ctx.input_path('clean') / DOCS}: no documents to deduplicate")
        began = _timed(ctx, "signatures", began, "%d documents in %d shard(s)", docs_in, len(shards))

        exact_members, exact_reps = exact_groups(ctx.work / SIGNATURES, stems)
        alive = np.ones(docs_in, dtype=bool)
        alive[exact_members[exact_members != exact_reps]] = False
        metrics["exact_duplicates"] = int(np.count_nonzero(~alive))
        began = _timed(ctx, "exact", began, "%d exact duplicate(s)", metrics["exact_duplicates"])

        near_pairs = np.zeros((0, 2), dtype=np.int64)
        sigs = None
        if params is not None:
            candidates, _ = verified_pairs(
                ctx.work / MINHASH, stems, offsets, alive, params, cfg.threshold, ctx.work / BUCKETS
            )
            parts = [np.load(path) for path in sorted((ctx.work / BUCKETS).glob("band-*.npy"))]
            near_pairs = np.unique(np.concatenate(parts), axis=0)
            sigs = _Signatures([ctx.work / MINHASH / f"{stem}.sig.npy" for stem in stems])
            metrics.update(lsh_threshold=round(params.lsh_threshold, 4), candidate_pairs=candidates)
            began = _timed(ctx, "buckets", began, "%d candidate and %d verified pair(s)", candidates, len(near_pairs))

        table = cluster_table(exact_members, exact_reps, near_pairs, sigs)
        write_clusters(table, shards, offsets, ctx.out / CLUSTERS / "clusters.parquet")
        dropped = table["kind"] != "kept"
        near = table["kind"] == "near"
        alive[table["position"][dropped]] = False
        metrics["near_duplicates"] = int(np.count_nonzero(near))
        metrics["clusters"] = int(np.count_nonzero(~dropped))
        began = _timed(ctx, "clusters", began, "%d cluster(s)", metrics["clusters"])

        cuts: list[list[list[Any]]] = [[] for _ in shards]
        if cfg.paragraphs:
            jobs = [
                ShardJob(
                    name=shard.stem,
                    args=(str(shard), cfg.strip_punctuation),
                    key={"input": digest, "name": shard.name},
                    dest=ctx.work,
                )
                for shard, digest in zip(shards, digests, strict=True)
            ]
            map_shards(scope, "paragraphs", _paragraph_job, jobs, cfg.workers, pool)
            repeats = repeated_paragraphs(ctx.work / PARAGRAPHS, stems, offsets, alive)
            positions, starts = np.unique(repeats[:, 0], return_index=True)
            lines = [group.tolist() for group in np.split(repeats[:, 1], starts[1:])] if len(repeats) else []
            cuts = _per_shard(positions, lines, offsets, len(shards))
            began = _timed(ctx, "paragraphs", began, "%d repeated paragraph(s)", len(repeats))

        reasons = np.where(near[dropped], NEAR, EXACT).tolist()
        drops = _per_shard(table["position"][dropped], reasons, offsets, len(shards))
        jobs = [
            ShardJob(
                name=shard.stem,
                args=(str(shard), drop, cut),
                key={"input": digest, "name": shard.name, "drop": drop, "cut": cut},
                dest=ctx.out,
            )
            for shard, digest, drop, cut in zip(shards, digests, drops, cuts, strict=True)
        ]
        results = map_shards(scope, "filter", _filter_job, jobs, cfg.workers, pool)
    kept = sum(result["kept"] for result in results)
    expected = docs_in - metrics["exact_duplicates"] - metrics["near_duplicates"]
    if cfg.paragraphs:
        metrics["paragraphs_removed"] = sum(result["paragraphs_removed"] for result in results)
        metrics["paragraph_docs_dropped"] = sum(result["paragraph_docs_dropped"] for result in results)
        expected -= metrics["paragraph_docs_dropped"]
    if kept != expected:
        raise DataIntegrityError(f"{ctx.input_path('clean') / DOCS}: the filter kept {kept} documents, not {expected}")
    _timed(ctx, "filter", began, "kept %d of %d documents", kept, docs_in)
    return {"docs_in": docs_in, "kept": kept, **metrics}


STAGE = Stage(
    name="dedup",
    module=__name__,
    config=DedupConfig,
    build=build,
    inputs=("clean",),
    libraries=("numpy", "pyarrow", "python"),
)
dedup_task = stage_task(STAGE)
