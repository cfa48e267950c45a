"""Stage `extract`: the downloaded archives -> documents in Parquet shards.

Reads the real OpenWebText layout and its simpler relatives:

    openwebtext.tar.xz  or  urlsf_subsetNN.tar      (outer tar, compressed or plain: the download)
      openwebtext/urlsf_subsetNN-M_data.xz           (inner archive: a compressed tar)
        NNNNNNN-<md5>.txt                            (one document per regular-file member)

an inner `*_data.xz` given directly, or a plain tar of .txt files. Compression: xz, gzip, bzip2, zstd, told
by magic bytes. A member is read as an archive when it starts like one (a tar header, a compressed stream's
signature, or the first bytes of xz's, gzip's or zstd's magic cut short: none of those is valid UTF-8) or
is named like one (`.xz .gz .tgz .txz .bz2 .zst .tar`); every other member is a document, even a text that
starts with "BZh9" (bzip2's magic is ASCII, so only its full stream signature counts).

Damage. A member read as an archive must decompress to a tar, read to its end intact; otherwise it is
quarantined: left out with all of its documents (nested archives included), listed under `quarantined` in
the metrics with a reason (truncated, corrupt_stream, not_a_tar, corrupt_tar, too_large, expansion_ratio,
too_deep), and the rest of the corpus proceeds. Past `max_corrupt_fraction` of the inner archives seen the
stage fails, and with `strict` it fails on the first. Damage in the downloaded file itself is never
quarantined: the stage fails naming it, its download version and `gptflow run --force download`.
Decompression bombs: an inner archive may expand to `max_archive_bytes` and `max_expansion_ratio` times its
own size, the download to that ratio; reading stops at the first read past either.

Memory is bounded by bytes. Everything streams (tar "r|" mode over nested decompressors), and members are
never written to disk as files: a hostile name such as `../../etc/passwd` is only data. A member larger
than `max_doc_bytes` is skipped unread. An inner archive's documents wait until it has been read to its end
intact, at most HOLD_BYTES of them in memory and the rest in an anonymous file in the stage's scratch
folder; Parquet row groups close at ROW_GROUP_BYTES of text or _ROW_GROUP_DOCS rows, whichever comes first.

Decompressing and parsing the ~20,000 inner archives is the costly part, so with `workers` > 1 each inner
archive of at most MAX_SHIPPED_ARCHIVE_BYTES is read whole and parsed in a worker process, while this
process still reads the download once, in order, and writes every shard. Parsing only describes what it
finds (events); the events are applied in archive order, whichever process made them, so the output is
the same for any worker count.

Output: `docs/shard-00000.parquet`, ... (zstd) with columns doc_id, text, source, member, n_bytes.
"""

