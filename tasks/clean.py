"""Stage clean: normalise every document, then drop junk with heuristic quality filters.

A filter only decides (datatrove's `filters/base_filter.py`): `decide(text)` returns None to keep a document
or a short snake_case reason to drop it. One runner applies the filters in order, counts kept and dropped
documents per reason, and keeps every dropped document with its reason under `removed/` for audit.

The defaults are tuned for the embedded corpus (English prose from Python's documentation, which mentions
code and holds some `>>>` lines); `CleanConfig.web()` gives the stricter thresholds of the published rules
for real web text. Shards are cleaned in separate processes, each writing its own output files.

Metrics: docs_in, kept, removed, removed_by_reason {reason: count}, and bytes_in / bytes_out, the UTF-8
size of every input text before cleaning and of the kept texts after it.
"""

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from storage.errors import DataIntegrityError
from tasks.shards import DOCS, input_shards, map_jobs, process_pool, read_batches
from tasks.stage import Stage, StageConfig, StageContext, stage_task

T = TypeVar("T")

REMOVED = "removed"

# -- normalisation --------------------------------------------------------------------------------------

# Characters that separate lines or words (str.split and str.splitlines treat them so): they become a
# newline or a space rather than disappearing, which would glue words and lines together.
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
_WORD_SEPARATORS = re.compile("[\x1c-\x1f]")
# Unicode category Cc is exactly these ranges; tab and newline are kept because they carry layout.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, \\n newlines, no control characters but \\n and \\t, no trailing blanks, at most one blank line."""
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _WORD_SEPARATORS.sub(" ", text)
    text = _CONTROL_CHARS.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_LINE_RUNS.sub("\n\n", text)
    return text.strip()


# -- what the filters look at ---------------------------------------------------------------------------
# Several filters read the same words and lines of one document in a row; caching the last split saves
# re-splitting a long document once per filter.

_PUNCTUATION = string.punctuation + "“”‘’«»…–—"


