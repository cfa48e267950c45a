"""Stage `extract`: the downloaded archives -> documents in Parquet shards.

Reads the real OpenWebText layout and its simpler relatives, recognised by magic bytes, never by name:

    openwebtext.tar.xz  or  urlsf_subsetNN.tar      (outer tar, compressed or plain)
      openwebtext/urlsf_subsetNN-M_data.xz           (inner tar, compressed)
        NNNNNNN-<md5>.txt                            (one document per regular-file member)

an inner `*_data.xz` given directly, or a plain tar of .txt files. Compression: xz, gzip, bzip2, zstd.
A member is opened as an archive only when it is a tar, or decompresses to one: a text that merely starts
with a compression's magic bytes is a document. Damage any decompressor reports fails the stage (or, with
`skip_corrupt`, drops the archive) with one line naming the archive and member.
Everything streams (tar "r|" mode over nested decompressors), so no archive is ever held in memory whole
but a nested one of at most MAX_SHIPPED_ARCHIVE_BYTES, and members are never written to disk: a hostile
name such as `../../etc/passwd` is only data. A member larger than `max_doc_bytes` is skipped unread.

Decompressing and parsing the ~20,000 inner archives is the costly part, so with `workers` > 1 each inner
archive is read whole (they are small) and parsed in a worker process, while this process still reads the
download once, in order, and writes every shard. Parsing only describes what it finds (events); the events
are applied in archive order, whichever process made them, so the output is the same for any worker count.

Output: `docs/shard-00000.parquet`, ... (zstd) with columns doc_id, text, source, member, n_bytes.
"""

import bz2
import gzip
import io
import logging
import lzma
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from pydantic import Field

from storage.errors import DataIntegrityError
from tasks.download import ARCHIVES
from tasks.shards import process_pool
from tasks.stage import Stage, StageConfig, StageContext, stage_task

DOCS = "docs"
SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = re.compile(rb"BZh[1-9]")
_TAR_MAGIC_OFFSET = 257  # POSIX ustar (and GNU "ustar  ") headers carry "ustar" here
_BLOCK = tarfile.BLOCKSIZE
# outer tar -> inner tar is depth 1; a little slack for a tar of such outer tars, and no more: an archive
# nested deeper than this is far more likely a decompression bomb than a corpus.
MAX_NESTING = 3
# Rows per Parquet row group: a few MB of web text, so a reader can stream a shard in small pieces.
_ROW_GROUP_DOCS = 1024
# How many hostile or oversized member names the metrics list verbatim (all are counted).
_MAX_LISTED_NAMES = 20
# An OpenWebText document is ~5 KB (38 GB of text in ~8M documents); Gopher's longest kept document,
# 100,000 words, is ~600 KB. Far above both, and small enough that one member can never exhaust memory.
DEFAULT_MAX_DOC_BYTES = 8 << 20
# Nested archives of at most this size are read whole and parsed on their own (in a worker when there are
# workers): an OpenWebText `urlsf_subsetNN-M_data.xz` is ~0.6 MB (12 GB in ~20,600 of them). A bigger one
# is streamed by the stage's process instead, so that no more than this is read into memory per archive.
MAX_SHIPPED_ARCHIVE_BYTES = 32 << 20
# A worker sends back at most this much text per archive (an OpenWebText inner archive holds ~2 MB); past
# it (a decompression bomb, or a huge archive of small documents) the stage's process parses the archive
# itself, streaming, so that the results waiting in memory stay bounded.
MAX_SHIPPED_TEXT_CHARS = 64 << 20
_ARCHIVE_SUFFIXES = (".tar", ".xz", ".txz", ".tgz", ".gz", ".bz2", ".zst", ".zstd")
# How much of a member that starts like a compressed stream is read to see whether it holds a tar: bzip2
# emits nothing until its first block (900 kB at most, a little more when incompressible) is whole; xz,
# gzip and zstd (128 KiB blocks) emit sooner. Past it, the member is taken for a damaged archive.
_PROBE_BYTES = 2 << 20
# zstd input fed to the decompressor per step. Its densest block (RLE) turns 4 bytes into 128 KiB, so one
# step can emit at most ~4 MiB, whatever the stream: a bomb is read in bounded pieces.
_ZSTD_STEP = 128
# Errors the decompressors raise for damaged or truncated data (bz2 reports damage as a bare OSError).
_DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)