import bz2
import gzip
import io
import json
import logging
import lzma
import re
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar, NamedTuple

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
# "BZh" and a block size are ASCII, so a text may start with them: a bzip2 stream is told by those and the
# magic of its first block ("1AY&SY", pi's digits) or, for an empty stream, of its end (sqrt(pi)'s).
_BZIP2_BLOCKS = (b"1AY&SY", b"\x17rE8P\x90")
BZIP2_MAGIC = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")
# Every signature a member may start with; one cut short is a compressed stream that lost its body.
_SIGNATURES = [("xz", XZ_MAGIC), ("gzip", GZIP_MAGIC), ("zstd", ZSTD_MAGIC)] + [
    ("bzip2", b"BZh" + bytes([level]) + block) for level in b"123456789" for block in _BZIP2_BLOCKS
]
_TAR_MAGIC_OFFSET = 257  # POSIX ustar (and GNU "ustar  ") headers carry "ustar" here
_BLOCK = tarfile.BLOCKSIZE
# outer tar -> inner tar is depth 1; a little slack for a tar of such outer tars, and no more: an archive
# nested deeper than this is far more likely a decompression bomb than a corpus.
MAX_NESTING = 3
# Rows per Parquet row group, or fewer: a row group also closes at ROW_GROUP_BYTES of text, whatever the
# documents' size. pyarrow's writer takes ~6 times a row group's size while writing it (measured here: ~400
# MiB for 64 MiB of 4 MB documents, ~100 MiB for 16 MiB), and readers (tasks/shards.py) read batches of
# about that size. 1024 OpenWebText documents (~5 KB each) are ~5 MB, so for them the row count decides.
_ROW_GROUP_DOCS = 1024
ROW_GROUP_BYTES = 16 << 20
# An inner archive's events wait in memory up to this many bytes (of text, mostly), then in a temporary
# file: an OpenWebText inner archive holds ~2 MB of text (38 GB in ~20,600), so it never reaches the file.
HOLD_BYTES = 64 << 20
# How many hostile or oversized member names, and quarantined archives, the metrics list (all are counted).
_MAX_LISTED_NAMES = 20
_MAX_LISTED_QUARANTINED = 1000
# An OpenWebText document is ~5 KB (38 GB of text in ~8M documents); Gopher's longest kept document,
# 100,000 words, is ~600 KB. Far above both, and small enough that one member can never exhaust memory.
DEFAULT_MAX_DOC_BYTES = 8 << 20
# An OpenWebText inner archive is ~0.6 MB (12 GB in ~20,600 of them) and a few MB decompressed: 1 GiB is
# hundreds of times that, and still a bounded amount to read.
DEFAULT_MAX_ARCHIVE_BYTES = 1 << 30
# xz packs English text ~3-10x (OpenWebText: 38 GB of text in 12 GB); zeros pack 1,000x (gzip) to 300,000x
# (bzip2). 200x leaves room for repetitive pages and stops a bomb after a small fraction of it.
DEFAULT_MAX_EXPANSION_RATIO = 200.0
# The ratio is judged only past this many decompressed bytes: a tar's headers and 10 KiB end padding are
# mostly zeros, so an empty or tiny tar packs 200-500x, and reading 16 MiB costs nothing.
_RATIO_FLOOR_BYTES = 16 << 20
# Inner archives of at most this size are read whole and parsed on their own (in a worker when there are
# workers): ~13 times an OpenWebText one. A bigger one is streamed by the stage's process instead. While
# parsed in a worker, an archive waits in this process's memory too (up to 2 x workers of them at once).
MAX_SHIPPED_ARCHIVE_BYTES = 8 << 20
# A worker sends back at most this many bytes of text per archive (~4 times an OpenWebText inner archive's);
# past it (a huge archive of small documents) the stage's process parses the archive itself, streaming, so
# that the results waiting in memory stay within 2 x workers x this.
MAX_SHIPPED_TEXT_BYTES = 8 << 20
_ARCHIVE_SUFFIXES = (".tar", ".xz", ".txz", ".tgz", ".gz", ".bz2", ".zst", ".zstd")
# zstd input fed to the decompressor per step. Its densest block (RLE) turns 4 bytes into 128 KiB, so one
# step can emit at most ~4 MiB, whatever the stream: a bomb is read in bounded pieces.
_ZSTD_STEP = 128
# What a decompressor's read is asked for when its caller asks for everything: the budget is judged per read.
_READ_CHUNK = 1 << 16
# Errors the decompressors raise for damaged or truncated data (bz2 reports damage as a bare OSError).
_DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)
# Quarantine reasons that are refusals (the data may be intact) rather than damage.
_BOMB_REASONS = frozenset({"too_large", "expansion_ratio", "too_deep"})
FORCE_DOWNLOAD = "gptflow run --force download"


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
        description="Stop after this many documents (quick runs); none reads every archive to the end.",
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
        description="Processes parsing inner archives at once (1 parses them in the stage's process). The "
        "download is still read once, in order, and the shards written by one process: the output does not "
        "depend on it.",
    )


# -- format detection ------------------------------------------------------------------------------------


