"""Stage `extract`: the downloaded archives -> documents in Parquet shards.

Reads the real OpenWebText layout and its simpler relatives:

    openwebtext.tar.xz  or  urlsf_subsetNN.tar      (outer tar, compressed or plain: the download)
      openwebtext/urlsf_subsetNN-M_data.xz           (inner archive: a compressed tar)
        NNNNNNN-<md5>.txt                            (one document per regular-file member)

an inner `*_data.xz` given directly, a plain tar of .txt files, and document files (.txt, .jsonl, Parquet
with a `text` column, WET/WARC; compressed or not: tasks/readers/documents.py). Compression: xz, gzip,
bzip2, zstd, told by magic bytes; a member is read as an archive when it starts like one or is named like
one, and is then an archive or corrupt, never a document (tasks/readers/streams.py).

The work is cut into units, each one Prefect task run cached on its own content (tasks/readers/corpus.py):
an inner archive, or up to `shard_docs` of a downloaded file's own documents. The download is read once, in
order, and each unit's bytes spooled to scratch and parsed on its own, in `workers` processes; a file whose
units are all cached is not read at all, so a nightly run whose source gained one archive parses that one.
A unit's shards and doc_ids depend only on the unit, so a version built from cached units is byte-identical
to one built from scratch, and the output does not depend on `workers`.

Damage. An inner archive must decompress to a tar, read to its end intact; otherwise it is quarantined:
left out with all of its documents (nested archives included), listed under `quarantined` in the metrics
with a reason (truncated, corrupt_stream, not_a_tar, corrupt_tar, too_large, expansion_ratio, too_deep),
and the rest of the corpus proceeds. Past `max_corrupt_fraction` of the inner archives seen the stage fails,
and with `strict` it fails on the first. Damage in the downloaded file itself is never quarantined: the stage
fails naming it, its download version and `gptflow run --force download`. Decompression bombs: an inner
archive may expand to `max_archive_bytes` and `max_expansion_ratio` times its own size, the download to that
ratio; reading stops at the first read past either.

Memory is bounded by bytes. Everything streams (tar "r|" mode over nested decompressors), members are never
written to disk as files (a hostile name such as `../../etc/passwd` is only data), a member larger than
`max_doc_bytes` is skipped unread, and Parquet row groups close at 16 MiB of text or 1024 rows. A unit writes
its shards as it parses and removes them when it turns out damaged, so nothing of it waits in memory.

Output: `docs/<download stem>-<unit, 5 digits>-<part, 3 digits>.parquet` (zstd), sorted in corpus order, with
columns doc_id, text, source, member, n_bytes; doc_ids are `<inner archive or download stem>/<member>`.
"""

from typing import Any, ClassVar

from pydantic import Field

from storage.errors import DataIntegrityError
from tasks.download import ARCHIVES
from tasks.readers import ReadOptions, extract_corpus, quarantine_message
from tasks.readers.corpus import DEFAULT_MAX_DOC_BYTES
from tasks.readers.streams import DEFAULT_MAX_ARCHIVE_BYTES, DEFAULT_MAX_EXPANSION_RATIO
from tasks.readers.units import FORCE_DOWNLOAD
from tasks.stage import Stage, StageConfig, StageContext, stage_task


