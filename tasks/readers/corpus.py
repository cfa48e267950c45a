"""A download's files -> a version's document shards, one cached Prefect task run per unit.

The coordinator reads each downloaded file once, in order (tasks/readers/units.py), and hands each unit
to `map_shards` as it is found: a job whose key is the unit's sha256 and what names it (its container, its
shards' prefix, its file's name), so that a unit's shards depend only on the unit. The jobs are drawn as
map_shards' window allows, so the spooled bytes waiting stay bounded. Each downloaded file is also cached
as a listing of its units (keyed by the file's sha256 from the download manifest): when every unit of a
file is in the cache, the file is not read at all, so a nightly run whose source gained one archive reads
and parses only that one. The units' results are merged in unit order, so the metrics do not depend on
which units came from the cache, nor on the worker count.

Names. A unit's shards are `docs/<file prefix>-<unit index in its file, 5 digits>-<part, 3 digits>.parquet`,
the prefix being the file's stem (its name where two files share a stem); files are read in the order of
their prefixes, so the shards' sorted names are the corpus's order. A doc_id is `<container>/<key>`: the
container is the file's stem for its own documents and an inner archive's stem for its documents, made
unique over the corpus in file order (`data`, `data~2`: only a unit whose stem repeats an earlier one's has
a suffix, and then it is that unit's key that changes); keys are unique within their container (the
coordinator sees a file's own documents in order, a unit its members); documents of a tar nested in an
inner archive have keys under the nested tar's stem.

`max_docs` keeps units in corpus order until the cap is reached: the unit that reaches it keeps its first
documents only (its last shard kept is rewritten short), the later ones are left out, and no file after it
is read. Their counts are left out of the metrics too.
"""

import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from storage.errors import DataIntegrityError
from tasks.readers.shards import Document, ShardWriter
from tasks.readers.streams import BOMB_REASONS, DEFAULT_MAX_ARCHIVE_BYTES, DEFAULT_MAX_EXPANSION_RATIO
from tasks.readers.tar import unique
from tasks.readers.units import DOCS, DownloadReader, Spooled, extract_unit, file_stem, merge_notes, new_notes
from tasks.shardmap import ShardJob, ShardScope, cached_result, map_shards, worker_pool
from tasks.shards import read_batches

UNITS_STEP = "units"
FILES_STEP = "files"
# How many quarantined archives the metrics list (all are counted).
MAX_LISTED_QUARANTINED = 1000
# An OpenWebText document is ~5 KB (38 GB of text in ~8M documents); Gopher's longest kept document,
# 100,000 words, is ~600 KB. Far above both, and small enough that one member can never exhaust memory.
DEFAULT_MAX_DOC_BYTES = 8 << 20


@dataclass(frozen=True)
class ReadOptions:
    """Everything a unit's shards depend on besides its bytes and names: the cache key of every unit."""

    shard_docs: int = 10_000
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
    max_expansion_ratio: float = DEFAULT_MAX_EXPANSION_RATIO


@dataclass
class CorpusSummary:
    """What the version holds, merged in unit order."""

    docs: int = 0
    shards: int = 0
    bytes: int = 0
    invalid_utf8_docs: int = 0
    quarantined_archives: int = 0
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=new_notes)  # member counts (units.new_notes)
    max_docs_reached: bool = False
    units: int = 0
    cached_files: int = 0


def quarantine_message(entry: dict[str, Any]) -> str:
    """One line for a quarantined inner archive: where it is, and what is wrong with it."""
    what = "refused as a decompression bomb" if entry["reason"] in BOMB_REASONS else "truncated or corrupt archive"
    return f"{entry['archive']}: {entry['member']}: {what} ({entry['detail']})"