class _Damage(Exception):
    """Data that is not what it should be: a stream that does not decompress or does not hold a tar, or one
    refused as a bomb. `reason` is the short code the metrics record; the message is one line."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = " ".join(detail.split())
        super().__init__(self.detail)

    def inside(self, name: str) -> "_Damage":
        """The same damage, as seen from the archive that holds the member `name`."""
        return _Damage(self.reason, f"{name}: {self.detail}")


class _DownloadFault(Exception):
    """A fault of the downloaded archive itself, met while an archive nested in it was being read: never
    the nested archive's damage, which would quarantine it instead of failing the stage."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(str(error))


class _HoldFull(Exception):
    """An inner archive parsed in a worker held more than the worker may send back."""


class _Peekable:
    """A read-only stream whose first bytes can be looked at without consuming them (for magic bytes)."""

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
    (a disk's, or the download's around a nested archive) are never taken for damage in the data."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.failed = False

    def read(self, n: int | None = -1) -> bytes:
        try:
            return self._raw.read(n)
        except Exception:
            self.failed = True
            raise


class _Guarded:
    """The download's stream of one of its members, read by that member's own parse: whatever damage the
    download shows is raised as _DownloadFault, so that it fails the stage instead of quarantining the member."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def read(self, n: int | None = -1) -> bytes:
        try:
            return self._raw.read(n)
        except (_Damage, tarfile.TarError) as exc:
            raise _DownloadFault(exc) from exc


class _Budget:
    """How many decompressed bytes one archive may produce (all its decompressors together): the smaller of
    `max_bytes` and `max_ratio` times its own size (at least _RATIO_FLOOR_BYTES). Judged on every read, so
    that a bomb is stopped one read past the limit, never read to its end."""

    def __init__(self, compressed: int, max_ratio: float, max_bytes: int | None) -> None:
        by_ratio = max(int(compressed * max_ratio), _RATIO_FLOOR_BYTES)
        if max_bytes is not None and max_bytes < by_ratio:
            self.limit = max_bytes
            self.reason, self.detail = "too_large", f"decompresses to more than max_archive_bytes={max_bytes:,}"
        else:
            self.limit = by_ratio
            self.reason = "expansion_ratio"
            self.detail = (
                f"decompresses to more than {by_ratio:,} bytes from {compressed:,}, "
                f"past max_expansion_ratio={max_ratio:g}"
            )
        self.used = 0

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise _Damage(self.reason, self.detail)


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
    """A decompressed stream whose damage, whatever the decompressor calls it, is raised as `_Damage`
    (truncated, or corrupt_stream), and whose output is charged to `budget`. An error of the stream
    underneath passes unchanged."""

    def __init__(self, kind: str, source: _Source, budget: _Budget) -> None:
        self.kind = kind
        self._source = source
        self._budget = budget
        self._file = _decompressor(kind, source)

    def __enter__(self) -> "_Decoded":
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:  # everything, but judged piece by piece
            parts = []
            while chunk := self.read(_READ_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        try:
            data = self._file.read(n)
        except _DECOMPRESSION_ERRORS as exc:
            if self._source.failed:
                raise
            reason = "truncated" if isinstance(exc, EOFError) else "corrupt_stream"
            raise _Damage(reason, f"{self.kind} data: {type(exc).__name__}: {exc}") from exc
        self._budget.spend(len(data))
        return data


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


def _cut_signature(head: bytes) -> str | None:
    """The compression whose signature `head`, all of a member, is the start of: a stream cut short."""
    for kind, signature in _SIGNATURES:
        if head and len(head) < len(signature) and signature.startswith(head):
            return kind
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _archive_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((suffix for suffix in _ARCHIVE_SUFFIXES if lower.endswith(suffix)), None)


def looks_like_archive(name: str, head: bytes) -> bool:
    """Whether the member `name`, starting with `head` (its first 512 bytes, or all of it), is to be read
    as an archive: a tar header, a compressed stream's signature or the start of a binary one cut short (no
    text can start with xz's, gzip's or zstd's magic: none is valid UTF-8), or a name that says so. Reading
    it then tells whether it is one; if not, it is corrupt, never a document."""
    if is_tar(head) or compression_of(head) is not None:
        return True
    cut = _cut_signature(head)
    if cut is not None and cut != "bzip2" and not _is_utf8(head):
        return True
    return _archive_suffix(name) is not None


def _unreadable(name: str, head: bytes) -> _Damage | None:
    """Why a member read as an archive cannot be one, known from its first bytes alone; None when it may be."""
    if is_tar(head) or compression_of(head) is not None:
        return None
    if not head:
        return _Damage("truncated", "empty, though named like an archive")
    cut = _cut_signature(head)
    if cut is not None:
        return _Damage("truncated", f"{len(head)} byte(s) in all: the start of the {cut} signature, cut short")
    suffix = _archive_suffix(name)
    if suffix is not None and suffix != ".tar":
        return _Damage(
            "corrupt_stream", f"named {suffix}, but starts with {head[:8].hex()}: no xz, gzip, bzip2 or zstd stream"
        )
    return None  # reading it says not_a_tar


def _as_damage(exc: BaseException) -> _Damage:
    """A tar reader's error as damage: its messages are the only way to tell a cut from a garbled header."""
    if isinstance(exc, _Damage):
        return exc
    text = str(exc)
    cut = any(words in text for words in ("unexpected end of data", "empty file", "truncated header"))
    return _Damage("truncated" if cut else "corrupt_tar", f"tar: {type(exc).__name__}: {text}")


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
    quarantined_archives: int = 0
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    containers: set[str] = field(default_factory=set)  # doc_id prefixes in use, kept unique


