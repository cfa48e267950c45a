"""Document files users bring besides OpenWebText's archives: plain text, JSON Lines, Parquet, and Common
Crawl's WET and WARC files (tasks/readers/warc.py).

    notes.txt                         one document: the whole file
    corpus.jsonl[.gz|.zst|.xz]        one JSON object per line, its `text` (and `id`, when present)
    corpus.parquet                    a `text` column (string), an optional `id` column of any type
    CC-MAIN-...warc.wet.gz            one document per `conversion` record; the record's URL as its source
    CC-MAIN-...warc.gz                one document per HTML `response` record: the page's main text

A format is told by content, never by name: Parquet's and the compressors' magic bytes, then the structure
of the (decompressed) first bytes. Compression is gzip, zstd or xz, for any format but Parquet. Not
bzip2: its first block (up to 900 KB of input) rarely ends within a file's first HEAD_BYTES, so nothing
of it can be seen to tell the format.

Everything streams, so memory is bounded by `max_doc_bytes`, not by the file: JSON Lines are read line by
line, a line longer than the bound skipped unread (it is read in pieces up to its end); Parquet in batches
of about BATCH_BYTES; WET and WARC record by record. A document larger than `max_doc_bytes` is skipped and
counted under `too_large` in the caller's `skipped` counter, with the other reasons a record yields no
document (see warc.py). Bytes that are not UTF-8 become U+FFFD and the document says so (`invalid_utf8`).

Damage that no rerun fixes is a one-line DataIntegrityError naming the file and, where there is one, the
line or row: a truncated or corrupt compressed stream (the decompressors here report a truncated stream,
which Python's gzip module and the WARC libraries do not always do), invalid JSON, a record without `text`
or with a `text` that is not a string, a Parquet file that cannot be read.
"""

import gzip
import io
import json
import lzma
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from storage.errors import ConfigError, DataIntegrityError
from tasks.readers.streams import compression_of as stream_compression

FORMATS = ("jsonl", "parquet", "text", "wet", "warc")
# How much of a file's start detect_document_format wants: several JSON lines or WARC records' headers.
HEAD_BYTES = 64 << 10
PARQUET_MAGIC = b"PAR1"
# A JSON line holds its text escaped: Python's json.dumps writes a non-ASCII character as an escape such
# as \u00e9 (6 bytes for 2-3 UTF-8 bytes, 12 for an emoji's 4), plus the other fields. A line may be this
# many times max_doc_bytes, plus _LINE_SLACK, before it is skipped unread.
_LINE_FACTOR = 3
_LINE_SLACK = 1 << 20
# Parquet is read in batches of about this many bytes of text (by the row groups' own size statistics),
# and never more than _BATCH_ROWS rows at a time.
BATCH_BYTES = 16 << 20
_BATCH_ROWS = 1024
# zstd input fed to the decompressor per step: its densest block (RLE) turns 4 bytes into 128 KiB, so a
# step emits at most ~4 MiB, whatever the stream.
_ZSTD_STEP = 128
_READ_CHUNK = 1 << 16
# Past this share of bytes that are not UTF-8, a file that starts like text is taken for binary data.
_MAX_INVALID_SHARE = 0.3


class FileDocument(NamedTuple):
    """One document read from a user's file."""

    key: str  # its id within the file: `id` when present, else the WARC record id, else line or row number
    text: str
    source: str  # a WET/WARC record's target URI; else the file's name
    n_bytes: int  # UTF-8 bytes of text
    invalid_utf8: bool  # bytes that were not UTF-8 were replaced with U+FFFD


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def decode_text(data: bytes) -> tuple[str, bool]:
    """(text, False) for valid UTF-8; otherwise the text with U+FFFD for bad bytes, and True."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _n_bytes(text: str, data: bytes, invalid: bool) -> int:
    """UTF-8 size of `text` decoded from `data`: each replaced byte became U+FFFD's three."""
    return len(text.encode("utf-8")) if invalid else len(data)