class ExtractConfig(StageConfig):
    """How documents are cut into shards, what to do with damaged archives, bombs and huge members, and how
    many processes parse inner archives."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"workers"})

    shard_docs: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Documents per Parquet shard: ~50 MB of OpenWebText text (~5 KB a document), a unit of "
        "work that the later stages process one at a time in parallel. Memory does not depend on it.",
    )
    max_docs: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many documents, the first in corpus order (quick runs): no file past them is "
        "read; none reads every archive to the end.",
    )
    max_corrupt_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Fail the stage when more than this share of the inner archives seen were quarantined "
        "(corrupt, or refused as bombs). 0.01: a sound OpenWebText download has none, and 1% of its ~20,600 "
        "inner archives is already ~80,000 documents, so a broken download never quietly becomes a small corpus.",
    )
    strict: bool = Field(
        default=False,
        description="Fail on the first corrupt or refused inner archive instead of quarantining it.",
    )
    max_doc_bytes: int = Field(
        default=DEFAULT_MAX_DOC_BYTES,
        ge=1,
        le=1 << 30,
        description="Skip, unread, a member larger than this many bytes (counted as oversized_members). 8 MiB: "
        "an OpenWebText document is ~5 KB and Gopher's longest kept one ~600 KB, so only a broken or hostile "
        "member is this large, and it cannot exhaust memory.",
    )
    max_archive_bytes: int = Field(
        default=DEFAULT_MAX_ARCHIVE_BYTES,
        ge=1 << 20,
        description="Quarantine (too_large) an inner archive that decompresses to more than this many bytes, "
        "nested archives included, and stop reading it there. 1 GiB: an OpenWebText inner archive is ~0.6 MB "
        "compressed and a few MB decompressed.",
    )
    max_expansion_ratio: float = Field(
        default=DEFAULT_MAX_EXPANSION_RATIO,
        ge=1.0,
        description="Quarantine (expansion_ratio) an inner archive that decompresses to more than this many "
        "times its own size, and fail on a download that does; judged past the first 16 MiB only. 200: xz "
        "packs text ~3-10x (OpenWebText: 38 GB in 12 GB), while zeros pack 1,000x and more.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Processes parsing units (inner archives, runs of a file's own documents) at once; 1 "
        "parses them in the stage's process. The download is still read once, in order, by the stage's "
        "process, and each unit's shards depend only on the unit: the output does not depend on it.",
    )


# -- the stage -------------------------------------------------------------------------------------------


def build(ctx: StageContext, cfg: ExtractConfig) -> dict[str, Any]:
    folder = ctx.input_path("download") / ARCHIVES
    archives = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not archives:
        raise DataIntegrityError(f"{folder}: no archives to extract")
    ctx.log.info("extracting %d archive(s) with %d worker(s)", len(archives), cfg.workers)
    download_version = ctx.inputs["download"]
    listed = ctx.input_manifest("download")["files"]
    files = {}
    for path in archives:
        entry = listed.get(f"{ARCHIVES}/{path.name}")
        if entry is None:
            raise DataIntegrityError(
                f"{path.name}: not in the manifest of download version {download_version}; "
                f"fetch it again with `{FORCE_DOWNLOAD}`"
            )
        files[path] = entry["sha256"]
    options = ReadOptions(
        shard_docs=cfg.shard_docs,
        max_doc_bytes=cfg.max_doc_bytes,
        max_archive_bytes=cfg.max_archive_bytes,
        max_expansion_ratio=cfg.max_expansion_ratio,
    )
    found = extract_corpus(
        ctx, files, options, workers=cfg.workers, max_docs=cfg.max_docs, strict=cfg.strict, log=ctx.log
    )
    notes = found.notes
    inner_archives = notes["inner_archives"]
    corrupt_fraction = found.quarantined_archives / inner_archives if inner_archives else 0.0
    if corrupt_fraction > cfg.max_corrupt_fraction:
        raise DataIntegrityError(
            f"{found.quarantined_archives} of {inner_archives} inner archives were corrupt or refused "
            f"({corrupt_fraction:.1%}, more than max_corrupt_fraction={cfg.max_corrupt_fraction:g}); the first: "
            f"{quarantine_message(found.quarantined[0])}; if the download {download_version} is damaged, "
            f"fetch it again with `{FORCE_DOWNLOAD}`"
        )
    if found.docs == 0:
        raise DataIntegrityError(f"{folder}: no documents in {', '.join(p.name for p in archives)}")
    if notes["oversized_members"]:
        ctx.log.warning("%d member(s) over max_doc_bytes=%d skipped", notes["oversized_members"], cfg.max_doc_bytes)
    ctx.log.info(
        "%d unit(s); %d of %d file(s) taken whole from the cache", found.units, found.cached_files, len(archives)
    )
    metrics = {
        "docs": found.docs,
        "shards": found.shards,
        "bytes": found.bytes,
        "archives": len(archives),
        "inner_archives": inner_archives,
        "invalid_utf8_docs": found.invalid_utf8_docs,
        "quarantined_archives": found.quarantined_archives,
        "corrupt_fraction": corrupt_fraction,
        "quarantined": found.quarantined,
        "empty_members": notes["empty_members"],
        "non_file_members": notes["non_file_members"],
        "unsafe_members": notes["unsafe_members"],
        "unsafe_member_names": notes["unsafe_member_names"],
        "oversized_members": notes["oversized_members"],
        "oversized_member_names": notes["oversized_member_names"],
        "max_docs_reached": found.max_docs_reached,
    }
    if notes["skipped_records"]:
        metrics["skipped_records"] = notes["skipped_records"]
    return metrics


STAGE = Stage(
    name="extract",
    module=__name__,
    config=ExtractConfig,
    build=build,
    inputs=("download",),
    libraries=("pyarrow", "zstandard", "python"),
)
extract_task = stage_task(STAGE)