def _printable(name: str) -> str:
    """Tar names are decoded with surrogateescape; make invalid bytes U+FFFD so Parquet can hold them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def archive_stem(name: str) -> str:
    """`urlsf_subset00-1_data.xz` -> `urlsf_subset00-1_data`; `docs.tar.gz` -> `docs`."""
    stem = PurePosixPath(name).name
    while (suffix := _archive_suffix(stem)) is not None:
        stem = stem[: len(stem) - len(suffix)]
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
# Parsing describes what it finds as a sequence of events and knows nothing of other archives, so an inner
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


class _Quarantine(NamedTuple):
    """An inner archive left out whole: its row of the metrics' `quarantined`."""

    entry: dict[str, Any]


class _Ship(NamedTuple):
    """An inner archive small enough to be read whole and parsed on its own by `parse_inner_archive`."""

    data: bytes
    name: str  # its name in the download
    label: str  # as messages and the metrics name it (the same, for a member of the download)


_Event = _Open | _Doc | _Note | _Quarantine | _Ship
_HELD_EVENTS: dict[str, type] = {cls.__name__: cls for cls in (_Open, _Doc, _Note)}


def _held_bytes(event: _Event) -> int:
    if isinstance(event, _Doc):
        return event.n_bytes + len(event.key) + len(event.member)
    return sum(len(value) for value in event if isinstance(value, str))


