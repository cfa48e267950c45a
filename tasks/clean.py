"""Stage clean: normalise every document, then drop junk with heuristic quality filters.

A filter only decides (datatrove's `filters/base_filter.py`): `decide(text)` returns None to keep a document
or a short snake_case reason to drop it. One runner applies the filters in order, counts kept and dropped
documents per reason, and keeps every dropped document with its reason under `removed/` for audit.

The defaults are tuned for the embedded corpus (English prose from Python's documentation, which mentions
code and holds some `>>>` lines); `CleanConfig.web()` gives the stricter thresholds of the published rules
for real web text. With `languages` set (English by default), the language filter (tasks/language.py)
drops documents in other languages, and the documents it judged, kept or removed, carry their detected
`language` and `language_score`.

Each input shard is one job of the shard map (tasks/shardmap.py): a Prefect task run of its own, run in the
worker pool, and cached on the shard's content, so that a rebuild over an extract version that gained
shards cleans only the new ones. A shard's files keep its name: docs/shard-00000.parquet and
removed/shard-00000.parquet for extract's docs/shard-00000.parquet.

Metrics: docs_in, kept, removed, removed_by_reason {reason: count}, and bytes_in / bytes_out, the UTF-8
size of every input text before cleaning and of the kept texts after it.
"""

import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache, lru_cache
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from storage.errors import DataIntegrityError
from tasks.language import KNOWN_LANGUAGES, Detection, LanguageFilter
from tasks.shardmap import ShardJob, map_shards, scope_of
from tasks.shards import DOCS, input_shards, read_batches
from tasks.stage import Stage, StageConfig, StageContext, stage_task

REMOVED = "removed"

# -- normalisation --------------------------------------------------------------------------------------

# Characters that separate lines or words (str.split and str.splitlines treat them so): they become a
# newline or a space rather than disappearing, which would glue words and lines together.
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
_WORD_SEPARATORS = re.compile("[\x1c-\x1f]")
# Unicode category Cc is exactly these ranges; tab and newline are kept because they carry layout.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# Every character one of the three rewrites above touches: one search for them spares the three passes over
# the text that almost every document (no such character at all) would otherwise take.
_REWRITTEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


# The ASCII characters that none of the rewrites above touches. ASCII text is NFC, and once it holds only
# these, its only blanks are space, tab and newline: unless a space or tab ends a line or three newlines
# run, normalize_text changes nothing in it but its ends. Nine in ten documents of the embedded corpus are
# such text, and these checks (in C, on bytes or with a short needle) cost half the rewrite they spare.
_ASCII_UNTOUCHED = bytes([0x09, 0x0A, *range(0x20, 0x7F)])


def normalize_text(text: str) -> str:
    """NFC, \\n newlines, no control characters but \\n and \\t, no trailing blanks, at most one blank line."""
    if (
        text.isascii()
        and not text.encode("ascii").translate(None, _ASCII_UNTOUCHED)
        and " \n" not in text
        and "\t\n" not in text
        and "\n\n\n" not in text
    ):
        return text.strip()
    text = unicodedata.normalize("NFC", text)
    if _REWRITTEN.search(text):
        text = _LINE_BREAKS.sub("\n", text)
        text = _WORD_SEPARATORS.sub(" ", text)
        text = _CONTROL_CHARS.sub("", text)
    text = "\n".join(map(str.rstrip, text.split("\n")))
    while "\n\n\n" in text:  # each pass shortens every run of three or more newlines, until two are left
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


# -- what the filters look at ---------------------------------------------------------------------------
# Several filters read the same words and lines of one document in a row; caching the last split saves
# re-splitting a long document once per filter. The words are most of the work, so they are counted without
# making one string per word: from the text written as one byte per character (its class), by bytes methods
# that run in C, or, for the documents of a batch all at once, by numpy (count_words_together). Lines and
# paragraphs are few; str methods are mapped over them (map calls them from C).