class ExtractConfig(StageConfig):
    """How documents are cut into shards, what to do with damaged archives and huge members, and how many
    processes parse inner archives."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"workers"})

    shard_docs: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Documents per Parquet shard: ~50 MB of OpenWebText text (~5 KB a document), a unit of "
        "work that the later stages process one at a time in parallel.",
    )
    max_docs: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many documents (quick runs); none reads every archive to the end.",
    )
    skip_corrupt: bool = Field(
        default=False,
        description="Skip a truncated or corrupt inner archive, listing it under `skipped` in the metrics, "
        "instead of failing the stage. Its documents are dropped whole.",
    )
    max_doc_bytes: int = Field(
        default=DEFAULT_MAX_DOC_BYTES,
        ge=1,
        le=1 << 30,
        description="Skip, unread, a member larger than this many bytes (counted as oversized_members). 8 MiB: "
        "an OpenWebText document is ~5 KB and Gopher's longest kept one ~600 KB, so only a broken or hostile "
        "member is this large, and it cannot exhaust memory.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Processes parsing inner archives at once (1 parses them in the stage's process). The "
        "download is still read once, in order, and the shards written by one process: the output does not "
        "depend on it.",
    )


# -- format detection ------------------------------------------------------------------------------------


class _Corrupt(Exception):
    """Damaged data: a stream that does not decompress, or does not hold what it should (a tar)."""


class _Rejected(_Corrupt):
    """Bytes a decompressor refuses outright, as opposed to a stream cut short (which is only `_Corrupt`):
    in a member that merely starts like a compressed stream, the sign of a text that is no archive."""


class _Peekable:
    """A read-only stream whose first bytes can be looked at without consuming them (for magic bytes), and
    bytes just read put back (a probed member's start)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._head = b""
        self._pos = 0  # bytes of `_head` already read: it can hold megabytes, so it is never re-sliced per read

    def peek(self, n: int) -> bytes:
        if len(self._head) - self._pos < n:
            parts = [self._head[self._pos :]]
            have = len(parts[0])
            while have < n:
                chunk = self._raw.read(n - have)
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self._head, self._pos = b"".join(parts), 0
        return self._head[self._pos : self._pos + n]

    def unread(self, data: bytes) -> None:
        """Put back `data`, just read from this stream, to be read again first."""
        self._head, self._pos = data + self._head[self._pos :], 0

    def read(self, n: int | None = -1) -> bytes:
        if self._pos == len(self._head):
            return self._raw.read(n)
        if n is None or n < 0:
            data = self._head[self._pos :] + self._raw.read()
        else:
            data = self._head[self._pos : self._pos + n]
        self._pos += len(data)
        if self._pos >= len(self._head):
            self._head, self._pos = b"", 0
        return data


class _Source:
    """The compressed stream under a decompressor. Remembers whether reading it failed, so that its errors
    are never taken for damage in the data; while probing, keeps the bytes it gave, up to `keep_up_to`,
    and then reports an end there."""

    def __init__(self, raw: Any, keep_up_to: int | None = None) -> None:
        self._raw = raw
        self.keep_up_to = keep_up_to
        self.kept = bytearray()
        self.failed = False

    def read(self, n: int | None = -1) -> bytes:
        if self.keep_up_to is not None:
            room = self.keep_up_to - len(self.kept)
            if room <= 0:
                return b""
            n = room if n is None or n < 0 else min(n, room)
        try:
            data = self._raw.read(n)
        except Exception:
            self.failed = True
            raise
        if self.keep_up_to is not None:
            self.kept += data
        return data


class _ZstdReader:
    """Streaming zstd that, unlike zstandard's stream_reader, reports a truncated frame (EOFError). Input is
    fed in _ZSTD_STEP pieces only while fewer than the bytes asked for are waiting, so what it holds stays
    within a read's size plus one step's output."""

    def __init__(self, raw: Any, chunk: int = 1 << 16) -> None:
        self._raw = raw
        self._chunk = chunk
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._input = memoryview(b"")
        self._carry = b""  # what followed a frame's end in the last piece: the start of the next frame
        self._out = bytearray()
        self._pos = 0  # bytes of `_out` already returned; dropped only when refilling, never re-sliced
        self._ended = False

    def __enter__(self) -> "_ZstdReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._out = bytearray()
        self._input = memoryview(b"")

    def _step(self) -> bool:
        """Decompress one piece of input into `_out`; False at the end of the input."""
        if self._carry:
            piece, self._carry = self._carry, b""
        else:
            if not self._input:
                data = self._raw.read(self._chunk)
                if not data:
                    if not self._frame.eof:
                        raise EOFError("zstd stream ended inside a frame")
                    return False
                self._input = memoryview(data)
            piece, self._input = self._input[:_ZSTD_STEP], self._input[_ZSTD_STEP:]
        if self._frame.eof:  # concatenated frames: start the next one
            self._frame = self._decompressor.decompressobj()
        self._out += self._frame.decompress(piece)
        if self._frame.eof:
            self._carry = self._frame.unused_data
        return True

    def read(self, n: int | None = -1) -> bytes:
        everything = n is None or n < 0
        if self._pos and (everything or len(self._out) - self._pos < n):
            del self._out[: self._pos]  # fewer than n bytes are left: a cheap move
            self._pos = 0
        while not self._ended and (everything or len(self._out) - self._pos < n):
            self._ended = not self._step()
        end = len(self._out) if everything else min(len(self._out), self._pos + n)
        with memoryview(self._out) as view:
            out = bytes(view[self._pos : end])
        self._pos = end
        return out


class _Decoded:
    """A decompressed stream whose damage, whatever the decompressor calls it, is raised as `_Corrupt`: a
    stream cut short as such, data the decompressor refuses as `_Rejected`. An error of the stream underneath
    passes unchanged."""

    def __init__(self, kind: str, source: _Source) -> None:
        self.kind = kind
        self._source = source
        self._file = _decompressor(kind, source)

    def __enter__(self) -> "_Decoded":
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)

    def read(self, n: int | None = -1) -> bytes:
        try:
            return self._file.read(n)
        except _DECOMPRESSION_ERRORS as exc:
            if self._source.failed:
                raise
            damage = _Corrupt if isinstance(exc, EOFError) else _Rejected
            raise damage(f"{self.kind} data: {type(exc).__name__}: {exc}") from exc


