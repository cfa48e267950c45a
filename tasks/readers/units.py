"""Units of extract's work, and the reading of a downloaded file into them.

A unit is either an inner archive (a member of the download that is itself an archive: OpenWebText's
`urlsf_subsetNN-M_data.xz`), spooled as its compressed bytes, or a run of the download's own documents
(members of a plain tar of .txt, or the documents of a .jsonl, Parquet, WET ... file), spooled as records.
`read_download` reads a downloaded file once, in order, and yields what it finds: counts of the members
the metrics note, and units with their spool file and its sha256. `extract_unit` turns one unit into
Parquet shards; what it writes depends only on the unit's spool and its description, so a unit's shards
can be cached on those.

An inner archive is the unit of quarantine: when anything in it is damaged or it passes its budget, the
shards written so far are removed and the result says why; the rest of the corpus proceeds. Damage in the
downloaded file itself is never quarantined: `read_download` raises DataIntegrityError naming the file,
its download version and `gptflow run --force download`.
"""

import hashlib
import json
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from storage.errors import DataIntegrityError
from tasks.readers.shards import Document, ShardWriter
from tasks.readers.streams import (
    ARCHIVE_SUFFIXES,
    BLOCK,
    BOMB_REASONS,
    Budget,
    Damage,
    Decoded,
    Peekable,
    archive_suffix,
    compression_of,
    is_tar,
)
from tasks.readers.tar import (
    MAX_NESTING,
    Archive,
    Doc,
    Note,
    archive_stem,
    as_damage,
    decode_text,
    member_key,
    unique,
    walk_tar,
)

try:  # document files (.jsonl, Parquet, WET ...): read where their reader is installed
    from tasks.readers import documents
except ModuleNotFoundError as missing:
    if missing.name != "tasks.readers.documents":
        raise
    documents = None  # type: ignore[assignment]

DOCS = "docs"
FORCE_DOWNLOAD = "gptflow run --force download"
# The first bytes of a downloaded file that format detection looks at: a Parquet footer aside, every
# format tells itself in its first line or record.
HEAD_BYTES = 64 << 10
# A run of the download's own documents becomes a unit at shard_docs documents or at this many bytes,
# whichever comes first, so that a spooled unit stays bounded on disk whatever the documents' size (map_shards
# keeps a few units in flight). 10,000 OpenWebText documents are ~50 MB: for them the count decides.
LOOSE_UNIT_BYTES = 128 << 20
# How many hostile or oversized member names the metrics list (all are counted).
MAX_LISTED_NAMES = 20
_COPY_CHUNK = 1 << 20
# Suffixes of document files, taken off with the archives' to name a download's shards and doc_ids.
_DOCUMENT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".warc", ".wet")
_NOTE_COUNTS = {
    "inner_archive": "inner_archives",
    "non_file": "non_file_members",
    "empty": "empty_members",
    "unsafe": "unsafe_members",
    "oversized": "oversized_members",
}
_NOTE_NAMES = {"unsafe": "unsafe_member_names", "oversized": "oversized_member_names"}


# -- counts ----------------------------------------------------------------------------------------------


def new_notes() -> dict[str, Any]:
    """Counts of the members the metrics note, with the first few hostile and oversized names, and of the
    records of document files that held no document, by reason."""
    counts = {field: 0 for field in _NOTE_COUNTS.values()}
    return {**counts, **{field: [] for field in _NOTE_NAMES.values()}, "skipped_records": {}}


def add_note(notes: dict[str, Any], kind: str, name: str) -> None:
    notes[_NOTE_COUNTS[kind]] += 1
    if kind in _NOTE_NAMES and len(notes[_NOTE_NAMES[kind]]) < MAX_LISTED_NAMES:
        notes[_NOTE_NAMES[kind]].append(name)


def merge_notes(into: dict[str, Any], more: dict[str, Any]) -> list[str]:
    """Add `more` (later in the corpus) to `into`; returns the oversized names newly listed."""
    for field in _NOTE_COUNTS.values():
        into[field] += more[field]
    listed = len(into["oversized_member_names"])
    for field in _NOTE_NAMES.values():
        into[field] = (into[field] + more[field])[:MAX_LISTED_NAMES]
    for reason, count in more["skipped_records"].items():
        into["skipped_records"][reason] = into["skipped_records"].get(reason, 0) + count
    return into["oversized_member_names"][listed:]