class _Held:
    """The events of one inner archive, waiting until it has been read to its end intact: up to `limit`
    bytes of them in memory, the rest (in order) in an anonymous temporary file in `spill_dir`; with no
    `spill_dir` (a worker), _HoldFull instead. Our own events, written as JSON lines, read back once."""

    def __init__(self, limit: int, spill_dir: Path | None) -> None:
        self.limit = limit
        self.spill_dir = spill_dir
        self.events: deque[_Event] = deque()
        self.bytes = 0
        self.file: IO[bytes] | None = None

    def add(self, event: _Event) -> None:
        if self.file is not None:
            self.file.write(json.dumps([type(event).__name__, *event], ensure_ascii=False).encode("utf-8") + b"\n")
            return
        self.events.append(event)
        self.bytes += _held_bytes(event)
        if self.bytes > self.limit:
            if self.spill_dir is None:
                raise _HoldFull
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.file = tempfile.TemporaryFile(dir=self.spill_dir)

    def release(self) -> Iterator[_Event]:
        """The events in the order they came, each let go as it is handed on."""
        while self.events:
            yield self.events.popleft()
        if self.file is not None:
            self.file.seek(0)
            for line in self.file:
                kind, *values = json.loads(line)
                yield _HELD_EVENTS[kind](*values)

    def close(self) -> None:
        self.events.clear()
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass(frozen=True)
class ParseOptions:
    """What parsing needs to know; picklable, so that a worker process parses exactly as the stage would."""

    source: str  # the downloaded archive's file name, which messages and the `source` column carry
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
    max_expansion_ratio: float = DEFAULT_MAX_EXPANSION_RATIO
    # Inner archives of at most this many bytes are read whole and handed on as `_Ship` events; None: none.
    ship_up_to: int | None = None