def compression_of(head: bytes) -> str | None:
    """ "xz", "gzip", "bzip2" or "zstd" from a stream's first bytes; None when it is not compressed."""
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if BZIP2_MAGIC.match(head):
        return "bzip2"
    return None


def is_tar(head: bytes) -> bool:
    """A ustar header whose checksum holds, or the all-zero block that ends (here: is all of) an empty tar.
    The checksum keeps a text that happens to read "ustar" at byte 257 from passing for an archive."""
    block = head[:_BLOCK]
    if len(block) == _BLOCK and not block.strip(b"\0"):
        return True
    if block[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] != b"ustar":
        return False
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _holds_tar(body: "_Peekable", kind: str) -> bool:
    """Whether a member that starts with `kind`'s magic bytes is a compressed tar. No when its first block
    is no tar header, or when the decompressor refuses the bytes: ordinary text may start like a compressed
    stream. Yes when the stream ends (or yields nothing in _PROBE_BYTES) first: an archive cut short, which
    parsing it then reports as the member's damage. Reads at most _PROBE_BYTES and puts them back, so that
    `body` is read from its start again."""
    source = _Source(body, keep_up_to=_PROBE_BYTES)
    try:
        with _Decoded(kind, source) as decoded:
            return is_tar(_Peekable(decoded).peek(_BLOCK))
    except _Corrupt as exc:
        if source.failed:  # the archive around the member is damaged, not the member
            raise
        return not isinstance(exc, _Rejected)
    finally:
        body.unread(bytes(source.kept))