_PUNCTUATION = string.punctuation + "“”‘’«»…–—"
# Each character's class, as one byte: " " whitespace (what str.split splits on), "p" the punctuation
# stripped off words, "a" a letter (str.isalpha), "b" anything else. A text written as the bytes of its
# characters' classes gives every word count with bytes methods, in C, with no string made per word.
_SPACE, _PUNCT, _LETTER, _OTHER = b" ", b"p", b"a", b"b"
_LEADING_PUNCTUATION = re.compile(b" p+")
_TRAILING_PUNCTUATION = re.compile(b"p+ ")
_WORD_CHARS = bytes.maketrans(_OTHER, _LETTER)  # what is not punctuation stays when words are stripped


def _class_of(ch: str) -> bytes:
    if ch.isspace():
        return _SPACE
    return _PUNCT if ch in _PUNCTUATION else _LETTER if ch.isalpha() else _OTHER


_ASCII_CLASSES = bytes.maketrans(bytes(range(128)), b"".join(_class_of(chr(c)) for c in range(128)))


_BMP = 0x10000  # the code points below it (the Basic Multilingual Plane) are nearly every text's


@cache
def _unicode_classes(limit: int) -> np.ndarray:
    """The class of every code point below `limit`, as _class_of gives it, made once per process: for the
    BMP in ~5 ms, for all 1.1 million in ~0.1 s (which each worker process would pay)."""
    every = "".join(map(chr, range(limit)))
    classes = np.full(len(every), ord(_OTHER), np.uint8)
    classes[np.fromiter(map(str.isalpha, every), bool, len(every))] = ord(_LETTER)
    classes[np.fromiter(map(str.isspace, every), bool, len(every))] = ord(_SPACE)
    classes[[ord(ch) for ch in _PUNCTUATION]] = ord(_PUNCT)
    return classes


def _classes(text: str) -> bytes:
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_CLASSES)
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    limit = _BMP if code_points.max() < _BMP else sys.maxunicode + 1
    return _unicode_classes(limit)[code_points].tobytes()


class WordCounts(NamedTuple):
    raw: int  # whitespace-separated words
    words: int  # of them, those with something left once the punctuation around them is stripped
    alpha: int  # whitespace-separated words holding at least one letter
    kept_chars: int  # characters of the words that stripping never removes (not punctuation)
    punctuation: int  # punctuation characters in the words, some of which stripping removes


# The counts of the documents of the batch being judged, made for all of them at once (words_counted),
# keyed by the text itself: whatever a filter finds there is its text's, in any thread.
_COUNTED: dict[str, WordCounts] = {}


def _word_counts(text: str) -> WordCounts:
    counts = _COUNTED.get(text)
    return counts if counts is not None else _count_words(text)


@lru_cache(maxsize=1)
def _count_words(text: str) -> WordCounts:
    classes = _classes(text)
    # A word starts where a blank is followed by anything else (blanks added at both ends).
    shape = _SPACE + classes.translate(_WORD_CHARS) + _SPACE
    raw = shape.count(b" a") + shape.count(b" p")
    words = shape.replace(_PUNCT, b"").count(b" a")
    alpha = (_SPACE + classes.translate(None, _PUNCT + _OTHER)).count(b" a")
    return WordCounts(raw, words, alpha, shape.count(_LETTER), shape.count(_PUNCT))


