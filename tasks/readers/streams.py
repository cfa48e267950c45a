"""Compressed streams: what a stream is (by magic bytes), how it is decompressed, and the checks that turn
a damaged stream or a decompression bomb into `Damage` with a short reason instead of a crash or a silent end.

Compression: xz, gzip, bzip2, zstd. A stream starting with xz's, gzip's or zstd's magic, or with the first
bytes of one cut short (none of those is valid UTF-8), is compressed; bzip2's magic is ASCII, so only its
full stream signature (with the first block's magic) counts and a text may start with "BZh9".
"""

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from typing import Any

import zstandard

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
BLOCK = tarfile.BLOCKSIZE
ARCHIVE_SUFFIXES = (".tar", ".xz", ".txz", ".tgz", ".gz", ".bz2", ".zst", ".zstd")
# An OpenWebText inner archive is ~0.6 MB (12 GB in ~20,600 of them) and a few MB decompressed: 1 GiB is
# hundreds of times that, and still a bounded amount to read.
DEFAULT_MAX_ARCHIVE_BYTES = 1 << 30
# xz packs English text ~3-10x (OpenWebText: 38 GB of text in 12 GB); zeros pack 1,000x (gzip) to 300,000x
# (bzip2). 200x leaves room for repetitive pages and stops a bomb after a small fraction of it.
DEFAULT_MAX_EXPANSION_RATIO = 200.0
# The ratio is judged only past this many decompressed bytes: a tar's headers and 10 KiB end padding are
# mostly zeros, so an empty or tiny tar packs 200-500x, and reading 16 MiB costs nothing.
RATIO_FLOOR_BYTES = 16 << 20
# zstd input fed to the decompressor per step. Its densest block (RLE) turns 4 bytes into 128 KiB, so one
# step can emit at most ~4 MiB, whatever the stream: a bomb is read in bounded pieces.
_ZSTD_STEP = 128
# What a decompressor's read is asked for when its caller asks for everything: the budget is judged per read.
_READ_CHUNK = 1 << 16
# Errors the decompressors raise for damaged or truncated data (bz2 reports damage as a bare OSError).
_DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)
# Reasons that are refusals (the data may be intact) rather than damage.
BOMB_REASONS = frozenset({"too_large", "expansion_ratio", "too_deep"})


class Damage(Exception):
    """Data that is not what it should be: a stream that does not decompress or does not hold a tar, or one
    refused as a bomb. `reason` is the short code the metrics record; the message is one line."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = " ".join(detail.split())
        super().__init__(self.detail)

    def inside(self, name: str) -> "Damage":
        """The same damage, as seen from the archive that holds the member `name`."""
        return Damage(self.reason, f"{name}: {self.detail}")


class Peekable:
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


class Budget:
    """How many decompressed bytes one archive may produce (all its decompressors together): the smaller of
    `max_bytes` and `max_ratio` times its own size (at least RATIO_FLOOR_BYTES). Judged on every read, so
    that a bomb is stopped one read past the limit, never read to its end."""

    def __init__(self, compressed: int, max_ratio: float, max_bytes: int | None) -> None:
        by_ratio = max(int(compressed * max_ratio), RATIO_FLOOR_BYTES)
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
            raise Damage(self.reason, self.detail)


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


def _decompressor(kind: str, stream: Any) -> Any:
    if kind == "xz":
        return lzma.LZMAFile(stream)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(stream)
    return _ZstdReader(stream)


class Decoded:
    """A decompressed stream whose damage, whatever the decompressor calls it, is raised as `Damage`
    (truncated, or corrupt_stream), and whose output is charged to `budget`. An error of the stream
    underneath passes unchanged."""

    def __init__(self, kind: str, raw: Any, budget: Budget) -> None:
        self.kind = kind
        self._source = _Source(raw)
        self._budget = budget
        self._file = _decompressor(kind, self._source)

    def __enter__(self) -> "Decoded":
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
            raise Damage(reason, f"{self.kind} data: {type(exc).__name__}: {exc}") from exc
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
    block = head[:BLOCK]
    if len(block) == BLOCK and not block.strip(b"\0"):
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


def archive_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((suffix for suffix in ARCHIVE_SUFFIXES if lower.endswith(suffix)), None)


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
    return archive_suffix(name) is not None


def unreadable(name: str, head: bytes) -> Damage | None:
    """Why a member read as an archive cannot be one, known from its first bytes alone; None when it may be."""
    if is_tar(head) or compression_of(head) is not None:
        return None
    if not head:
        return Damage("truncated", "empty, though named like an archive")
    cut = _cut_signature(head)
    if cut is not None:
        return Damage("truncated", f"{len(head)} byte(s) in all: the start of the {cut} signature, cut short")
    suffix = archive_suffix(name)
    if suffix is not None and suffix != ".tar":
        return Damage(
            "corrupt_stream", f"named {suffix}, but starts with {head[:8].hex()}: no xz, gzip, bzip2 or zstd stream"
        )
    return None  # reading it says not_a_tar