def _decompressor(kind: str, stream: Any) -> Any:
    if kind == "xz":
        return lzma.LZMAFile(stream)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(stream)
    return _ZstdReader(stream)


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why a tar stream ended: tarfile treats a truncated or garbled header after the first
    member as a normal end of archive, which would drop the rest of a damaged archive silently."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            tar.bad_end = exc  # type: ignore[attr-defined]
            raise


# -- documents -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str
    member: str
    n_bytes: int
    invalid_utf8: bool


@dataclass
class ExtractStats:
    """Counts gathered while walking archives (documents themselves are counted when written)."""

    inner_archives: int = 0
    empty_members: int = 0
    non_file_members: int = 0
    unsafe_members: int = 0
    unsafe_member_names: list[str] = field(default_factory=list)
    oversized_members: int = 0
    oversized_member_names: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    containers: set[str] = field(default_factory=set)  # doc_id prefixes in use, kept unique


def _printable(name: str) -> str:
    """Tar names are decoded with surrogateescape; make invalid bytes U+FFFD so Parquet can hold them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def archive_stem(name: str) -> str:
    """`urlsf_subset00-1_data.xz` -> `urlsf_subset00-1_data`; `docs.tar.gz` -> `docs`."""
    stem = PurePosixPath(name).name
    while (lower := stem.lower()).endswith(_ARCHIVE_SUFFIXES):
        stem = stem[: len(stem) - len(next(s for s in _ARCHIVE_SUFFIXES if lower.endswith(s)))]
    return stem or "archive"


def _member_key(name: str) -> str:
    """A member's part of its doc_id: its path without `.`/`..`/empty parts and without `.txt`."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    key = "/".join(parts)
    if key.lower().endswith(".txt") and len(parts[-1]) > len(".txt"):
        key = key[: -len(".txt")]
    return key or "member"


def _is_unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 2
    while candidate in used:
        candidate, n = f"{key}~{n}", n + 1
    used.add(candidate)
    return candidate


def decode_text(data: bytes) -> tuple[str, bool]:
    """(text, False) for valid UTF-8; otherwise the text with U+FFFD for bad bytes, and True."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


# -- parsing: an archive stream -> events ----------------------------------------------------------------
# Parsing describes what it finds as a sequence of events and knows nothing of other archives, so a nested
# archive can be parsed in another process. One collector in the stage's process applies the events in the
# order the archive holds them: it names containers uniquely across the whole run, counts, and builds the
# documents. The output (doc_ids and metrics included) therefore does not depend on where parsing ran.


class _Open(NamedTuple):
    """A tar was opened; its documents' doc_ids start with a container name made unique from `stem`."""

    stem: str


class _Doc(NamedTuple):
    container: int  # which _Open of the same parse, counted from 0
    key: str  # the doc_id part after the container name, unique within the container
    text: str
    member: str
    n_bytes: int
    invalid_utf8: bool


class _Note(NamedTuple):
    """A member the metrics count: `kind` is inner_archive, non_file, unsafe, empty or oversized."""

    kind: str
    name: str


class _Skip(NamedTuple):
    """A damaged archive dropped under `skip_corrupt`: its row of the metrics' `skipped`."""

    entry: dict[str, Any]


class _Ship(NamedTuple):
    """A nested archive small enough to be read whole and parsed on its own by `parse_inner_archive`."""

    data: bytes
    member: str  # as error messages name it: "outer member > inner member"
    stem: str
    depth: int