class _Parser:
    """Parses one archive stream, and the archives nested in it, into events.

    The download is parsed as it streams: damage in it fails the stage (DataIntegrityError), so none of it
    is held back. Each inner archive (a member of the download read as an archive) is the unit of
    quarantine: its events are held (see `_Held`, at most `hold_bytes` in memory) until it has been read to
    its end intact, archives nested in it included, and then let go; when anything in it is damaged or it
    passes its budget, they are dropped whole and one `_Quarantine` says why.
    """

    def __init__(
        self, options: ParseOptions, hold_bytes: int, spill_dir: Path | None, download_version: str | None = None
    ) -> None:
        self.options = options
        self.hold_bytes = hold_bytes
        self.spill_dir = spill_dir
        self.download_version = download_version
        self.containers = 0

    def download(self, stream: _Peekable, size: int) -> Iterator[_Event]:
        """The events of the downloaded archive, `size` bytes, read from `stream`."""
        opts = self.options
        budget = _Budget(size, opts.max_expansion_ratio, None)
        try:
            yield from self._tar(stream, opts.source, "", archive_stem(opts.source), 0, budget)
        except (_DownloadFault, _Damage, tarfile.TarError) as exc:
            cause = exc.error if isinstance(exc, _DownloadFault) else exc
            damage = _as_damage(cause)
            if damage.reason in _BOMB_REASONS:
                message = self.download_failure(
                    f"refused as a decompression bomb ({damage.detail})",
                    "raise extract.max_expansion_ratio if it is genuine",
                )
            else:
                message = self.download_failure(f"truncated or corrupt archive ({damage.detail})")
            raise DataIntegrityError(message) from cause

    def download_failure(self, what: str, fix: str = f"fetch it again with `{FORCE_DOWNLOAD}`") -> str:
        """The one line that fails the stage for the download itself: what is wrong, where it came from, and
        what to do (the download stage fetches its version again in place)."""
        came_from = f"; it came from download version {self.download_version}" if self.download_version else ""
        return f"{self.options.source}: {what}{came_from}: {fix}"

    def inner(self, stream: _Peekable, name: str, label: str, size: int) -> Iterator[_Event]:
        """The events of one inner archive, `size` bytes: its _Open, then either all the rest once it has
        been read to its end intact, or one _Quarantine."""
        opts = self.options
        mark = self.containers
        budget = _Budget(size, opts.max_expansion_ratio, opts.max_archive_bytes)
        events = self._tar(stream, name, label, archive_stem(name), 1, budget)
        held = _Held(self.hold_bytes, self.spill_dir)
        try:
            # Its container name is taken whatever follows, so that no other doc_id depends on its damage.
            yield next(events)
            try:
                for event in events:
                    held.add(event)
            except (_Damage, tarfile.TarError) as exc:
                self.containers = mark + 1  # the archives nested in it were never announced
                damage = _as_damage(exc)
                entry = {"archive": opts.source, "member": label, "reason": damage.reason, "detail": damage.detail}
                yield _Quarantine({**entry, "bytes": size})
                return
            yield from held.release()
        finally:
            held.close()
            events.close()

    def _tar(
        self, stream: _Peekable, name: str, label: str, stem: str, depth: int, budget: _Budget
    ) -> Iterator[_Event]:
        opts = self.options
        container = self.containers
        self.containers += 1
        yield _Open(stem)
        used: set[str] = set()
        with ExitStack() as stack:
            head = stream.peek(_BLOCK)
            if (damage := _unreadable(name, head)) is not None:
                raise damage
            kind = compression_of(head)
            if kind is not None:
                stream = _Peekable(stack.enter_context(_Decoded(kind, _Source(stream), budget)))
                head = stream.peek(_BLOCK)
            if not is_tar(head):
                what = f"the {kind} stream holds no tar archive" if kind else "not a tar archive"
                raise _Damage("not_a_tar", f"{what}; it starts with {head[:8].hex() or 'nothing'}")
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo))
            while (info := tar.next()) is not None:
                tar.members.clear()  # stream mode would keep every header read: memory growing per member
                member = _printable(info.name)
                if not info.isreg():
                    yield _Note("non_file", member)
                    continue
                if _is_unsafe(member):
                    yield _Note("unsafe", member)
                body = _Peekable(tar.extractfile(info))
                if looks_like_archive(member, body.peek(_BLOCK)):
                    yield from self._nested(body, member, label, info.size, depth, budget)
                    continue
                # Judged by the header's size, before reading: the tar stream skips an unread member's
                # data block by block, so a huge member never has to fit in memory.
                if info.size > opts.max_doc_bytes:
                    yield _Note("oversized", member)
                    continue
                data = body.read()
                if not data:
                    yield _Note("empty", member)
                    continue
                text, invalid = decode_text(data)
                n_bytes = len(text.encode("utf-8")) if invalid else len(data)
                yield _Doc(container, _unique(_member_key(member), used), text, member, n_bytes, invalid)
            if (bad_end := getattr(tar, "bad_end", None)) is not None:
                reason = "corrupt_tar" if isinstance(bad_end, tarfile.InvalidHeaderError) else "truncated"
                raise _Damage(reason, f"the tar ends without its end-of-archive blocks ({bad_end})")
            # Read past the tar's end to the end of the stream, so that the decompressor checks the
            # stream's own end marker and checksum: a cut in the trailing padding is damage too.
            while stream.read(1 << 16):
                pass

    def _nested(
        self, body: _Peekable, name: str, label: str, size: int, depth: int, budget: _Budget
    ) -> Iterator[_Event]:
        """A member read as an archive: at depth 0 an inner archive (shipped whole, or parsed here as the
        unit of quarantine), deeper a part of the inner archive that holds it, sharing its budget."""
        yield _Note("inner_archive", name)
        if depth == 0:
            ship_up_to = self.options.ship_up_to
            if ship_up_to is not None and size <= ship_up_to:
                yield _Ship(body.read(), name, name)
            else:
                yield from self.inner(_Peekable(_Guarded(body)), name, name, size)
            return
        try:
            if depth + 1 > MAX_NESTING:
                raise _Damage("too_deep", f"nests archives more than {MAX_NESTING} deep")
            yield from self._tar(body, name, f"{label} > {name}", archive_stem(name), depth + 1, budget)
        except (_Damage, tarfile.TarError) as exc:
            raise _as_damage(exc).inside(name) from exc


def parse_inner_archive(
    ship: _Ship, options: ParseOptions, hold_bytes: int, spill_dir: Path | None
) -> Iterator[_Event]:
    """The events of one inner archive read whole (an OpenWebText `urlsf_subsetNN-M_data.xz`): the one way
    such an archive is parsed, in the stage's process or in a worker."""
    parser = _Parser(options, hold_bytes, spill_dir)
    return parser.inner(_Peekable(io.BytesIO(ship.data)), ship.name, ship.label, len(ship.data))