def count_words_together(texts: Sequence[str]) -> list[WordCounts]:
    """The WordCounts of every text, as each alone gives them, counted for all at once: the classes of all
    the texts as one array, a blank before each, so that numpy finds the word starts of a whole batch in a
    few passes (~7 ns a character, where counting texts one by one with bytes methods takes ~15)."""
    if not texts:
        return []
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    joined = _SPACE + _SPACE.join(map(_classes, texts)) + _SPACE
    # Text i, with the blank before it, is joined[starts[i]:starts[i + 1]]; the last blank belongs to none.
    starts = np.zeros(len(texts), np.int64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    classes = np.frombuffer(joined, np.uint8)[:-1]
    blanks = _per_text(classes == ord(_SPACE), starts) - 1
    punctuation = _per_text(classes == ord(_PUNCT), starts)
    letters = _per_text(classes == ord(_LETTER), starts)
    raw = _word_starts(joined, starts)
    # Without the punctuation (and then without what is not a letter either), each text starts that many
    # characters earlier.
    words = _word_starts(joined.translate(None, _PUNCT), starts - _before(punctuation))
    alpha = _word_starts(joined.translate(None, _PUNCT + _OTHER), starts - _before(lengths - blanks - letters))
    kept_chars = lengths - blanks - punctuation
    columns = (raw, words, alpha, kept_chars, punctuation)
    return list(map(WordCounts._make, zip(*(column.tolist() for column in columns), strict=True)))


def _per_text(flags: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(flags.view(np.uint8), starts, dtype=np.int64)


def _before(counts: np.ndarray) -> np.ndarray:
    """For each text, the sum of `counts` over the texts before it."""
    return np.concatenate(([0], np.cumsum(counts[:-1])))


def _word_starts(classes: bytes, starts: np.ndarray) -> np.ndarray:
    """Per text, the blanks followed by anything else: where its words start."""
    blank = np.frombuffer(classes, np.uint8) == ord(_SPACE)
    return _per_text(blank[:-1] & ~blank[1:], starts)


# The texts of a batch are counted together in runs that end once they hold this many characters: numpy's
# passes over a few hundred KB stay in the core's cache, and run a third faster than over a batch of 2 MB.
_TOGETHER_CHARS = 1 << 18


@contextmanager
def words_counted(texts: Sequence[str]) -> Iterator[None]:
    """Within this block, the filters find the word counts of `texts` made together (count_words_together)."""
    try:
        start = chars = 0
        for end, text in enumerate(texts, 1):
            chars += len(text)
            if chars >= _TOGETHER_CHARS or end == len(texts):
                _COUNTED.update(zip(texts[start:end], count_words_together(texts[start:end]), strict=True))
                start, chars = end, 0
        yield
    finally:
        _COUNTED.clear()


@lru_cache(maxsize=1)
def _word_chars(text: str) -> int:
    """The characters of the words once the punctuation around them is stripped, in all: the punctuation
    runs that touch a blank are those that stripping removes."""
    shape = _SPACE + _classes(text).translate(_WORD_CHARS) + _SPACE
    stripped = _TRAILING_PUNCTUATION.sub(_SPACE, _LEADING_PUNCTUATION.sub(_SPACE, shape))
    return len(stripped) - stripped.count(_SPACE)


@lru_cache(maxsize=1)
def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words, without the punctuation around them (a word of punctuation only goes)."""
    return tuple(filter(None, map(str.strip, text.split(), repeat(_PUNCTUATION))))


@lru_cache(maxsize=1)
def _lines(text: str) -> tuple[str, ...]:
    """Non-blank lines."""
    return tuple(filter(str.strip, text.split("\n")))


@lru_cache(maxsize=1)
def _paragraphs(text: str) -> tuple[str, ...]:
    return tuple(filter(None, map(str.strip, text.split("\n\n"))))


def _duplicate_share(items: Sequence[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters), as Gopher counts them.

    The repeats are what the first occurrences (the distinct items) leave over, in count and in characters."""
    if not items:
        return 0.0, 0.0
    distinct = set(items)
    if len(distinct) == len(items):  # most documents: nothing repeats, and no characters need counting
        return 0.0, 0.0
    chars = sum(map(len, items))
    return (len(items) - len(distinct)) / len(items), (chars - sum(map(len, distinct))) / max(1, chars)


# -- filters ------------------------------------------------------------------------------------------


class DocumentFilter(Protocol):
    def decide(self, text: str) -> str | None:
        """None keeps the document; a short snake_case reason drops it."""
        ...


class ReplacementCharFilter:
    """Drops text that was mostly not UTF-8: extract decodes such bytes as U+FFFD."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction

    def decide(self, text: str) -> str | None:
        if text and text.count("\ufffd") / len(text) > self.max_fraction:
            return "invalid_utf8"
        return None


class WordCountFilter:
    def __init__(self, min_words: int, max_words: int) -> None:
        self.min_words = min_words
        self.max_words = max_words

    def decide(self, text: str) -> str | None:
        n = _word_counts(text).words
        if n < self.min_words:
            return "too_short"
        if n > self.max_words:
            return "too_long"
        return None


class PhraseFilter:
    """Drops a document containing a phrase (C4: placeholder text 'lorem ipsum'; code: '{')."""

    def __init__(self, phrase: str, reason: str, ignore_case: bool = True) -> None:
        self.phrase = phrase.lower() if ignore_case else phrase
        self.reason = reason
        self.ignore_case = ignore_case

    def decide(self, text: str) -> str | None:
        haystack = text.lower() if self.ignore_case else text
        return self.reason if self.phrase in haystack else None


class MeanWordLengthFilter:
    def __init__(self, min_length: float, max_length: float) -> None:
        self.min_length = min_length
        self.max_length = max_length

    def decide(self, text: str) -> str | None:
        counts = _word_counts(text)
        if not counts.words:
            return "mean_word_length"
        # The stripped words hold between kept_chars and kept_chars + punctuation characters: when both
        # means are in range, so is the exact one (division is monotonic), which then needs no stripping.
        low = counts.kept_chars / counts.words
        if self.min_length <= low and (counts.kept_chars + counts.punctuation) / counts.words <= self.max_length:
            return None
        mean = _word_chars(text) / counts.words
        return None if self.min_length <= mean <= self.max_length else "mean_word_length"


class SymbolWordRatioFilter:
    """Hash signs and ellipses per word: high in tag clouds, link lists and truncated snippets (Gopher)."""

    def __init__(self, max_ratio: float) -> None:
        self.max_ratio = max_ratio

    def decide(self, text: str) -> str | None:
        words = _word_counts(text).raw
        if not words:
            return None
        hashes = text.count("#")
        ellipses = text.count("...") + text.count("…")
        if max(hashes, ellipses) / words > self.max_ratio:
            return "symbol_word_ratio"
        return None


class AlphaWordsFilter:
    def __init__(self, min_fraction: float) -> None:
        self.min_fraction = min_fraction

    def decide(self, text: str) -> str | None:
        counts = _word_counts(text)
        if not counts.raw:
            return None
        return "alpha_words_frac" if counts.alpha / counts.raw < self.min_fraction else None


class StopWordsFilter:
    """Real English prose uses function words; keyword lists and boilerplate do not (Gopher)."""

    STOP_WORDS: ClassVar[frozenset[str]] = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
    # Between two spaces, the most frequent first (English word counts).
    _SPACED: ClassVar[tuple[str, ...]] = (" the ", " of ", " and ", " to ", " be ", " that ", " with ", " have ")

    def __init__(self, min_count: int) -> None:
        self.min_count = min_count

    def decide(self, text: str) -> str | None:
        # Most prose has enough of them written in lower case between two spaces, found without splitting
        # it into words; only where those are too few are the words looked at, lowered one by one.
        present = 0
        for spaced in self._SPACED:
            present += spaced in text
            if present >= self.min_count:
                return None
        found = self.STOP_WORDS.intersection(map(str.lower, set(_words(text))))
        return "stop_words" if len(found) < self.min_count else None


_BULLETS = ("•", "‣", "●", "○", "◦", "■", "□", "▪", "▫", "➢", "➤", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")


def is_bullet_line(line: str) -> bool:
    return line.lstrip().startswith(_BULLETS)


def is_ellipsis_line(line: str) -> bool:
    return line.endswith(_ELLIPSES)


# Every bullet is one character: a non-blank line is a bullet line when its first character once stripped
# is one (a set lookup, where startswith would try the bullets one by one).
_BULLET_CHARS = frozenset(_BULLETS)

# The same counts as summing the predicates above over the non-blank lines, by methods mapped from C.
_LINE_COUNTS: dict[Callable[[str], bool], Callable[[Sequence[str]], int]] = {
    is_bullet_line: lambda lines: sum(map(_BULLET_CHARS.__contains__, map(itemgetter(0), map(str.lstrip, lines)))),
    is_ellipsis_line: lambda lines: sum(map(str.endswith, lines, repeat(_ELLIPSES))),
}


class LineShareFilter:
    """Drops a document when too large a share of its non-blank lines matches `predicate`."""

    def __init__(self, predicate: Callable[[str], bool], max_fraction: float, reason: str) -> None:
        self.predicate = predicate
        self.max_fraction = max_fraction
        self.reason = reason
        self._count = _LINE_COUNTS.get(predicate, lambda lines: sum(map(predicate, lines)))

    def decide(self, text: str) -> str | None:
        lines = _lines(text)
        if not lines:
            return None
        share = self._count(lines) / len(lines)
        return self.reason if share > self.max_fraction else None


class RepetitionFilter:
    """Repeated lines and paragraphs, by count and by characters (Gopher's repetition rules)."""

    def __init__(
        self, max_line_frac: float, max_line_char_frac: float, max_para_frac: float, max_para_char_frac: float
    ) -> None:
        self.max_line_frac = max_line_frac
        self.max_line_char_frac = max_line_char_frac
        self.max_para_frac = max_para_frac
        self.max_para_char_frac = max_para_char_frac

    def decide(self, text: str) -> str | None:
        para_frac, para_char_frac = _duplicate_share(_paragraphs(text))
        if para_frac > self.max_para_frac:
            return "dup_para_frac"
        if para_char_frac > self.max_para_char_frac:
            return "dup_para_char_frac"
        line_frac, line_char_frac = _duplicate_share(_lines(text))
        if line_frac > self.max_line_frac:
            return "dup_line_frac"
        if line_char_frac > self.max_line_char_frac:
            return "dup_line_char_frac"
        return None


_END_PUNCTUATION = (".", "!", "?", '"', "'")
_END_CHARS = frozenset(_END_PUNCTUATION)  # each one character: a line ends with one when its last is one


class LinePunctuationFilter:
    """Too few lines ending like a sentence: menus, tables, lists of links (FineWeb)."""

    def __init__(self, min_fraction: float) -> None:
        self.min_fraction = min_fraction

    def decide(self, text: str) -> str | None:
        if self.min_fraction <= 0:  # no share falls below it (the default): the lines need no look
            return None
        lines = _lines(text)
        if not lines:
            return None
        share = sum(map(_END_CHARS.__contains__, map(itemgetter(-1), lines))) / len(lines)  # non-blank: not empty
        return "line_punct_frac" if share < self.min_fraction else None


# -- configuration ------------------------------------------------------------------------------------


class CleanConfig(StageConfig):
    """Quality-filter thresholds. Sources: Gopher = MassiveWeb rules (Rae et al. 2021, appendix A1.1),
    C4 (Raffel et al. 2020, section 2.2), FineWeb (Penedo et al. 2024, datatrove's FineWebQualityFilter)."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"workers"})

    max_replacement_char_frac: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Drop (invalid_utf8) when more than this share of characters are U+FFFD, i.e. bytes that "
        "were not UTF-8. Ours: clean text has essentially none; a binary or mis-encoded file has many.",
    )
    min_words: int = Field(
        default=20,
        ge=0,
        le=1_000_000,
        description="Drop (too_short) below this many words. Gopher: 50; lower here so that short docstrings stay.",
    )
    max_words: int = Field(
        default=100_000,
        ge=1,
        le=100_000_000,
        description="Drop (too_long) above this many words. Gopher: 100,000.",
    )
    drop_lorem_ipsum: bool = Field(
        default=True, description="Drop (lorem_ipsum) documents with the placeholder 'lorem ipsum'. C4: yes."
    )
    drop_curly_bracket: bool = Field(
        default=False,
        description="Drop (curly_bracket) documents containing '{', a sign of code. C4: yes; off here "
        "because documentation about Python mentions dicts and format strings.",
    )
    min_mean_word_length: float = Field(
        default=3.0,
        ge=0.0,
        le=100.0,
        description="Drop (mean_word_length) below this mean word length in characters. Gopher: 3.",
    )
    max_mean_word_length: float = Field(
        default=12.0,
        ge=1.0,
        le=1000.0,
        description="Drop (mean_word_length) above this mean word length. Gopher: 10; 12 here because "
        "identifiers such as `os.path.join` read as long words.",
    )
    max_symbol_word_ratio: float = Field(
        default=0.1,
        ge=0.0,
        le=10.0,
        description="Drop (symbol_word_ratio) above this many '#' or ellipses per word. Gopher: 0.1.",
    )
    min_alpha_words_frac: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Drop (alpha_words_frac) when fewer words than this share contain a letter. Gopher: 0.8; "
        "0.7 here so that prose with short `>>>` examples stays.",
    )
    min_stop_words: int = Field(
        default=1,
        ge=0,
        le=8,
        description="Drop (stop_words) when fewer of the English words the, be, to, of, and, that, have, "
        "with occur. Gopher: 2; 1 here because terse docstrings ('Return the ...') are still prose.",
    )
    max_bullet_lines_frac: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Drop (bullet_lines) when more than this share of lines start with a bullet. Gopher: 0.9.",
    )
    max_ellipsis_lines_frac: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Drop (ellipsis_lines) when more than this share of lines end with an ellipsis. Gopher: 0.3.",
    )
    max_dup_line_frac: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Drop (dup_line_frac) when more than this share of lines repeat an earlier line. Gopher: 0.3.",
    )
    max_dup_line_char_frac: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="Drop (dup_line_char_frac) when repeated lines hold more than this share of the line "
        "characters. Gopher: 0.2.",
    )
    max_dup_para_frac: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Drop (dup_para_frac) when more than this share of paragraphs repeat an earlier one. Gopher: 0.3.",
    )
    max_dup_para_char_frac: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="Drop (dup_para_char_frac) when repeated paragraphs hold more than this share of the "
        "paragraph characters. Gopher: 0.2.",
    )
    min_line_punct_frac: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Drop (line_punct_frac) when fewer lines than this share end in . ! ? or a quote. "
        "FineWeb: 0.12; off here because documentation is full of headings and signatures.",
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="Drop (language) documents whose detected language is not one of these ISO 639-1 codes "
        "(e.g. en, fr, de); empty: no language filter. Ours: English, the language of the embedded corpus; "
        "FineWeb keeps English the same way. The stop words counted are English: with other languages, set "
        "min_stop_words to 0.",
    )
    min_language_score: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Drop (language) when less than this share of the text is in the detected language. Ours, "
        "measured (tasks/language.py): all but four of the embedded corpus's English documents score 0.86 or "
        "more, a document half in one language and half in another about 0.5; so a document goes when most of "
        "it is not in a language kept. (FineWeb's 0.65 is a fastText probability, another scale.)",
    )
    language_sample_chars: int = Field(
        default=4096,
        ge=64,
        le=10_000_000,
        description="Detect the language on this many leading characters of a document. Ours, measured: on "
        "English documents of ~60 KB the first 4,096 name the language as the whole text does, with scores "
        "from 0.97 (whole: 0.99), 14 times as fast.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Processes cleaning shards at once (1 runs inline). Does not change the output.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        problems = []
        if self.min_words > self.max_words:
            problems.append(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            problems.append(
                f"min_mean_word_length ({self.min_mean_word_length}) is above "
                f"max_mean_word_length ({self.max_mean_word_length})"
            )
        unknown = [code for code in self.languages if code not in KNOWN_LANGUAGES]
        if unknown:
            problems.append(
                f"languages {unknown} are not ISO 639-1 codes the language detector knows (such as en, fr, de)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def web(cls, **overrides: Any) -> "CleanConfig":
        """The published thresholds (Gopher, C4, FineWeb), for real web text such as OpenWebText."""
        strict: dict[str, Any] = {
            "min_words": 50,
            "max_mean_word_length": 10.0,
            "min_alpha_words_frac": 0.8,
            "min_stop_words": 2,
            "drop_curly_bracket": True,
            "min_line_punct_frac": 0.12,
        }
        return cls(**{**strict, **overrides})


def build_filters(cfg: CleanConfig) -> list[DocumentFilter]:
    """The filters in the order they are tried: a document's reason is that of the first one that drops it."""
    filters: list[DocumentFilter] = [
        ReplacementCharFilter(cfg.max_replacement_char_frac),
        WordCountFilter(cfg.min_words, cfg.max_words),
    ]
    if cfg.languages:
        # Before the other filters, which count English stop words: a French document is dropped for its
        # language, not for lacking "the".
        filters.append(LanguageFilter(frozenset(cfg.languages), cfg.min_language_score, cfg.language_sample_chars))
    if cfg.drop_lorem_ipsum:
        filters.append(PhraseFilter("lorem ipsum", "lorem_ipsum"))
    if cfg.drop_curly_bracket:
        filters.append(PhraseFilter("{", "curly_bracket", ignore_case=False))
    filters += [
        MeanWordLengthFilter(cfg.min_mean_word_length, cfg.max_mean_word_length),
        SymbolWordRatioFilter(cfg.max_symbol_word_ratio),
        AlphaWordsFilter(cfg.min_alpha_words_frac),
        StopWordsFilter(cfg.min_stop_words),
        LineShareFilter(is_bullet_line, cfg.max_bullet_lines_frac, "bullet_lines"),
        LineShareFilter(is_ellipsis_line, cfg.max_ellipsis_lines_frac, "ellipsis_lines"),
        RepetitionFilter(
            cfg.max_dup_line_frac, cfg.max_dup_line_char_frac, cfg.max_dup_para_frac, cfg.max_dup_para_char_frac
        ),
        LinePunctuationFilter(cfg.min_line_punct_frac),
    ]
    return filters


def first_drop(text: str, filters: Sequence[DocumentFilter]) -> tuple[int, str | None]:
    """(the index of the first filter that drops `text`, its reason), or (len(filters), None) when every
    filter keeps it: the filters before that index kept it, and it never reached those after."""
    for index, doc_filter in enumerate(filters):
        reason = doc_filter.decide(text)
        if reason is not None:
            return index, reason
    return len(filters), None


def first_reason(text: str, filters: Sequence[DocumentFilter]) -> str | None:
    """The reason of the first filter that drops `text`, or None when every filter keeps it."""
    return first_drop(text, filters)[1]


# -- one shard ----------------------------------------------------------------------------------------

# With the language filter on, every document that reached it (every kept one, and every removed one but
# those dropped by a filter before it: invalid_utf8, too_short, too_long) carries the language detected on
# it and that language's share of its text; the others null (their language was never looked at).
LANGUAGE_FIELDS = (pa.field("language", pa.string()), pa.field("language_score", pa.float64()))


def clean_shard(src: Path, docs_out: Path, removed_out: Path, cfg: CleanConfig) -> dict[str, Any]:
    """Clean one Parquet shard: kept documents to `docs_out`, dropped ones with a `reason` to `removed_out`.

    Both outputs are always written (possibly with no rows). Kept and removed documents carry the
    normalised text that the filters judged, with `n_bytes` recomputed as its UTF-8 size, and with the
    language filter on, `language` and `language_score` (see LANGUAGE_FIELDS).
    """
    filters = build_filters(cfg)
    language = next((f for f in filters if isinstance(f, LanguageFilter)), None)
    language_at = filters.index(language) if language is not None else len(filters)
    try:
        schema = pq.read_schema(src)
    except (OSError, pa.ArrowException) as exc:
        raise DataIntegrityError(f"{src}: not a readable Parquet document shard ({exc})") from exc
    missing = {"doc_id", "text"} - set(schema.names)
    if missing:
        raise DataIntegrityError(f"{src}: lacks the column(s) {sorted(missing)}")
    added = [pa.field("n_bytes", pa.int64())] + (list(LANGUAGE_FIELDS) if language is not None else [])
    for added_field in added:
        if added_field.name not in schema.names:
            schema = schema.append(added_field)
    removed_schema = schema.append(pa.field("reason", pa.string()))
    text_type = schema.field("text").type
    counts: dict[str, Any] = {"docs_in": 0, "kept": 0, "removed": 0, "bytes_in": 0, "bytes_out": 0}
    reasons: Counter[str] = Counter()
    with (
        pq.ParquetWriter(docs_out, schema, compression="zstd") as kept_writer,
        pq.ParquetWriter(removed_out, removed_schema, compression="zstd") as removed_writer,
    ):
        for batch in read_batches(src):
            table = pa.Table.from_batches([batch])
            texts = table.column("text")
            counts["bytes_in"] += pc.sum(pc.binary_length(texts)).as_py() or 0  # a null text is 0 bytes
            originals = texts.to_pylist()
            cleaned = [normalize_text(text or "") for text in originals]
            verdicts: list[str | None] = []
            found: list[Detection | None] = []
            with words_counted(cleaned):
                for text in cleaned:
                    at, reason = first_drop(text, filters)
                    verdicts.append(reason)
                    if language is not None:  # right after it, the detection the filter cached is this text's
                        found.append(language.detect(text) if at >= language_at else None)
            # normalize_text hands back the very text it did not change (most): only the others are new.
            changed = [new is not old for new, old in zip(cleaned, originals, strict=True)]
            cleaned_array = texts
            if any(changed):
                replacements = pa.array(list(compress(cleaned, changed)), type=text_type)
                cleaned_array = pc.replace_with_mask(texts, pa.array(changed, pa.bool_()), replacements)
            sizes = pc.binary_length(cleaned_array).cast(pa.int64())
            table = _set_column(table, "text", cleaned_array)
            table = _set_column(table, "n_bytes", sizes)
            if language is not None:
                codes = [None if f is None else f.language for f in found]
                scores = [None if f is None else f.score for f in found]
                table = _set_column(table, "language", pa.array(codes, pa.string()))
                table = _set_column(table, "language_score", pa.array(scores, pa.float64()))
            table = table.select(schema.names)
            keep = [i for i, reason in enumerate(verdicts) if reason is None]
            drop = [i for i, reason in enumerate(verdicts) if reason is not None]
            kept_writer.write_table(table.take(pa.array(keep, pa.int64())).cast(schema))
            dropped = table.take(pa.array(drop, pa.int64())).append_column(
                "reason", pa.array([verdicts[i] for i in drop], pa.string())
            )
            removed_writer.write_table(dropped.cast(removed_schema))
            counts["docs_in"] += len(verdicts)
            counts["kept"] += len(keep)
            counts["removed"] += len(drop)
            counts["bytes_out"] += pc.sum(sizes.take(pa.array(keep, pa.int64()))).as_py() or 0
            reasons.update(verdicts[i] for i in drop)
    counts["removed_by_reason"] = dict(reasons)
    return counts


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _clean_shard_job(out: str, src: str, name: str, cfg: CleanConfig) -> dict[str, Any]:
    """One shard as a shard-map job: `out/docs/<name>` and `out/removed/<name>`."""
    for folder in (DOCS, REMOVED):
        (Path(out) / folder).mkdir()
    return clean_shard(Path(src), Path(out) / DOCS / name, Path(out) / REMOVED / name, cfg)


def clean_shards(ctx: StageContext, shards: Sequence[Path], cfg: CleanConfig) -> list[dict[str, Any]]:
    """Clean every shard of the extract input into `ctx.out/docs/<its name>` and `ctx.out/removed/<its name>`.

    One shard-map job per shard, cached on the shard's content (and name, which its files take), so a
    rebuild over an input that gained shards cleans only those. Each shard writes only its own files and
    results come back in shard order, so the output does not depend on the worker count.
    """
    files = ctx.input_manifest("extract")["files"]
    jobs = []
    for src in shards:
        entry = files.get(f"{DOCS}/{src.name}")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise DataIntegrityError(f"{src}: not listed with a sha256 in its version's manifest.json")
        key = {"input": entry["sha256"], "name": src.name}
        jobs.append(ShardJob(name=src.stem, args=(str(src), src.name, cfg), key=key, dest=ctx.out))
    return map_shards(scope_of(ctx), "clean", _clean_shard_job, jobs, cfg.workers)


def merge_counts(per_shard: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"docs_in": 0, "kept": 0, "removed": 0, "bytes_in": 0, "bytes_out": 0}
    reasons: Counter[str] = Counter()
    for counts in per_shard:
        for key in total:
            total[key] += counts[key]
        reasons.update(counts["removed_by_reason"])
    total["removed_by_reason"] = dict(sorted(reasons.items()))
    return total


def build(ctx: StageContext, cfg: CleanConfig) -> dict[str, Any]:
    shards = input_shards(ctx.input_path("extract"))
    ctx.log.info("cleaning %d shard(s) with %d worker(s)", len(shards), min(cfg.workers, len(shards)))
    metrics = merge_counts(clean_shards(ctx, shards, cfg))
    if metrics["docs_in"] == 0:
        raise DataIntegrityError(f"{ctx.input_path('extract') / DOCS}: the shards hold no documents")
    ctx.log.info(
        "kept %d of %d documents; removed %s", metrics["kept"], metrics["docs_in"], metrics["removed_by_reason"]
    )
    if metrics["kept"] == 0:
        ctx.log.warning("every document was removed: see removed/*.parquet for the reasons")
    return metrics


# unicodedata's tables (NFC) come with the interpreter; pycld2's with its release.
STAGE = Stage(
    name="clean",
    module=__name__,
    config=CleanConfig,
    build=build,
    inputs=("extract",),
    libraries=("pyarrow", "pycld2", "python"),
)
clean_task = stage_task(STAGE)