_Event = _Open | _Doc | _Note | _Skip | _Ship


@dataclass(frozen=True)
class ParseOptions:
    """What parsing needs to know; picklable, so that a worker process parses exactly as the stage would."""

    source: str  # the downloaded archive's file name, which messages and the `source` column carry
    skip_corrupt: bool = False
    hold_docs: int = 10_000
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    # Nested archives of at most this many bytes are read whole and handed on as `_Ship` events; None: none.
    ship_up_to: int | None = None


class _Parser:
    """Parses one archive stream, and the archives nested in it, into events.

    The documents of a tar are held back until the tar has been read to its end intact, so that with
    `skip_corrupt` a damaged archive is dropped whole; past `hold_docs` documents they are let go early
    (bounded memory), and a later fault can then drop only the rest.
    """

    def __init__(self, options: ParseOptions) -> None:
        self.options = options
        self.containers = 0

    def tar(self, stream: _Peekable, member: str, stem: str, depth: int) -> Iterator[_Event]:
        opts = self.options
        where = f"{opts.source}: {member}" if member else opts.source
        container = self.containers
        self.containers += 1
        yield _Open(stem)
        used: set[str] = set()
        held: list[_Doc] = []
        released = 0
        try:
            with ExitStack() as stack:
                kind = compression_of(stream.peek(_BLOCK))
                if kind is not None:
                    stream = _Peekable(stack.enter_context(_Decoded(kind, _Source(stream))))
                if not is_tar(stream.peek(_BLOCK)):
                    raise _Corrupt(f"the {kind or 'plain'} stream does not hold a tar archive")
                tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo))
                for info in tar:
                    name = _printable(info.name)
                    if not info.isreg():
                        yield _Note("non_file", name)
                        continue
                    if _is_unsafe(name):
                        yield _Note("unsafe", name)
                    body = _Peekable(tar.extractfile(info))
                    head = body.peek(_BLOCK)
                    packed = compression_of(head)
                    # A container by what it holds, not by its first bytes alone: a text that starts like
                    # a compressed stream but is none, or holds no tar, is a document like any other.
                    if is_tar(head) or (packed is not None and _holds_tar(body, packed)):
                        if depth + 1 > MAX_NESTING:
                            raise _Corrupt(f"{name} nests archives more than {MAX_NESTING} deep")
                        yield _Note("inner_archive", name)
                        label = f"{member} > {name}" if member else name
                        if opts.ship_up_to is not None and info.size <= opts.ship_up_to:
                            yield _Ship(body.read(), label, archive_stem(name), depth + 1)
                        else:
                            yield from self.tar(body, label, archive_stem(name), depth + 1)
                        continue
                    # Judged by the header's size, before reading: the tar stream skips an unread member's
                    # data block by block, so a huge member never has to fit in memory.
                    if info.size > opts.max_doc_bytes:
                        yield _Note("oversized", name)
                        continue
                    data = body.read()
                    if not data:
                        yield _Note("empty", name)
                        continue
                    text, invalid = decode_text(data)
                    n_bytes = len(text.encode("utf-8")) if invalid else len(data)
                    held.append(_Doc(container, _unique(_member_key(name), used), text, name, n_bytes, invalid))
                    if len(held) >= opts.hold_docs:
                        released += len(held)
                        yield from held
                        held.clear()
                if (bad_end := getattr(tar, "bad_end", None)) is not None:
                    raise _Corrupt(f"archive ends without its end-of-archive blocks ({bad_end})")
                # Read past the tar's end to the end of the stream, so that the decompressor checks the
                # stream's own end marker and checksum: a cut in the trailing padding is damage too.
                while stream.read(1 << 16):
                    pass
            yield from held
        except (tarfile.TarError, _Corrupt) as exc:
            reason = str(exc) if isinstance(exc, _Corrupt) else f"{type(exc).__name__}: {exc}"
            reason = " ".join(reason.split())
            if not opts.skip_corrupt:
                raise DataIntegrityError(f"{where}: truncated or corrupt archive ({reason})") from exc
            entry = {"archive": opts.source, "member": member, "error": reason}
            yield _Skip({**entry, "docs_dropped": len(held), "docs_kept": released})