def _parse_inner_archive_job(ship: _Ship, options: ParseOptions, max_text_bytes: int) -> list[_Event] | None:
    """`parse_inner_archive` in a worker process. Returns None past `max_text_bytes` held: the stage's
    process then parses the archive itself, streaming, so that no result sent back can exhaust memory."""
    try:
        return list(parse_inner_archive(ship, options, max_text_bytes, None))
    except _HoldFull:
        return None


def quarantine_message(entry: dict[str, Any]) -> str:
    """One line for a quarantined inner archive: where it is, and what is wrong with it."""
    what = "refused as a decompression bomb" if entry["reason"] in _BOMB_REASONS else "truncated or corrupt archive"
    return f"{entry['archive']}: {entry['member']}: {what} ({entry['detail']})"


class _Collector:
    """Applies events in archive order: unique container names, counts, and the documents themselves."""

    def __init__(self, source: str, stats: ExtractStats, log: Any, strict: bool) -> None:
        self.source = source
        self.stats = stats
        self.log = log
        self.strict = strict

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
                case _Quarantine(entry=entry):
                    if self.strict:
                        raise DataIntegrityError(quarantine_message(entry))
                    stats.quarantined_archives += 1
                    if len(stats.quarantined) < _MAX_LISTED_QUARANTINED:
                        stats.quarantined.append(entry)
                    self.log.warning(
                        "%s [%s]; quarantined, its documents left out", quarantine_message(entry), entry["reason"]
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

    With a process pool, each inner archive of at most MAX_SHIPPED_ARCHIVE_BYTES is read here (the
    download itself is read once, in order, by this process) and parsed in a worker; results are taken in
    the order they were submitted, with at most `in_flight` entries waiting, so memory holds a few inner
    archives, never the whole download.
    """

    def __init__(
        self,
        path: Path,
        options: ParseOptions,
        collector: _Collector,
        pool: Executor | None,
        in_flight: int,
        spill_dir: Path,
        download_version: str | None,
    ) -> None:
        self.path = path
        self.options = options
        self.collector = collector
        self.pool = pool
        self.in_flight = in_flight
        self.spill_dir = spill_dir
        self.download_version = download_version

    def documents(self) -> Iterator[Document]:
        parser = _Parser(self.options, HOLD_BYTES, self.spill_dir, self.download_version)
        size = self.path.stat().st_size
        if size == 0:
            raise DataIntegrityError(parser.download_failure("empty file, not an archive"))
        with open(self.path, "rb") as raw:
            stream = _Peekable(raw)
            head = stream.peek(_BLOCK)
            if compression_of(head) is None and not is_tar(head):
                what = f"unknown archive format (first bytes {head[:8].hex()}); expected xz, gzip, bzip2, zstd or tar"
                raise DataIntegrityError(parser.download_failure(what))
            with closing(parser.download(stream, size)) as events:
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
                    future = self.pool.submit(_parse_inner_archive_job, event, self.options, MAX_SHIPPED_TEXT_BYTES)
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
        events = parse_inner_archive(ship, self.options, HOLD_BYTES, self.spill_dir)
        with closing(events):
            yield from self.collector.apply(events, [])


def iter_archive_documents(
    path: Path,
    cfg: ExtractConfig | None = None,
    *,
    stats: ExtractStats | None = None,
    log: Any = None,
    pool: Executor | None = None,
    in_flight: int = 2,
    spill_dir: Path | None = None,
    download_version: str | None = None,
) -> Iterator[Document]:
    """Every document in the archive at `path`, streaming, in archive order, parsed as `cfg` says.

    With `pool` (a process pool), inner archives are parsed in its workers, `in_flight` at most waiting;
    the documents and `stats` are the same as without one. Inner archives too big to hold in memory until
    they are known intact wait in `spill_dir` (default: the system's temporary folder). Failures of the
    download itself name `download_version` where given.
    """
    cfg = cfg or ExtractConfig()
    options = ParseOptions(
        source=Path(path).name,
        max_doc_bytes=cfg.max_doc_bytes,
        max_archive_bytes=cfg.max_archive_bytes,
        max_expansion_ratio=cfg.max_expansion_ratio,
        ship_up_to=MAX_SHIPPED_ARCHIVE_BYTES,
    )
    log = log or logging.getLogger("gptflow.extract")
    collector = _Collector(options.source, stats or ExtractStats(), log, cfg.strict)
    spill = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    return _Walker(Path(path), options, collector, pool, in_flight, spill, download_version).documents()


# -- shards ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes documents to `shard-00000.parquet`, ... with at most `shard_docs` rows each; holds one row
    group at most in memory, of at most `row_group_bytes` of text (or _ROW_GROUP_DOCS rows) and one document."""

    def __init__(self, folder: Path, shard_docs: int, row_group_bytes: int = ROW_GROUP_BYTES) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_docs = shard_docs
        self.row_group_bytes = row_group_bytes
        self.shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
        self._bytes = 0

    def add(self, doc: Document) -> None:
        for name in SCHEMA.names:
            self._rows[name].append(getattr(doc, name))
        self._in_shard += 1
        self._bytes += doc.n_bytes
        full = len(self._rows["doc_id"]) >= _ROW_GROUP_DOCS or self._bytes >= self.row_group_bytes
        if full or self._in_shard >= self.shard_docs:
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
        table = pa.Table.from_pydict(self._rows, schema=SCHEMA)
        self._rows = {name: [] for name in SCHEMA.names}  # the table holds the rows now: let the lists go
        self._bytes = 0
        self._writer.write_table(table)

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
    download_version = ctx.inputs["download"]
    stats = ExtractStats()
    writer = ShardWriter(ctx.out / DOCS, cfg.shard_docs, ROW_GROUP_BYTES)
    docs = n_bytes = invalid_utf8 = 0
    reached_max = False
    # How many inner archives there are is known only once the downloads are read: size the pool by workers.
    with process_pool(cfg.workers, jobs=cfg.workers) as pool:
        for path in archives:
            found = 0
            quarantined_before = stats.quarantined_archives
            documents = iter_archive_documents(
                path,
                cfg,
                stats=stats,
                log=ctx.log,
                pool=pool,
                in_flight=2 * cfg.workers,
                spill_dir=ctx.work,
                download_version=download_version,
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
            if found == 0 and stats.quarantined_archives == quarantined_before:
                raise DataIntegrityError(f"{path.name}: the archive holds no documents")
    shards = writer.close()
    corrupt_fraction = stats.quarantined_archives / stats.inner_archives if stats.inner_archives else 0.0
    if corrupt_fraction > cfg.max_corrupt_fraction:
        raise DataIntegrityError(
            f"{stats.quarantined_archives} of {stats.inner_archives} inner archives were corrupt or refused "
            f"({corrupt_fraction:.1%}, more than max_corrupt_fraction={cfg.max_corrupt_fraction:g}); the first: "
            f"{quarantine_message(stats.quarantined[0])}; if the download {download_version} is damaged, "
            f"fetch it again with `{FORCE_DOWNLOAD}`"
        )
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
        "quarantined_archives": stats.quarantined_archives,
        "corrupt_fraction": corrupt_fraction,
        "quarantined": stats.quarantined,
        "empty_members": stats.empty_members,
        "non_file_members": stats.non_file_members,
        "unsafe_members": stats.unsafe_members,
        "unsafe_member_names": stats.unsafe_member_names,
        "oversized_members": stats.oversized_members,
        "oversized_member_names": stats.oversized_member_names,
        "max_docs_reached": reached_max,
    }


STAGE = Stage(
    name="extract",
    module=__name__,
    config=ExtractConfig,
    build=build,
    inputs=("download",),
    libraries=("pyarrow", "zstandard", "python"),
)
extract_task = stage_task(STAGE)