def _utf8_clean(text: str) -> tuple[str, int, bool]:
    """(text, its UTF-8 size, whether it was changed): a JSON string may hold lone surrogates (`"\\udc80"`),
    which no UTF-8 file can store, so they are replaced like invalid bytes."""
    try:
        return text, len(text.encode("utf-8")), False
    except UnicodeEncodeError:
        data = text.encode("utf-8", errors="replace")
        return data.decode("utf-8"), len(data), True


# -- compression ------------------------------------------------------------------------------------------


def compression_of(head: bytes) -> str | None:
    """ "gzip", "zstd" or "xz" from a stream's first bytes; None when it is not compressed, or compressed
    with bzip2, whose first block rarely ends within a head, so that what it holds cannot be told."""
    kind = stream_compression(head)
    return None if kind == "bzip2" else kind


def _decompress_head(kind: str, head: bytes, limit: int = HEAD_BYTES) -> bytes:
    """The first `limit` decompressed bytes of a stream that starts with `head` (a cut-off stream is fine:
    what it decodes to so far), across concatenated gzip members and zstd frames."""
    out = bytearray()
    data = head
    try:
        while data and len(out) < limit:
            if kind == "zstd":
                frame = zstandard.ZstdDecompressor().decompressobj()
                for start in range(0, len(data), _ZSTD_STEP):
                    out += frame.decompress(data[start : start + _ZSTD_STEP])
                    if frame.eof or len(out) >= limit:
                        break
                data = frame.unused_data if frame.eof else b""
                continue
            decoder: Any = zlib.decompressobj(wbits=31) if kind == "gzip" else lzma.LZMADecompressor()
            out += decoder.decompress(data, limit - len(out))
            data = decoder.unused_data if decoder.eof else b""
    except (zlib.error, lzma.LZMAError, OSError, EOFError, zstandard.ZstdError):
        pass  # damage past what was decoded: reading the file reports it, naming the file
    return bytes(out[:limit])


class _ZstdRaw(io.RawIOBase):
    """Streaming zstd that, unlike zstandard's stream_reader, reports a truncated frame (EOFError). Input is
    fed in _ZSTD_STEP pieces only while the caller's buffer is not yet filled, so it holds at most one
    step's output beyond a read."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._started = False  # a frame has begun (an empty input is an empty stream, not a truncated one)
        self._input = b""
        self._pos = 0  # bytes of `_input` fed
        self._out = bytearray()
        self._out_pos = 0  # bytes of `_out` returned; dropped only when refilling, so never re-sliced

    def readable(self) -> bool:
        return True

    def _step(self) -> bool:
        """Decompress one piece of input into `_out`; False at the end of the input."""
        if self._pos >= len(self._input):
            self._input, self._pos = self._raw.read(_READ_CHUNK), 0
            if not self._input:
                if self._started and not self._frame.eof:
                    raise EOFError("zstd stream ended inside a frame")
                return False
        if self._frame.eof:  # concatenated frames: the next one starts with what the last one left over
            carry = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            if carry:
                self._out += self._frame.decompress(carry)
                return True
        piece = self._input[self._pos : self._pos + _ZSTD_STEP]
        self._pos += len(piece)
        self._started = True
        self._out += self._frame.decompress(piece)
        return True

    def readinto(self, buffer: Any) -> int:
        if len(self._out) - self._out_pos < len(buffer):
            del self._out[: self._out_pos]  # fewer bytes are left than asked for: a cheap move
            self._out_pos = 0
            while len(self._out) < len(buffer) and self._step():
                pass
        n = min(len(buffer), len(self._out) - self._out_pos)
        buffer[:n] = self._out[self._out_pos : self._out_pos + n]
        self._out_pos += n
        return n


class _Checked(io.RawIOBase):
    """A decompressed stream whose damage, whatever the decompressor calls it, is a one-line
    DataIntegrityError naming the file."""

    def __init__(self, inner: Any, kind: str, path: Path) -> None:
        self._inner = inner
        self._kind = kind
        self._path = path
        self._offset = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._offset

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._inner.readinto(buffer)
        except EOFError as exc:
            raise DataIntegrityError(f"{self._path}: truncated {self._kind} stream: the file ends inside it") from exc
        except (zlib.error, lzma.LZMAError, OSError, zstandard.ZstdError) as exc:
            raise DataIntegrityError(f"{self._path}: corrupt {self._kind} stream ({_first_line(exc)})") from exc
        self._offset += n
        return n


@contextmanager
def open_decompressed(path: Path) -> Iterator[io.BufferedReader]:
    """`path`'s bytes, decompressed when its magic says gzip, zstd or xz."""
    with open(path, "rb") as raw:
        kind = compression_of(raw.read(16))
        raw.seek(0)
        if kind is None:
            inner: Any = raw
        elif kind == "gzip":
            inner = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == "zstd":
            inner = _ZstdRaw(raw)
        else:
            inner = lzma.LZMAFile(raw)
        yield io.BufferedReader(_Checked(inner, kind or "plain", path), _READ_CHUNK)