def parse_inner_archive(data: bytes, member: str, stem: str, depth: int, options: ParseOptions) -> Iterator[_Event]:
    """The events of one nested archive read whole into `data` (an OpenWebText `urlsf_subsetNN-M_data.xz`):
    the one way such an archive is parsed, in the stage's process or in a worker. Archives nested inside it
    are streamed here too, never handed on again."""
    parser = _Parser(replace(options, ship_up_to=None))
    return parser.tar(_Peekable(io.BytesIO(data)), member, stem, depth)


def _parse_inner_archive_job(ship: _Ship, options: ParseOptions, max_text_chars: int) -> list[_Event] | None:
    """`parse_inner_archive` in a worker process. Returns None past `max_text_chars` characters of text
    (a decompression bomb, or a huge archive of small documents): the stage's process then parses the
    archive itself, streaming, so that no result sent back can exhaust memory."""
    events: list[_Event] = []
    text_chars = 0
    for event in parse_inner_archive(ship.data, ship.member, ship.stem, ship.depth, options):
        if isinstance(event, _Doc):
            text_chars += len(event.text)
            if text_chars > max_text_chars:
                return None
        events.append(event)
    return events


class _Collector:
    """Applies events in archive order: unique container names, counts, and the documents themselves."""

    def __init__(self, source: str, stats: ExtractStats, log: Any) -> None:
        self.source = source
        self.stats = stats
        self.log = log

    def apply(self, events: Iterable[_Event], names: list[str]) -> Iterator[Document]:
        """`names` holds the container names of the parse that made `events`, in the order it opened them."""
        stats = self.stats
        for event in events:
            match event:
                case _Doc():
                    doc_id = f"{names[event.container]}/{event.key}"
                    yield Document(doc_id, event.text, self.source, event.member, event.n_bytes, event.invalid_utf8)
                case _Open():
                    names.append(_unique(event.stem, stats.containers))
                case _Note(kind="inner_archive"):
                    stats.inner_archives += 1
                case _Note(kind="non_file"):
                    stats.non_file_members += 1
                case _Note(kind="empty"):
                    stats.empty_members += 1
                case _Note(kind="unsafe"):
                    stats.unsafe_members += 1
                    _list_name(stats.unsafe_member_names, event.name)
                case _Note(kind="oversized"):
                    stats.oversized_members += 1
                    if _list_name(stats.oversized_member_names, event.name):
                        self.log.warning("%s: %s: skipped, larger than max_doc_bytes", self.source, event.name)
                case _Skip(entry=entry):
                    stats.skipped.append(entry)
                    where = f"{self.source}: {entry['member']}" if entry["member"] else self.source
                    self.log.warning(
                        "%s: skipped, truncated or corrupt (%s); %d documents dropped",
                        where,
                        entry["error"],
                        entry["docs_dropped"],
                    )
                case _:
                    raise TypeError(f"unexpected parse event {type(event).__name__}")


def _list_name(names: list[str], name: str) -> bool:
    """Keep `name` among the first few listed verbatim in the metrics; True when it was kept."""
    if len(names) < _MAX_LISTED_NAMES:
        names.append(name)
        return True
    return False


class _Queued(NamedTuple):
    """An entry of the in-order queue: the events of a shipped archive (a worker's future) or of the archive
    itself (ready at once), with the container names of the parse that made them."""

    names: list[str]
    future: Future[list[_Event] | None]
    ship: _Ship | None


def _ready(events: list[_Event]) -> Future[list[_Event] | None]:
    future: Future[list[_Event] | None] = Future()
    future.set_result(events)
    return future