def file_listing(out: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A downloaded file's listing (its counts and units, in order), cached on the file's sha256."""
    return {"entries": entries}


@dataclass
class _File:
    path: Path
    sha256: str
    prefix: str
    container: str = ""
    entries: list[tuple[Any, ...]] = field(default_factory=list)  # ("notes", counts) | ("unit", job index, unit)
    listing: list[dict[str, Any]] = field(default_factory=list)  # what the file-level cache keeps
    complete: bool = False  # read to its end, or taken whole from the cache
    cached: bool = False
    fault: DataIntegrityError | None = None

    @property
    def name(self) -> str:
        return self.path.name


def _prefixes(names: list[str]) -> dict[str, str]:
    """Each file's shard prefix: its stem, or its whole name where files share a stem."""
    stems = {name: file_stem(name) for name in names}
    shared = {stem for stem in stems.values() if list(stems.values()).count(stem) > 1}
    return {name: name if stem in shared else stem for name, stem in stems.items()}


class _Coordinator:
    def __init__(
        self,
        files: Mapping[Path, str],
        options: ReadOptions,
        scope: ShardScope,
        dest: Path,
        spool_dir: Path,
        download_version: str | None,
    ) -> None:
        prefixes = _prefixes([path.name for path in files])
        ordered = sorted(files, key=lambda path: (prefixes[path.name] + "-", path.name))
        self.files = [_File(path, files[path], prefixes[path.name]) for path in ordered]
        self.options = asdict(options)
        self.scope = scope
        self.dest = dest
        self.spool_dir = spool_dir
        self.download_version = download_version
        self.read: list[_File] = []  # the files reached, in order
        self.used: set[str] = set()  # container names taken, in corpus order
        self.count = 0  # jobs made

    def file_key(self, f: _File) -> dict[str, Any]:
        return {"sha256": f.sha256, "name": f.name}

    def _unit(self, f: _File, entry: dict[str, Any], index: int, used: set[str]) -> dict[str, Any]:
        container = unique(entry["stem"], used) if entry["kind"] == "archive" else f.container
        prefix = f"{f.prefix}-{index:05d}"
        return {
            "kind": entry["kind"],
            "source": f.name,
            "member": entry["member"],
            "container": container,
            "prefix": prefix,
            "bytes": entry["bytes"],
        }

    def _job(self, f: _File, unit: dict[str, Any], sha256: str, spool: Path | None) -> ShardJob:
        f.entries.append(("unit", self.count, unit))
        self.count += 1
        return ShardJob(
            name=unit["prefix"],
            args=(str(spool) if spool is not None else "", unit, self.options),
            key={"sha256": sha256, **unit},
            dest=self.dest,
            spool=spool,
        )

    def jobs(self) -> Iterator[ShardJob]:
        for f in self.files:
            self.read.append(f)
            if (cached := self._from_cache(f)) is not None:
                yield from cached
                continue
            f.container = unique(file_stem(f.name), self.used)
            walk = DownloadReader(f.path, self.options, self.spool_dir, self.download_version).read()
            index = 0
            try:
                for found in walk:
                    if isinstance(found, Spooled):
                        f.listing.append({"unit": found.entry})
                        unit = self._unit(f, found.entry, index, self.used)
                        index += 1
                        yield self._job(f, unit, found.entry["sha256"], found.spool)
                    else:
                        f.listing.append({"notes": found})
                        f.entries.append(("notes", found))
            except DataIntegrityError as exc:
                f.fault = exc  # raised in corpus order by `assemble`, after what came before it
                return
            finally:
                walk.close()
            f.complete = True

    def _from_cache(self, f: _File) -> list[ShardJob] | None:
        """The jobs of a file whose listing and every unit are in the cache (they run from it); else None."""
        listing = cached_result(self.scope, FILES_STEP, file_listing, self.file_key(f))
        if listing is None:
            return None
        used = set(self.used)
        container = unique(file_stem(f.name), used)
        units = []
        saved, f.container = f.container, container
        for entry in listing["entries"]:
            if "unit" in entry:
                unit = self._unit(f, entry["unit"], len(units), used)
                if (
                    cached_result(self.scope, UNITS_STEP, extract_unit, {"sha256": entry["unit"]["sha256"], **unit})
                    is None
                ):
                    f.container = saved
                    return None
                units.append((unit, entry["unit"]["sha256"]))
        self.used = used
        jobs = []
        pending = iter(units)
        for entry in listing["entries"]:
            if "unit" in entry:
                unit, sha256 = next(pending)
                jobs.append(self._job(f, unit, sha256, None))
            else:
                f.entries.append(("notes", entry["notes"]))
        f.listing, f.complete, f.cached = listing["entries"], True, True
        return jobs

    def listing_jobs(self) -> list[ShardJob]:
        """Result-only jobs that cache the listing of each file read to its end."""
        return [
            ShardJob(name=f.name, args=(f.listing,), key=self.file_key(f))
            for f in self.read
            if f.complete and not f.cached
        ]

    def assemble(self, results: list[dict[str, Any]], max_docs: int | None, strict: bool, log: Any) -> CorpusSummary:
        """Merge the units' results in corpus order, raising the first failure in that order."""
        summary = CorpusSummary()
        kept: set[str] = set()
        for f in self.read:
            found, quarantined_before = 0, summary.quarantined_archives
            summary.cached_files += f.cached
            for entry in f.entries:
                if entry[0] == "notes":
                    self._oversized(f, merge_notes(summary.notes, entry[1]), log)
                    continue
                _, index, unit = entry
                result = results[index]
                self._oversized(f, merge_notes(summary.notes, result["notes"]), log)
                summary.units += 1
                if (quarantine := result["quarantine"]) is not None:
                    if strict:
                        raise DataIntegrityError(quarantine_message(quarantine))
                    summary.quarantined_archives += 1
                    if len(summary.quarantined) < MAX_LISTED_QUARANTINED:
                        summary.quarantined.append(quarantine)
                    log.warning(
                        "%s [%s]; quarantined, its documents left out",
                        quarantine_message(quarantine),
                        quarantine["reason"],
                    )
                    continue
                docs, parts, n_bytes, invalid = result["docs"], result["parts"], result["bytes"], len(result["invalid"])
                if max_docs is not None and summary.docs + docs >= max_docs:
                    docs = max_docs - summary.docs
                    parts, n_bytes, invalid = self._cut(result, docs)
                    summary.max_docs_reached = True
                kept.update(parts)
                summary.docs += docs
                summary.shards += len(parts)
                summary.bytes += n_bytes
                summary.invalid_utf8_docs += invalid
                found += docs
                if summary.max_docs_reached:
                    break
            log.info("%s: %d documents%s", f.name, found, " (all its units cached)" if f.cached else "")
            if summary.max_docs_reached:
                log.info("stopped at max_docs=%d", max_docs)
                break
            if f.fault is not None:
                raise f.fault
            if found == 0 and summary.quarantined_archives == quarantined_before:
                raise DataIntegrityError(f"{f.name}: the archive holds no documents")
        for result in results:  # the shards of units past max_docs were placed too
            for part in result["parts"]:
                if part not in kept:
                    (self.dest / DOCS / part).unlink(missing_ok=True)
        return summary

    @staticmethod
    def _oversized(f: _File, names: list[str], log: Any) -> None:
        for name in names:
            log.warning("%s: %s: skipped, larger than max_doc_bytes", f.name, name)

    def _cut(self, result: dict[str, Any], docs: int) -> tuple[list[str], int, int]:
        """Keep the first `docs` documents of a unit: its shards past them are left out, and the shard they
        end in is rewritten short. Returns the shards kept, their bytes of text, their invalid UTF-8 count."""
        whole, rest = divmod(docs, self.options["shard_docs"])
        parts = result["parts"][: whole + (1 if rest else 0)]
        if rest:
            self._shorten(self.dest / DOCS / parts[-1], rest)
        n_bytes = sum(
            sum(pq.read_table(self.dest / DOCS / part, columns=["n_bytes"]).column(0).to_pylist()) for part in parts
        )
        return parts, n_bytes, sum(1 for position in result["invalid"] if position < docs)

    def _shorten(self, path: Path, rows: int) -> None:
        """Replace `path` (a link into the cache: never written through) by a shard of its first `rows` rows."""
        short = f".{path.name}.short"
        writer = ShardWriter(path.parent, self.options["shard_docs"], name=lambda part: short)
        left = rows
        batches = read_batches(path)
        try:
            for batch in batches:
                for row in batch.slice(0, left).to_pylist():
                    writer.add(
                        Document(row["doc_id"], row["text"], row["source"], row["member"], row["n_bytes"], False)
                    )
                left -= min(left, batch.num_rows)
                if not left:
                    break
        finally:
            batches.close()
        writer.close()
        os.replace(path.parent / short, path)


def extract_corpus(
    ctx: Any,
    files: Mapping[Path, str],
    options: ReadOptions,
    *,
    workers: int = 1,
    max_docs: int | None = None,
    strict: bool = False,
    log: Any,
) -> CorpusSummary:
    """Extract the downloaded `files` ({path: its sha256 from the download manifest}) of a stage's build
    (`ctx`: its StageContext) into ctx.out/docs, as the module's docstring says; returns what it holds.
    Damage in a downloaded file, and with `strict` the first quarantined unit, raise DataIntegrityError."""
    fingerprint = {**ctx.fingerprint, "params": asdict(options)}
    scope = ShardScope(ctx.stage, ctx.store.root, fingerprint, ctx.work / "shards")
    coordinator = _Coordinator(files, options, scope, ctx.out, ctx.work / "spool", ctx.inputs.get("download"))
    jobs = coordinator.jobs()
    with worker_pool(workers, workers) as pool:
        if max_docs is None:
            results = map_shards(scope, UNITS_STEP, extract_unit, jobs, workers, pool)
        else:  # a window of units at a time, until they hold max_docs: a quick run reads no more than that
            results, window = [], max(2 * workers, 8)
            while batch := map_shards(scope, UNITS_STEP, extract_unit, itertools.islice(jobs, window), workers, pool):
                results += batch
                if sum(result["docs"] for result in results) >= max_docs:
                    break
            jobs.close()
    map_shards(scope, FILES_STEP, file_listing, coordinator.listing_jobs(), 1)
    return coordinator.assemble(results, max_docs, strict, log)