# -- detection --------------------------------------------------------------------------------------------


def _is_tar(data: bytes) -> bool:
    return data[257:262] == b"ustar"


def _starts_jsonl(data: bytes, whole: bool) -> bool:
    """Whether the first non-blank line of `data` is a JSON object; when `data` is not the whole file and
    that line goes on past it, whether it starts like one (`{"` almost never opens a text)."""
    start = len(data) - len(data.lstrip())
    end = data.find(b"\n", start)
    line = data[start:] if end < 0 else data[start:end]
    try:
        return isinstance(json.loads(decode_text(line)[0]), dict)
    except (ValueError, RecursionError):
        return end < 0 and not whole and line.startswith(b'{"')


def _classify(data: bytes, name: str, whole: bool) -> str | None:
    if data.startswith((b"WARC/1.0", b"WARC/1.1")):
        from tasks.readers.warc import warc_kind  # warc.py imports this module

        return warc_kind(data, name)
    if _is_tar(data) or b"\x00" in data or compression_of(data):
        return None
    if not data.strip():
        return "text"
    if _starts_jsonl(data, whole):
        return "jsonl"
    text, invalid = decode_text(data if whole else data[:-4])  # a character cut at the end is no fault
    if invalid and text.count("\ufffd") > _MAX_INVALID_SHARE * len(text):
        return None
    return "text"


def detect_document_format(head: bytes, name: str) -> str | None:
    """The document format of a file that starts with `head`, by content: "jsonl", "parquet", "text", "wet"
    or "warc"; None when it is none of them (an archive, binary data). `head` is the file's first
    HEAD_BYTES, or all of it when it is shorter: a shorter head is taken for the whole file. `name` only
    breaks a tie that content leaves open: a WARC file whose first records are all `warcinfo`."""
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    whole = len(head) < HEAD_BYTES
    kind = compression_of(head)
    if kind is None:
        return _classify(head, name, whole)
    data = _decompress_head(kind, head)
    return _classify(data, name, whole and len(data) < HEAD_BYTES) if data else None


# -- reading ----------------------------------------------------------------------------------------------


def _text_documents(path: Path, max_doc_bytes: int, skipped: Counter[str]) -> Iterator[FileDocument]:
    with open_decompressed(path) as stream:
        data = stream.read(max_doc_bytes + 1)
    if len(data) > max_doc_bytes:
        skipped["too_large"] += 1
        return
    if not data:
        return
    text, invalid = decode_text(data)
    yield FileDocument("0", text, path.name, _n_bytes(text, data, invalid), invalid)


def _json_key(record: dict[str, Any], line_no: int, path: Path) -> str:
    key = record.get("id")
    if key is None:
        return str(line_no)
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise DataIntegrityError(f"{path}: line {line_no}: `id` is a {type(key).__name__}, not a string or integer")
    return str(key)