class _Walker:
    """Walks one downloaded archive and yields its documents in archive order.

    With a process pool, each nested archive of at most MAX_SHIPPED_ARCHIVE_BYTES is read here (the
    archive itself is read once, in order, by this process) and parsed in a worker; results are taken in
    the order they were submitted, with at most `in_flight` entries waiting, so memory holds a few inner
    archives, never the whole download.
    """

    def __init__(
        self, path: Path, options: ParseOptions, stats: ExtractStats, log: Any, pool: Executor | None, in_flight: int
    ) -> None:
        self.path = path
        self.options = options
        self.collector = _Collector(options.source, stats, log)
        self.pool = pool
        self.in_flight = in_flight

    def documents(self) -> Iterator[Document]:
        source = self.options.source
        if self.path.stat().st_size == 0:
            raise DataIntegrityError(f"{source}: empty file, not an archive")
        with open(self.path, "rb") as raw:
            stream = _Peekable(raw)
            head = stream.peek(_BLOCK)
            if compression_of(head) is None and not is_tar(head):
                raise DataIntegrityError(
                    f"{source}: unknown archive format (first bytes {head[:8].hex()}); "
                    "expected xz, gzip, bzip2, zstd or tar"
                )
            parser = _Parser(self.options)
            with closing(parser.tar(stream, member="", stem=archive_stem(source), depth=0)) as events:
                yield from self._in_order(events)

    def _in_order(self, events: Iterator[_Event]) -> Iterator[Document]:
        names: list[str] = []  # the container names of the download's own parse
        queue: deque[_Queued] = deque()
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration:
                    break
                except DataIntegrityError:
                    # Parsed in order, an inner archive read before this fault would have failed first.
                    while queue:
                        yield from self._finish(queue.popleft())
                    raise
                if isinstance(event, _Ship) and self.pool is None:
                    yield from self._parse_here(event)
                elif isinstance(event, _Ship):
                    limit = MAX_SHIPPED_TEXT_CHARS
                    future = self.pool.submit(_parse_inner_archive_job, event, self.options, limit)
                    queue.append(_Queued([], future, event))
                elif queue:
                    queue.append(_Queued(names, _ready([event]), None))
                else:
                    yield from self.collector.apply((event,), names)
                while queue and (len(queue) > self.in_flight or queue[0].future.done()):
                    yield from self._finish(queue.popleft())
            while queue:
                yield from self._finish(queue.popleft())
        finally:
            for entry in queue:
                entry.future.cancel()

    def _finish(self, entry: _Queued) -> Iterator[Document]:
        events = entry.future.result()
        if events is None and entry.ship is not None:  # too much text to send back: parse it here, streaming
            yield from self._parse_here(entry.ship)
        else:
            yield from self.collector.apply(events, entry.names)

    def _parse_here(self, ship: _Ship) -> Iterator[Document]:
        events = parse_inner_archive(ship.data, ship.member, ship.stem, ship.depth, self.options)
        return self.collector.apply(events, [])


def iter_archive_documents(
    path: Path,
    *,
    skip_corrupt: bool = False,
    hold_docs: int = 10_000,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    stats: ExtractStats | None = None,
    log: Any = None,
    pool: Executor | None = None,
    in_flight: int = 2,
) -> Iterator[Document]:
    """Every document in the archive at `path`, streaming, in archive order; see `_Parser` for `hold_docs`.

    With `pool` (a process pool), nested archives are parsed in its workers, `in_flight` at most waiting;
    the documents and `stats` are the same as without one.
    """
    options = ParseOptions(
        source=Path(path).name,
        skip_corrupt=skip_corrupt,
        hold_docs=hold_docs,
        max_doc_bytes=max_doc_bytes,
        ship_up_to=MAX_SHIPPED_ARCHIVE_BYTES,
    )
    walker = _Walker(
        Path(path), options, stats or ExtractStats(), log or logging.getLogger("gptflow.extract"), pool, in_flight
    )
    return walker.documents()