@lru_cache(maxsize=1)
def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words, without the punctuation around them (a word of punctuation only goes)."""
    return tuple(word for word in (raw.strip(_PUNCTUATION) for raw in text.split()) if word)


@lru_cache(maxsize=1)
def _raw_words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


@lru_cache(maxsize=1)
def _lines(text: str) -> tuple[str, ...]:
    """Non-blank lines."""
    return tuple(line for line in text.split("\n") if line.strip())


@lru_cache(maxsize=1)
def _paragraphs(text: str) -> tuple[str, ...]:
    return tuple(p for p in (p.strip() for p in text.split("\n\n")) if p)


def _duplicate_share(items: Sequence[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters), as Gopher counts them."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items / len(items), dup_chars / max(1, sum(len(item) for item in items))


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
        n = len(_words(text))
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
        words = _words(text)
        if not words:
            return "mean_word_length"
        mean = sum(len(word) for word in words) / len(words)
        return None if self.min_length <= mean <= self.max_length else "mean_word_length"


class SymbolWordRatioFilter:
    """Hash signs and ellipses per word: high in tag clouds, link lists and truncated snippets (Gopher)."""

    def __init__(self, max_ratio: float) -> None:
        self.max_ratio = max_ratio

    def decide(self, text: str) -> str | None:
        words = _raw_words(text)
        if not words:
            return None
        hashes = text.count("#")
        ellipses = text.count("...") + text.count("…")
        if max(hashes, ellipses) / len(words) > self.max_ratio:
            return "symbol_word_ratio"
        return None


class AlphaWordsFilter:
    def __init__(self, min_fraction: float) -> None:
        self.min_fraction = min_fraction

    def decide(self, text: str) -> str | None:
        words = _raw_words(text)
        if not words:
            return None
        alpha = sum(1 for word in words if any(ch.isalpha() for ch in word))
        return "alpha_words_frac" if alpha / len(words) < self.min_fraction else None


class StopWordsFilter:
    """Real English prose uses function words; keyword lists and boilerplate do not (Gopher)."""

    STOP_WORDS: ClassVar[frozenset[str]] = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

    def __init__(self, min_count: int) -> None:
        self.min_count = min_count

    def decide(self, text: str) -> str | None:
        found = {word.lower() for word in _words(text)} & self.STOP_WORDS
        return "stop_words" if len(found) < self.min_count else None


class LineShareFilter:
    """Drops a document when too large a share of its non-blank lines matches `predicate`."""

    def __init__(self, predicate: Callable[[str], bool], max_fraction: float, reason: str) -> None:
        self.predicate = predicate
        self.max_fraction = max_fraction
        self.reason = reason

    def decide(self, text: str) -> str | None:
        lines = _lines(text)
        if not lines:
            return None
        share = sum(1 for line in lines if self.predicate(line)) / len(lines)
        return self.reason if share > self.max_fraction else None


_BULLETS = ("•", "‣", "●", "○", "◦", "■", "□", "▪", "▫", "➢", "➤", "-", "*", "–", "—")


def is_bullet_line(line: str) -> bool:
    return line.lstrip().startswith(_BULLETS)


def is_ellipsis_line(line: str) -> bool:
    return line.endswith(("...", "…"))


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


class LinePunctuationFilter:
    """Too few lines ending like a sentence: menus, tables, lists of links (FineWeb)."""

    def __init__(self, min_fraction: float) -> None:
        self.min_fraction = min_fraction

    def decide(self, text: str) -> str | None:
        lines = _lines(text)
        if not lines:
            return None
        share = sum(1 for line in lines if line.endswith(_END_PUNCTUATION)) / len(lines)
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


def first_reason(text: str, filters: Sequence[DocumentFilter]) -> str | None:
    """The reason of the first filter that drops `text`, or None when every filter keeps it."""
    for doc_filter in filters:
        reason = doc_filter.decide(text)
        if reason is not None:
            return reason
    return None


# -- one shard ----------------------------------------------------------------------------------------


def clean_shard(src: Path, docs_out: Path, removed_out: Path, cfg: CleanConfig) -> dict[str, Any]:
    """Clean one Parquet shard: kept documents to `docs_out`, dropped ones with a `reason` to `removed_out`.

    Both outputs are always written (possibly with no rows). Kept and removed documents carry the
    normalised text that the filters judged, with `n_bytes` recomputed as its UTF-8 size.
    """
    filters = build_filters(cfg)
    try:
        schema = pq.read_schema(src)
    except (OSError, pa.ArrowException) as exc:
        raise DataIntegrityError(f"{src}: not a readable Parquet document shard ({exc})") from exc
    missing = {"doc_id", "text"} - set(schema.names)
    if missing:
        raise DataIntegrityError(f"{src}: lacks the column(s) {sorted(missing)}")
    if "n_bytes" not in schema.names:
        schema = schema.append(pa.field("n_bytes", pa.int64()))
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
            cleaned: list[str] = []
            verdicts: list[str | None] = []
            for text in table.column("text").to_pylist():
                text = text or ""
                counts["bytes_in"] += len(text.encode("utf-8"))
                text = normalize_text(text)
                cleaned.append(text)
                verdicts.append(first_reason(text, filters))
            sizes = [len(text.encode("utf-8")) for text in cleaned]
            table = _set_column(table, "text", pa.array(cleaned, type=text_type))
            table = _set_column(table, "n_bytes", pa.array(sizes, type=pa.int64())).select(schema.names)
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
            counts["bytes_out"] += sum(sizes[i] for i in keep)
            reasons.update(verdicts[i] for i in drop)
    counts["removed_by_reason"] = dict(reasons)
    return counts


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _clean_shard_job(src: str, docs_out: str, removed_out: str, cfg: CleanConfig) -> dict[str, Any]:
    return clean_shard(Path(src), Path(docs_out), Path(removed_out), cfg)


def clean_shards(shards: Sequence[Path], out: Path, cfg: CleanConfig) -> list[dict[str, Any]]:
    """Clean every shard into `out/docs/shard-NNNNN.parquet` and `out/removed/shard-NNNNN.parquet`.

    Each shard writes only its own files, and results come back in shard order, so the output does not
    depend on the worker count.
    """
    (out / DOCS).mkdir(parents=True, exist_ok=True)
    (out / REMOVED).mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(src), str(out / DOCS / f"shard-{i:05d}.parquet"), str(out / REMOVED / f"shard-{i:05d}.parquet"), cfg)
        for i, src in enumerate(shards)
    ]
    with process_pool(cfg.workers, len(jobs)) as pool:
        return map_jobs(pool, _clean_shard_job, jobs)


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
    metrics = merge_counts(clean_shards(shards, ctx.out, cfg))
    if metrics["docs_in"] == 0:
        raise DataIntegrityError(f"{ctx.input_path('extract') / DOCS}: the shards hold no documents")
    ctx.log.info(
        "kept %d of %d documents; removed %s", metrics["kept"], metrics["docs_in"], metrics["removed_by_reason"]
    )
    if metrics["kept"] == 0:
        ctx.log.warning("every document was removed: see removed/*.parquet for the reasons")
    return metrics


STAGE = Stage(name="clean", module=__name__, config=CleanConfig, build=build, inputs=("extract",))
clean_task = stage_task(STAGE)