def _jsonl_documents(path: Path, max_doc_bytes: int, skipped: Counter[str]) -> Iterator[FileDocument]:
    limit = _LINE_FACTOR * max_doc_bytes + _LINE_SLACK
    with open_decompressed(path) as stream:
        line_no = 0
        while line := stream.readline(limit + 1):
            line_no += 1
            if len(line) > limit:  # read the rest in pieces, never whole
                while not line.endswith(b"\n") and (line := stream.readline(_READ_CHUNK)):
                    pass
                skipped["too_large"] += 1
                continue
            if not line.strip():
                continue
            decoded, invalid = decode_text(line)
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as exc:
                raise DataIntegrityError(
                    f"{path}: line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from exc
            except RecursionError as exc:
                raise DataIntegrityError(f"{path}: line {line_no}: invalid JSON (nested too deeply)") from exc
            if not isinstance(record, dict):
                raise DataIntegrityError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
            if "text" not in record:
                raise DataIntegrityError(f"{path}: line {line_no}: the record has no `text` field")
            text = record["text"]
            if not isinstance(text, str):
                raise DataIntegrityError(
                    f"{path}: line {line_no}: `text` is {type(text).__name__ if text is not None else 'null'},"
                    " not a string"
                )
            text, n_bytes, surrogates = _utf8_clean(text)
            if n_bytes > max_doc_bytes:
                skipped["too_large"] += 1
                continue
            yield FileDocument(_json_key(record, line_no, path), text, path.name, n_bytes, invalid or surrogates)


def _parquet_batch_rows(meta: pq.FileMetaData) -> int:
    rows, size = meta.num_rows, sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if not rows or not size:
        return _BATCH_ROWS
    return max(1, min(_BATCH_ROWS, BATCH_BYTES * rows // size))


def _parquet_documents(path: Path, max_doc_bytes: int, skipped: Counter[str]) -> Iterator[FileDocument]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataIntegrityError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from exc
    with parquet:
        schema = parquet.schema_arrow
        if "text" not in schema.names:
            raise DataIntegrityError(f"{path}: no `text` column (columns: {', '.join(schema.names) or 'none'})")
        text_type = schema.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise DataIntegrityError(f"{path}: the `text` column is {text_type}, not a string")
        columns = ["text"] + (["id"] if "id" in schema.names else [])
        row = 0
        try:
            batches = parquet.iter_batches(batch_size=_parquet_batch_rows(parquet.metadata), columns=columns)
            for batch in batches:
                # As bytes: Parquet does not guarantee that a string column holds UTF-8, and decoding here
                # replaces what is not, as for every other format.
                texts = batch.column("text").cast(pa.large_binary()).to_pylist()
                ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
                for data, key in zip(texts, ids, strict=True):
                    if data is None:
                        raise DataIntegrityError(f"{path}: row {row}: `text` is null")
                    if len(data) > max_doc_bytes:
                        skipped["too_large"] += 1
                    else:
                        text, invalid = decode_text(data)
                        key = str(row) if key is None else str(key)
                        yield FileDocument(key, text, path.name, _n_bytes(text, data, invalid), invalid)
                    row += 1
        except (pa.ArrowException, OSError) as exc:
            raise DataIntegrityError(f"{path}: unreadable Parquet data near row {row} ({_first_line(exc)})") from exc


def iter_file_documents(
    path: Path, fmt: str, max_doc_bytes: int, skipped: Counter[str] | None = None
) -> Iterator[FileDocument]:
    """The documents of the file at `path` in format `fmt` (one of FORMATS, as detect_document_format
    says), in file order. A document over `max_doc_bytes` is left out and counted in `skipped` under
    `too_large`, and so are records that hold no document, under their reason (see warc.py)."""
    counts: Counter[str] = Counter() if skipped is None else skipped
    if fmt == "text":
        return _text_documents(path, max_doc_bytes, counts)
    if fmt == "jsonl":
        return _jsonl_documents(path, max_doc_bytes, counts)
    if fmt == "parquet":
        return _parquet_documents(path, max_doc_bytes, counts)
    if fmt in ("wet", "warc"):
        from tasks.readers.warc import iter_warc_documents

        return iter_warc_documents(path, fmt, max_doc_bytes, counts)
    raise ConfigError(f"unknown document format {fmt!r}; expected one of {', '.join(FORMATS)}")