# -- shards ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes documents to `shard-00000.parquet`, ... with at most `shard_docs` rows each; holds one row
    group at most in memory."""

    def __init__(self, folder: Path, shard_docs: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_docs = shard_docs
        self.shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}

    def add(self, doc: Document) -> None:
        for name in SCHEMA.names:
            self._rows[name].append(getattr(doc, name))
        self._in_shard += 1
        if len(self._rows["doc_id"]) >= _ROW_GROUP_DOCS or self._in_shard >= self.shard_docs:
            self._flush()
        if self._in_shard >= self.shard_docs:
            self._close_shard()

    def _flush(self) -> None:
        if not self._rows["doc_id"]:
            return
        if self._writer is None:
            path = self.folder / f"shard-{self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
            self.shards += 1
        self._writer.write_table(pa.Table.from_pydict(self._rows, schema=SCHEMA))
        self._rows = {name: [] for name in SCHEMA.names}

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


# -- the stage -------------------------------------------------------------------------------------------


def build(ctx: StageContext, cfg: ExtractConfig) -> dict[str, Any]:
    folder = ctx.input_path("download") / ARCHIVES
    archives = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not archives:
        raise DataIntegrityError(f"{folder}: no archives to extract")
    ctx.log.info("extracting %d archive(s) with %d worker(s)", len(archives), cfg.workers)
    stats = ExtractStats()
    writer = ShardWriter(ctx.out / DOCS, cfg.shard_docs)
    docs = n_bytes = invalid_utf8 = 0
    reached_max = False
    # How many inner archives there are is known only once the downloads are read: size the pool by workers.
    with process_pool(cfg.workers, jobs=cfg.workers) as pool:
        for path in archives:
            found = 0
            skipped_before = len(stats.skipped)
            documents = iter_archive_documents(
                path,
                skip_corrupt=cfg.skip_corrupt,
                hold_docs=cfg.shard_docs,
                max_doc_bytes=cfg.max_doc_bytes,
                stats=stats,
                log=ctx.log,
                pool=pool,
                in_flight=2 * cfg.workers,
            )
            with closing(documents):
                for doc in documents:
                    writer.add(doc)
                    found += 1
                    n_bytes += doc.n_bytes
                    invalid_utf8 += doc.invalid_utf8
                    if cfg.max_docs is not None and docs + found >= cfg.max_docs:
                        reached_max = True
                        break
            docs += found
            ctx.log.info("%s: %d documents", path.name, found)
            if reached_max:
                ctx.log.info("stopped at max_docs=%d", cfg.max_docs)
                break
            if found == 0 and len(stats.skipped) == skipped_before:
                raise DataIntegrityError(f"{path.name}: the archive holds no documents")
    shards = writer.close()
    if docs == 0:
        raise DataIntegrityError(f"{folder}: no documents in {', '.join(p.name for p in archives)}")
    if stats.oversized_members:
        ctx.log.warning("%d member(s) over max_doc_bytes=%d skipped", stats.oversized_members, cfg.max_doc_bytes)
    return {
        "docs": docs,
        "shards": shards,
        "bytes": n_bytes,
        "archives": len(archives),
        "inner_archives": stats.inner_archives,
        "invalid_utf8_docs": invalid_utf8,
        "skipped": stats.skipped,
        "empty_members": stats.empty_members,
        "non_file_members": stats.non_file_members,
        "unsafe_members": stats.unsafe_members,
        "unsafe_member_names": stats.unsafe_member_names,
        "oversized_members": stats.oversized_members,
        "oversized_member_names": stats.oversized_member_names,
        "max_docs_reached": reached_max,
    }


STAGE = Stage(name="extract", module=__name__, config=ExtractConfig, build=build, inputs=("download",))
extract_task = stage_task(STAGE)