def has_notes(notes: dict[str, Any]) -> bool:
    return any(notes[field] for field in _NOTE_COUNTS.values()) or bool(notes["skipped_records"])


# -- spools ----------------------------------------------------------------------------------------------


class _Hashing:
    """A spool file being written, hashed (sha256) as it is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed by finish or discard)
        self._hash = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    def finish(self) -> str:
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Record(NamedTuple):
    """A document of a records spool. `invalid_utf8` None: `payload` is the raw bytes, decoded by the unit;
    otherwise the text already decoded (its UTF-8), with its flag and size as its reader gave them."""

    key: str  # its doc_id within its container, made unique in the file by the reader
    member: str
    source: str
    payload: bytes
    invalid_utf8: bool | None = None
    n_bytes: int | None = None


class _Records:
    """A records spool being written: per document a JSON header line, then the payload's bytes."""

    def __init__(self, path: Path) -> None:
        self.spool = _Hashing(path)
        self.docs = 0

    def add(self, record: Record) -> None:
        header = [record.key, record.member, record.source, record.invalid_utf8, record.n_bytes, len(record.payload)]
        self.spool.write(json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n")
        self.spool.write(record.payload)
        self.docs += 1


def _read_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as spool:
        while line := spool.readline():
            key, member, source, invalid, n_bytes, size = json.loads(line)
            yield Record(key, member, source, spool.read(size), invalid, n_bytes)


# -- one unit -> shards ----------------------------------------------------------------------------------


def extract_unit(out: str, spool: str, unit: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Write the shards of one unit into `out`/docs as `<unit["prefix"]>-000.parquet`, ... (shard_docs rows
    each); return what it holds: docs, bytes, the positions of its documents that were not valid UTF-8,
    its shards' names, the member counts (`notes`), and `quarantine` (None, or the metrics' entry)."""
    if not spool:
        raise DataIntegrityError(
            f"{unit['source']}: unit {unit['prefix']} was taken for cached, but its cache entry is gone from the "
            "store (removed while this run read it?): run the stage again"
        )
    prefix = unit["prefix"]
    writer = ShardWriter(Path(out) / DOCS, options["shard_docs"], name=lambda part: f"{prefix}-{part:03d}.parquet")
    found = _Found(writer, unit, options["max_doc_bytes"])
    if unit["kind"] == "records":
        for record in _read_records(Path(spool)):
            found.add(record.key, record.member, record.source, record.payload, record.invalid_utf8, record.n_bytes)
        return found.result(None)
    budget = Budget(unit["bytes"], options["max_expansion_ratio"], options["max_archive_bytes"])
    try:
        with open(spool, "rb") as raw:
            found.walk(Peekable(raw), unit["member"], 1, "", budget)
    except (Damage, tarfile.TarError) as exc:
        writer.discard()
        damage = as_damage(exc)
        entry = {"archive": unit["source"], "member": unit["member"], "reason": damage.reason, "detail": damage.detail}
        return _Found(writer, unit, 0).result({**entry, "bytes": unit["bytes"]})
    return found.result(None)


class _Found:
    """What one unit holds, as its documents are written."""

    def __init__(self, writer: ShardWriter, unit: dict[str, Any], max_doc_bytes: int) -> None:
        self.writer = writer
        self.unit = unit
        self.max_doc_bytes = max_doc_bytes
        self.notes = new_notes()
        self.keys: set[str] = set()
        self.docs = self.bytes = 0
        self.invalid: list[int] = []

    def add(
        self, key: str, member: str, source: str, payload: bytes, invalid: bool | None, n_bytes: int | None
    ) -> None:
        if invalid is None:
            text, invalid = decode_text(payload)
            n_bytes = len(text.encode("utf-8")) if invalid else len(payload)
        else:
            text = payload.decode("utf-8")
        doc_id = f"{self.unit['container']}/{key}"
        self.writer.add(Document(doc_id, text, source, member, n_bytes, invalid))
        if invalid:
            self.invalid.append(self.docs)
        self.docs += 1
        self.bytes += n_bytes

    def walk(self, stream: Peekable, name: str, depth: int, within: str, budget: Budget) -> None:
        """The members of the archive `name` (`depth` 1: the unit; deeper: nested in it, its documents'
        doc_ids then under `within`, its stem's path), sharing the unit's budget."""
        for item in walk_tar(stream, name, budget, self.max_doc_bytes):
            if isinstance(item, Note):
                add_note(self.notes, item.kind, item.name)
            elif isinstance(item, Doc):
                key = unique(within + member_key(item.name), self.keys)
                self.add(key, item.name, self.unit["source"], item.data, None, None)
            elif isinstance(item, Archive):
                add_note(self.notes, "inner_archive", item.name)
                try:
                    if depth + 1 > MAX_NESTING:
                        raise Damage("too_deep", f"nests archives more than {MAX_NESTING} deep")
                    self.walk(item.body, item.name, depth + 1, f"{within}{archive_stem(item.name)}/", budget)
                except (Damage, tarfile.TarError) as exc:
                    raise as_damage(exc).inside(item.name) from exc

    def result(self, quarantine: dict[str, Any] | None) -> dict[str, Any]:
        self.writer.close()
        return {
            "docs": self.docs,
            "bytes": self.bytes,
            "invalid": self.invalid,
            "parts": [path.name for path in self.writer.paths],
            "notes": self.notes,
            "quarantine": quarantine,
        }


# -- a downloaded file -> units --------------------------------------------------------------------------


class Spooled(NamedTuple):
    """A unit found in a download: its listing entry (kind, sha256, bytes; an inner archive's member name and
    stem) and the spool file that holds it."""

    entry: dict[str, Any]
    spool: Path


def file_stem(name: str) -> str:
    """A downloaded file's name without its archive and document suffixes: `openwebtext.tar.xz` ->
    `openwebtext`, `c4-00000.jsonl.gz` -> `c4-00000`."""
    stem = name
    while cut := next(
        (s for s in (*ARCHIVE_SUFFIXES, *_DOCUMENT_SUFFIXES) if stem.lower().endswith(s) and len(stem) > len(s)), None
    ):
        stem = stem[: len(stem) - len(cut)]
    return stem


class DownloadReader:
    """Reads one downloaded file, once, in order (see `read`)."""

    def __init__(
        self, path: Path, options: dict[str, Any], spool_dir: Path, download_version: str | None = None
    ) -> None:
        self.path = path
        self.name = path.name
        self.options = options
        self.spool_dir = spool_dir
        self.download_version = download_version

    def failure(self, what: str, fix: str = f"fetch it again with `{FORCE_DOWNLOAD}`") -> str:
        """The one line that fails the stage for the download itself: what is wrong, where it came from, and
        what to do (the download stage fetches its version again in place)."""
        came_from = f"; it came from download version {self.download_version}" if self.download_version else ""
        return f"{self.name}: {what}{came_from}: {fix}"

    def read(self) -> Iterator[dict[str, Any] | Spooled]:
        """The file's counts (dicts of `new_notes`' shape, each for the members since the last unit) and units,
        in file order; a spool not yet handed on is removed when the walk is closed."""
        size = self.path.stat().st_size
        if size == 0:
            raise DataIntegrityError(self.failure("empty file, not an archive"))
        with open(self.path, "rb") as raw:
            stream = Peekable(raw)
            head = stream.peek(HEAD_BYTES)
            fmt = self._document_format(head)
            if fmt is not None:
                yield from self._documents(fmt)
                return
            if compression_of(head) is None and not is_tar(head):
                what = f"unknown archive format (first bytes {head[:8].hex()}); expected xz, gzip, bzip2, zstd or tar"
                raise DataIntegrityError(self.failure(what))
            try:
                yield from self._archive(stream, Budget(size, self.options["max_expansion_ratio"], None))
            except (Damage, tarfile.TarError) as exc:
                damage = as_damage(exc)
                if damage.reason in BOMB_REASONS:
                    message = self.failure(
                        f"refused as a decompression bomb ({damage.detail})",
                        "raise extract.max_expansion_ratio if it is genuine",
                    )
                else:
                    message = self.failure(f"truncated or corrupt archive ({damage.detail})")
                raise DataIntegrityError(message) from exc

    def _document_format(self, head: bytes) -> str | None:
        """The document format of a file that is no archive (None: read it as one). A file named like a tar,
        named like a compressed file but not one, or a compressed stream holding a tar is read as an archive,
        so that its damage is reported as such."""
        if documents is None or is_tar(head):
            return None
        kind = compression_of(head)
        if _says_tar(self.name) or (kind is None and archive_suffix(self.name) is not None):
            return None
        if kind is not None:
            try:
                with open(self.path, "rb") as raw, Decoded(kind, raw, Budget(1, 1.0, None)) as inner:
                    if is_tar(Peekable(inner).peek(BLOCK)):
                        return None
            except Damage:
                return None
        return documents.detect_document_format(head, self.name)

    def _new_spool(self) -> Path:
        return self.spool_dir / f"{uuid.uuid4().hex}.spool"

    def _archive(self, stream: Peekable, budget: Budget) -> Iterator[dict[str, Any] | Spooled]:
        notes = new_notes()
        loose = Loose(self, self.options["shard_docs"])
        try:
            for item in walk_tar(stream, self.name, budget, self.options["max_doc_bytes"]):
                if isinstance(item, Note):
                    add_note(notes, item.kind, item.name)
                elif isinstance(item, Doc):
                    yield from loose.add(Record(member_key(item.name), item.name, self.name, item.data))
                elif isinstance(item, Archive):
                    add_note(notes, "inner_archive", item.name)
                    yield from loose.flush()
                    yield notes
                    notes = new_notes()
                    yield self._spool_archive(item)
            yield from loose.flush()
            if has_notes(notes):
                yield notes
        finally:
            loose.discard()

    def _spool_archive(self, item: Archive) -> Spooled:
        spool = _Hashing(self._new_spool())
        try:
            while chunk := item.body.read(_COPY_CHUNK):
                spool.write(chunk)
            digest = spool.finish()
        except BaseException:
            spool.discard()
            raise
        entry = {"kind": "archive", "member": item.name, "stem": archive_stem(item.name), "bytes": spool.bytes}
        return Spooled({**entry, "sha256": digest}, spool.path)

    def _documents(self, fmt: str) -> Iterator[dict[str, Any] | Spooled]:
        loose = Loose(self, self.options["shard_docs"])
        skipped: Counter[str] = Counter()
        try:
            for doc in documents.iter_file_documents(self.path, fmt, self.options["max_doc_bytes"], skipped):
                payload = doc.text.encode("utf-8")
                yield from loose.add(Record(doc.key, doc.key, doc.source, payload, doc.invalid_utf8, doc.n_bytes))
            yield from loose.flush()
        finally:
            loose.discard()
        notes = new_notes()
        notes["oversized_members"] = skipped.pop("too_large", 0)
        notes["skipped_records"] = dict(sorted(skipped.items()))
        if has_notes(notes):
            yield notes


def _says_tar(name: str) -> bool:
    """Whether `name` says tar (`.tar`, `.tgz`, `.txz`, `.tar.<compression>`), not only a compression."""
    lower = name.lower()
    return lower.endswith((".tar", ".tgz", ".txz")) or any(lower.endswith(".tar" + s) for s in ARCHIVE_SUFFIXES)


class Loose:
    """The download's own documents, spooled as records into units of up to `shard_docs` documents (or
    LOOSE_UNIT_BYTES); their keys are made unique across the file here, where the file is seen in order."""

    def __init__(self, reader: DownloadReader, shard_docs: int) -> None:
        self.reader = reader
        self.shard_docs = shard_docs
        self.keys: set[str] = set()
        self.records: _Records | None = None

    def add(self, record: Record) -> Iterator[Spooled]:
        if self.records is None:
            self.records = _Records(self.reader._new_spool())
        self.records.add(record._replace(key=unique(record.key, self.keys)))
        if self.records.docs >= self.shard_docs or self.records.spool.bytes >= LOOSE_UNIT_BYTES:
            yield from self.flush()

    def flush(self) -> Iterator[Spooled]:
        if self.records is None:
            return
        records, self.records = self.records, None
        digest = records.spool.finish()
        entry = {"kind": "records", "member": "", "bytes": records.spool.bytes, "sha256": digest}
        yield Spooled(entry, records.spool.path)

    def discard(self) -> None:
        if self.records is not None:
            self.records.spool.discard()
            self.records = None
