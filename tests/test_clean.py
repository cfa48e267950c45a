import json
import random
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import DOC_SCHEMA, publish_docs

from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.clean import (
    STAGE,
    AlphaWordsFilter,
    CleanConfig,
    LinePunctuationFilter,
    LineShareFilter,
    MeanWordLengthFilter,
    PhraseFilter,
    RepetitionFilter,
    ReplacementCharFilter,
    StopWordsFilter,
    SymbolWordRatioFilter,
    WordCountFilter,
    build_filters,
    count_words_together,
    first_drop,
    first_reason,
    is_bullet_line,
    is_ellipsis_line,
    normalize_text,
    words_counted,
)
from tasks.language import LanguageFilter, detect_language
from tasks.sample_data import default_corpus_documents
from tasks.shards import read_batches

PROSE = (
    "The json module exposes an API that is familiar to users of the pickle module. It converts Python "
    "objects to text and back, and the functions take the same keyword arguments as their counterparts. "
    "A decoder can be given hooks that are called with the result of every object it reads."
)
DOC_WITH_EXAMPLE = (
    PROSE
    + "\n\nEncoding basic Python object hierarchies:\n\n    >>> import json\n    >>> json.dumps({'a': 1})\n"
    + "    '{\"a\": 1}'\n\nThe output is always a string, which is safe to write to a file."
)


def publish_extract(root, shards, version="extract-v1", columns=DOC_SCHEMA.names):
    return publish_docs(root, "extract", shards, version, columns)


def read_rows(path):
    return pq.read_table(path).to_pylist()


# -- normalisation -------------------------------------------------------------------------------------


def test_normalize_newlines_controls_and_blank_lines():
    raw = "  Title\r\nline one\rline two\x00\x07\x1b\x7f\x85 end\t\x0b \r\n\r\n\r\n\r\n\tindented\n\n"
    # NEL (\x85) and VT (\x0b) break lines; the other control characters go.
    assert normalize_text(raw) == "Title\nline one\nline two\n end\n\n\tindented"


def test_normalize_composes_to_nfc():
    decomposed = "Cafe\u0301 nai\u0308ve"
    assert normalize_text(decomposed) == "Caf\u00e9 na\u00efve"


def test_normalize_keeps_one_blank_line_between_paragraphs():
    assert normalize_text("a\n\nb\n\n\nc") == "a\n\nb\n\nc"


# -- filters: each decision and its reason --------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc_filter", "text", "reason"),
    [
        (ReplacementCharFilter(0.01), "valid text " * 20, None),
        (ReplacementCharFilter(0.01), "bad \ufffd\ufffd\ufffd bytes", "invalid_utf8"),
        (WordCountFilter(5, 10), "one two three four five", None),
        (WordCountFilter(5, 10), "one two three", "too_short"),
        (WordCountFilter(5, 10), "w " * 11, "too_long"),
        (WordCountFilter(5, 10), "one , two ; ... three !!", "too_short"),  # punctuation is no word
        (PhraseFilter("lorem ipsum", "lorem_ipsum"), "Lorem Ipsum dolor sit amet", "lorem_ipsum"),
        (PhraseFilter("lorem ipsum", "lorem_ipsum"), "plain prose", None),
        (PhraseFilter("{", "curly_bracket", ignore_case=False), "d = {}", "curly_bracket"),
        (MeanWordLengthFilter(3, 10), "the quick brown fox jumps", None),
        (MeanWordLengthFilter(3, 10), "a b c d e f", "mean_word_length"),
        (MeanWordLengthFilter(3, 10), "incomprehensibilities antidisestablishment", "mean_word_length"),
        (SymbolWordRatioFilter(0.1), "one two three four five six seven eight nine #ten", None),
        (SymbolWordRatioFilter(0.1), "#tag #cloud #spam words", "symbol_word_ratio"),
        (SymbolWordRatioFilter(0.1), "wait... what... really... yes", "symbol_word_ratio"),
        (AlphaWordsFilter(0.8), "all words here are words", None),
        (AlphaWordsFilter(0.8), "1 2 3 4 5 six", "alpha_words_frac"),
        (StopWordsFilter(2), "the cat and the hat", None),
        (StopWordsFilter(2), "the buy cheap pills now", "stop_words"),
        (LineShareFilter(is_bullet_line, 0.9, "bullet_lines"), "- a\n- b\n• c\n* d", "bullet_lines"),
        (LineShareFilter(is_bullet_line, 0.9, "bullet_lines"), "Intro line.\n- a\n- b", None),
        (LineShareFilter(is_ellipsis_line, 0.3, "ellipsis_lines"), "read more...\nand more…\nend.", "ellipsis_lines"),
        (LineShareFilter(is_ellipsis_line, 0.3, "ellipsis_lines"), "one.\ntwo.\nthree.\nfour...", None),
        (RepetitionFilter(0.3, 0.2, 0.3, 0.2), "a line\nanother line\na third line", None),
        (RepetitionFilter(0.3, 0.2, 0.3, 0.2), "x\nsame\nsame\nsame", "dup_line_frac"),
        (RepetitionFilter(1.0, 0.2, 1.0, 1.0), "short\nshort\n" + "a much longer unique line " * 3, None),
        (RepetitionFilter(1.0, 0.2, 1.0, 1.0), "s\n" + "a long repeated line\n" * 2, "dup_line_char_frac"),
        (RepetitionFilter(0.3, 0.2, 0.3, 0.2), "para\n\nsame para\n\nsame para\n\nsame para", "dup_para_frac"),
        (RepetitionFilter(1.0, 1.0, 1.0, 0.2), "p\n\nrepeated paragraph\n\nrepeated paragraph", "dup_para_char_frac"),
        (LinePunctuationFilter(0.12), "Home\nAbout\nContact\nLogin", "line_punct_frac"),
        (LinePunctuationFilter(0.12), "Home\nThis is a sentence.", None),
    ],
)
def test_filter_decision_and_reason(doc_filter, text, reason):
    assert doc_filter.decide(text) == reason


# -- filters: every threshold, exactly on it (kept) and just past it (dropped) ----------------------------
# The filter under test is the one build_filters makes from the config, so each field is also checked to
# reach the filter it names. Fractions are built as counts p of q with p/q equal to the threshold as a float.


def _counts(threshold: float) -> tuple[int, int]:
    share = Fraction(threshold).limit_denominator(100)
    p, q = share.numerator, share.denominator
    assert p / q == threshold, f"no small count ratio equals {threshold}"
    return p, q


def _at_most(threshold: float, text: Callable[[int, int], str]) -> tuple[str, str]:
    """For a maximum share: `text(matching, total)` with a share equal to it, and the nearest one above it
    (one more matching item, or one other item fewer)."""
    p, q = _counts(threshold)
    above = [(p + 1, q + 1)] + ([(p, q - 1)] if 0 < p <= q - 1 else [])
    return text(p, q), text(*min(above, key=lambda counts: counts[0] / counts[1]))


def _at_least(threshold: float, text: Callable[[int, int], str]) -> tuple[str, str]:
    """For a minimum share: `text(matching, total)` with a share equal to it, and just below it."""
    p, q = _counts(threshold)
    return text(p, q), text(p, q + 1)


def _words_text(n: int) -> str:
    return " ".join(["word"] * n)


def _mean_length_text(lengths: list[int]) -> str:
    return " ".join("w" * n for n in lengths)


def _dup_char_lines(threshold: float, sep: str) -> tuple[str, str]:
    """A repeated item holding exactly `threshold` of the characters, and one unique character fewer."""
    p, q = _counts(threshold)
    assert q > 2 * p, "the repeated item and its copy must leave room for a unique one"
    unit = 10

    def text(unique: int) -> str:
        return sep.join(["a" * (p * unit), "a" * (p * unit), "b" * unique])

    return text((q - 2 * p) * unit), text((q - 2 * p) * unit - 1)


@dataclass(frozen=True)
class Threshold:
    setting: str  # the CleanConfig field
    filter_type: type
    reason: str
    texts: Callable[[Any], tuple[str, str]]  # threshold value -> (on it, just past it)
    overrides: dict[str, Any] = field(default_factory=dict)  # other thresholds of the filter, out of the way
    presets: tuple[str, ...] = ("default", "web")
    side: str = ""  # which input a threshold with several is tested on


_NO_OTHER_REPETITION = {
    "max_dup_line_frac": 1.0,
    "max_dup_line_char_frac": 1.0,
    "max_dup_para_frac": 1.0,
    "max_dup_para_char_frac": 1.0,
}


def _repetition(field_name: str, texts: Callable[[Any], tuple[str, str]], reason: str) -> Threshold:
    others = {k: v for k, v in _NO_OTHER_REPETITION.items() if k != field_name}
    return Threshold(field_name, RepetitionFilter, reason, texts, others)


THRESHOLDS = [
    Threshold(
        "max_replacement_char_frac",
        ReplacementCharFilter,
        "invalid_utf8",
        lambda t: _at_most(t, lambda p, q: "a" * (q - p) + "\ufffd" * p),
    ),
    Threshold("min_words", WordCountFilter, "too_short", lambda n: (_words_text(n), _words_text(n - 1))),
    Threshold("max_words", WordCountFilter, "too_long", lambda n: (_words_text(n), _words_text(n + 1))),
    Threshold(
        "min_mean_word_length",
        MeanWordLengthFilter,
        "mean_word_length",
        lambda n: (_mean_length_text([int(n)] * 10), _mean_length_text([int(n)] * 9 + [int(n) - 1])),
    ),
    Threshold(
        "max_mean_word_length",
        MeanWordLengthFilter,
        "mean_word_length",
        lambda n: (_mean_length_text([int(n)] * 10), _mean_length_text([int(n)] * 9 + [int(n) + 1])),
    ),
    Threshold(
        "max_symbol_word_ratio",
        SymbolWordRatioFilter,
        "symbol_word_ratio",
        lambda t: _at_most(t, lambda p, q: " ".join(["#tag"] * p + ["word"] * (q - p))),
        side="hashes",
    ),
    Threshold(
        "max_symbol_word_ratio",
        SymbolWordRatioFilter,
        "symbol_word_ratio",
        lambda t: _at_most(t, lambda p, q: " ".join(["so...", "so…"][i % 2] for i in range(p)) + " word" * (q - p)),
        side="ellipses",  # both spellings
    ),
    Threshold(
        "min_alpha_words_frac",
        AlphaWordsFilter,
        "alpha_words_frac",
        lambda t: _at_least(t, lambda p, q: " ".join(["word"] * p + ["1234"] * (q - p))),
    ),
    Threshold(
        "min_stop_words",
        StopWordsFilter,
        "stop_words",
        lambda n: (
            " ".join(sorted(StopWordsFilter.STOP_WORDS)[:n] + ["word"]),
            " ".join(sorted(StopWordsFilter.STOP_WORDS)[: n - 1] * 3 + ["word"]),
        ),
        side="distinct",  # a stop word said three times still counts once
    ),
    Threshold(
        "max_bullet_lines_frac",
        LineShareFilter,
        "bullet_lines",
        lambda t: _at_most(t, lambda p, q: "\n".join(["- an item"] * p + ["A plain line."] * (q - p))),
    ),
    Threshold(
        "max_ellipsis_lines_frac",
        LineShareFilter,
        "ellipsis_lines",
        lambda t: _at_most(t, lambda p, q: "\n".join(["and so on..."] * p + ["A plain line."] * (q - p))),
    ),
    _repetition(
        "max_dup_line_frac",
        lambda t: _at_most(t, lambda p, q: "\n".join([f"line {i}" for i in range(q - p)] + ["line 0"] * p)),
        "dup_line_frac",
    ),
    _repetition("max_dup_line_char_frac", lambda t: _dup_char_lines(t, "\n"), "dup_line_char_frac"),
    _repetition(
        "max_dup_para_frac",
        lambda t: _at_most(t, lambda p, q: "\n\n".join([f"para {i}" for i in range(q - p)] + ["para 0"] * p)),
        "dup_para_frac",
    ),
    _repetition("max_dup_para_char_frac", lambda t: _dup_char_lines(t, "\n\n"), "dup_para_char_frac"),
    Threshold(  # 0 (off) by default: only the web preset has a share to fall below
        "min_line_punct_frac",
        LinePunctuationFilter,
        "line_punct_frac",
        lambda t: _at_least(t, lambda p, q: "\n".join(["A sentence."] * p + ["A heading"] * (q - p))),
        presets=("web",),
    ),
]
THRESHOLD_CASES = [
    pytest.param(case, preset, id="-".join(filter(None, (case.setting, case.side, preset))))
    for case in THRESHOLDS
    for preset in case.presets
]


def configured_filter(cfg: CleanConfig, case: Threshold):
    """The one filter of build_filters(cfg) that the threshold belongs to."""
    found = [
        f
        for f in build_filters(cfg)
        if isinstance(f, case.filter_type) and getattr(f, "reason", case.reason) == case.reason
    ]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize(("case", "preset"), THRESHOLD_CASES)
def test_threshold_keeps_a_document_on_it_and_drops_one_just_past_it(case: Threshold, preset: str):
    cfg = (CleanConfig.web if preset == "web" else CleanConfig)(**case.overrides)
    threshold = getattr(cfg, case.setting)
    on, past = case.texts(threshold)
    doc_filter = configured_filter(cfg, case)
    assert doc_filter.decide(on) is None, f"{case.setting}={threshold}: a document exactly on it was dropped"
    assert doc_filter.decide(past) == case.reason, f"{case.setting}={threshold}: just past it, not dropped"


def test_every_threshold_of_the_config_is_tested_on_its_edge():
    thresholds = {name for name in CleanConfig.model_fields if name.startswith(("min_", "max_"))}
    # min_language_score is tested on the score detected on a mixed document, in test_language.py.
    assert thresholds - {"min_language_score"} == {case.setting for case in THRESHOLDS}


def test_first_failing_filter_names_the_reason():
    filters = build_filters(CleanConfig())
    assert first_reason("", filters) == "too_short"
    assert first_reason(PROSE, filters) is None
    assert first_reason(PROSE + " lorem ipsum", filters) == "lorem_ipsum"
    assert first_reason("\ufffd" * 10 + " " + PROSE, filters) == "invalid_utf8"
    # Where it stopped: the stage tells from it whether the language filter had looked at the document.
    lorem = next(i for i, f in enumerate(filters) if getattr(f, "reason", None) == "lorem_ipsum")
    assert first_drop(PROSE + " lorem ipsum", filters) == (lorem, "lorem_ipsum")
    assert first_drop("", filters) == (1, "too_short")
    assert first_drop(PROSE, filters) == (len(filters), None)


def test_defaults_keep_documentation_but_web_preset_is_stricter():
    text = normalize_text(DOC_WITH_EXAMPLE)
    assert first_reason(text, build_filters(CleanConfig())) is None
    assert first_reason(text, build_filters(CleanConfig.web())) == "curly_bracket"
    assert first_reason(normalize_text(PROSE), build_filters(CleanConfig.web())) is None


def test_config_reports_every_inconsistency_at_once():
    with pytest.raises(ValueError) as err:
        CleanConfig(min_words=100, max_words=10, min_mean_word_length=9, max_mean_word_length=4)
    assert "min_words (100) is above max_words (10)" in str(err.value)
    assert "min_mean_word_length (9.0) is above max_mean_word_length (4.0)" in str(err.value)
    with pytest.raises(ValueError, match="max_dup_line_frac"):
        CleanConfig(max_dup_line_frac=1.5)


# -- the stage ------------------------------------------------------------------------------------------


def test_stage_cleans_keeps_and_audits_removed_documents(tmp_path):
    root = tmp_path / "store"
    extract = publish_extract(
        root,
        [
            [("good-1", "  " + PROSE.replace(". ", ".\r\n") + "  \r\n\r\n\r\n\r\n"), ("short", "Too short.")],
            [("spam", "#buy #cheap #pills " * 30), ("good-2", DOC_WITH_EXAMPLE), ("binary", "\ufffd\x00" * 200)],
        ],
    )
    ref = STAGE.run(root, CleanConfig(), {"extract": extract})
    folder = Store(root).path("clean", ref.version)

    kept = read_rows(folder / "docs" / "shard-00000.parquet") + read_rows(folder / "docs" / "shard-00001.parquet")
    assert [row["doc_id"] for row in kept] == ["good-1", "good-2"]
    assert kept[0]["text"] == PROSE.replace(". ", ".\n")
    assert all(row["n_bytes"] == len(row["text"].encode()) for row in kept)
    assert set(kept[0]) == set(DOC_SCHEMA.names) | {"language", "language_score"}

    removed = read_rows(folder / "removed" / "shard-00000.parquet") + read_rows(
        folder / "removed" / "shard-00001.parquet"
    )
    assert {row["doc_id"]: row["reason"] for row in removed} == {
        "short": "too_short",
        "spam": "symbol_word_ratio",
        "binary": "invalid_utf8",
    }
    assert removed[0]["text"] == "Too short."

    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics["docs_in"] == 5
    assert metrics["kept"] == 2
    assert metrics["removed"] == 3
    assert metrics["removed_by_reason"] == {"invalid_utf8": 1, "symbol_word_ratio": 1, "too_short": 1}
    assert metrics["bytes_out"] == sum(row["n_bytes"] for row in kept)
    assert metrics["bytes_in"] > metrics["bytes_out"]


def test_removed_is_an_empty_parquet_file_when_nothing_was_dropped(tmp_path):
    root = tmp_path / "store"
    extract = publish_extract(root, [[("a", PROSE)]])
    folder = Store(root).path("clean", STAGE.run(root, CleanConfig(), {"extract": extract}).version)
    removed = pq.read_table(folder / "removed" / "shard-00000.parquet")
    assert removed.num_rows == 0
    assert "reason" in removed.column_names and "doc_id" in removed.column_names


def test_two_worker_processes_write_the_same_bytes_as_one(tmp_path):
    shards = [[(f"doc-{s}-{i}", f"{PROSE} Shard {s}, document {i}.") for i in range(30)] for s in range(4)]
    shards[1].append(("short", "no"))
    files = []
    for workers in (1, 2):
        root = tmp_path / f"store-{workers}"
        extract = publish_extract(root, shards)
        ref = STAGE.run(root, CleanConfig(workers=workers), {"extract": extract})
        manifest = Store(root).manifest("clean", ref.version)
        files.append({name: info["sha256"] for name, info in manifest["files"].items()})
    assert files[0] == files[1]
    assert len([name for name in files[0] if name.startswith("docs/")]) == 4


def test_missing_text_column_is_a_clear_error_and_publishes_nothing(tmp_path):
    root = tmp_path / "store"
    extract = publish_extract(root, [[("a", PROSE)]], columns=("doc_id", "source"))
    with pytest.raises(DataIntegrityError, match=r"shard-00000\.parquet: lacks the column\(s\) \['text'\]"):
        STAGE.run(root, CleanConfig(), {"extract": extract})
    assert Store(root).latest("clean") is None


def test_corrupt_shard_and_empty_input_are_clear_errors(tmp_path):
    root = tmp_path / "store"

    def corrupt(out):
        (out / "docs").mkdir()
        (out / "docs" / "shard-00000.parquet").write_bytes(b"PAR1 this is not parquet")

    Store(root).publish("extract", "bad", corrupt, params={}, inputs={}, code_version="test")
    with pytest.raises(DataIntegrityError, match="shard-00000.parquet: not a readable Parquet"):
        STAGE.run(root, CleanConfig(), {"extract": "bad"})

    empty = publish_extract(root, [[]], version="empty")
    with pytest.raises(DataIntegrityError, match="hold no documents"):
        STAGE.run(root, CleanConfig(), {"extract": empty})

    Store(root).publish("extract", "none", lambda out: None, params={}, inputs={}, code_version="test")
    with pytest.raises(DataIntegrityError, match=r"docs: no \*\.parquet document shards"):
        STAGE.run(root, CleanConfig(), {"extract": "none"})
    assert Store(root).latest("clean") is None


def test_separator_characters_become_whitespace_not_glue():
    text = "end of page\x0cNext page\x85line two\x1fword\u2028last\x0bline\x00!"
    assert normalize_text(text) == "end of page\nNext page\nline two word\nlast\nline!"


# -- the fast filters decide as the plain ones did -------------------------------------------------------
# The filters' logic as first written (one Python step per word and per line), kept word for word as the
# reference: the fast helpers must give every filter, at every threshold, the same decision on any text.

_REF_PUNCTUATION = string.punctuation + "“”‘’«»…–—"


def _ref_normalize(text):
    text = unicodedata.normalize("NFC", text)
    text = re.sub("\r\n|[\r\x0b\x0c\x85\u2028\u2029]", "\n", text)
    text = re.sub("[\x1c-\x1f]", " ", text)
    text = re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _ref_words(text):
    return tuple(word for word in (raw.strip(_REF_PUNCTUATION) for raw in text.split()) if word)


def _ref_lines(text):
    return tuple(line for line in text.split("\n") if line.strip())


def _ref_paragraphs(text):
    return tuple(p for p in (p.strip() for p in text.split("\n\n")) if p)


def _ref_duplicate_share(items):
    if not items:
        return 0.0, 0.0
    seen = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items / len(items), dup_chars / max(1, sum(len(item) for item in items))


def _ref_decide(f, text):
    """The decision of filter `f` on `text`, by its class's logic as first written."""
    if isinstance(f, ReplacementCharFilter):
        return "invalid_utf8" if text and text.count("\ufffd") / len(text) > f.max_fraction else None
    if isinstance(f, WordCountFilter):
        n = len(_ref_words(text))
        return "too_short" if n < f.min_words else "too_long" if n > f.max_words else None
    if isinstance(f, PhraseFilter):
        return f.reason if f.phrase in (text.lower() if f.ignore_case else text) else None
    if isinstance(f, MeanWordLengthFilter):
        words = _ref_words(text)
        if not words:
            return "mean_word_length"
        mean = sum(len(word) for word in words) / len(words)
        return None if f.min_length <= mean <= f.max_length else "mean_word_length"
    if isinstance(f, SymbolWordRatioFilter):
        words = text.split()
        if not words:
            return None
        ratio = max(text.count("#"), text.count("...") + text.count("…")) / len(words)
        return "symbol_word_ratio" if ratio > f.max_ratio else None
    if isinstance(f, AlphaWordsFilter):
        words = text.split()
        if not words:
            return None
        alpha = sum(1 for word in words if any(ch.isalpha() for ch in word))
        return "alpha_words_frac" if alpha / len(words) < f.min_fraction else None
    if isinstance(f, StopWordsFilter):
        found = {word.lower() for word in _ref_words(text)} & f.STOP_WORDS
        return "stop_words" if len(found) < f.min_count else None
    if isinstance(f, LineShareFilter):
        lines = _ref_lines(text)
        if not lines:
            return None
        share = sum(1 for line in lines if f.predicate(line)) / len(lines)
        return f.reason if share > f.max_fraction else None
    if isinstance(f, RepetitionFilter):
        para_frac, para_char_frac = _ref_duplicate_share(_ref_paragraphs(text))
        if para_frac > f.max_para_frac:
            return "dup_para_frac"
        if para_char_frac > f.max_para_char_frac:
            return "dup_para_char_frac"
        line_frac, line_char_frac = _ref_duplicate_share(_ref_lines(text))
        if line_frac > f.max_line_frac:
            return "dup_line_frac"
        return "dup_line_char_frac" if line_char_frac > f.max_line_char_frac else None
    if isinstance(f, LinePunctuationFilter):
        lines = _ref_lines(text)
        if not lines:
            return None
        share = sum(1 for line in lines if line.endswith((".", "!", "?", '"', "'"))) / len(lines)
        return "line_punct_frac" if share < f.min_fraction else None
    if isinstance(f, LanguageFilter):  # on the detector's answer, whatever that is
        found = detect_language(text, f.sample_chars)
        return None if found.language in f.languages and found.score >= f.min_score else "language"
    raise TypeError(f)


# Pieces that sit on the edges of the fast paths: non-ASCII letters and non-letters (a word of "²½" has no
# letter, "中" is one), every kind of whitespace str.split knows, stop words in any case (the Kelvin sign
# lowers to "k", "İ" to two characters), punctuation of both alphabets, bullets, ellipses, control
# characters, repeated lines and paragraphs.
_PIECES = [
    "the",
    "The",
    "THE",
    "and",
    "And",
    "of",
    "to",
    "be",
    "with",
    "that",
    "have",
    "word",
    "Python",
    "café",
    "straße",
    "ΟΔΟΣ",
    "中文",
    "²½",
    "Ⅻ",
    "12",
    "3.14",
    ">>>",
    "=",
    "#tag",
    "...",
    "…",
    "so...",
    "—",
    "–",
    "“quoted”",
    "'x'",
    "(a)",
    "[1]",
    "-",
    "•",
    "*",
    "İ",
    "\u212a",
    "\ufffd",
    "lorem ipsum",
    "{",
    "}",
    "x_y",
    " ",
    " ",
    " ",
    "  ",
    "\t",
    "\n",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "\x85",
    "\xa0",
    "\u2028",
    "\u3000",
    "\x00",
    "\x07",
    "\x7f",
    "\x9f",
    "e\u0301",
    ".",
    "!",
    "?",
    '"',
    "'",
]


_ASCII_PIECES = [piece for piece in _PIECES if piece.isascii()]  # ASCII text takes a path of its own


def _fuzz_texts(count, seed=0):
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        pool = _ASCII_PIECES if i % 2 else _PIECES
        pieces = [rng.choice(pool) for _ in range(rng.randint(0, 120))]
        if rng.random() < 0.3:  # repeated lines and paragraphs
            line = " ".join(rng.choice(_PIECES[:20]) for _ in range(5))
            pieces += ["\n", line, "\n", line, "\n\n", line] * rng.randint(1, 3)
        texts.append("".join(pieces))
    return texts


def _filters_at_many_thresholds():
    fractions = [i / 20 for i in range(21)]
    filters = [ReplacementCharFilter(t / 10) for t in fractions]
    filters += [WordCountFilter(n, n + 40) for n in (0, 1, 5, 20, 50)]
    filters += [PhraseFilter("lorem ipsum", "lorem_ipsum"), PhraseFilter("{", "curly_bracket", ignore_case=False)]
    filters += [MeanWordLengthFilter(lo, hi) for lo in (0, 2, 3, 4) for hi in (4, 6, 10, 12)]
    filters += [SymbolWordRatioFilter(t / 2) for t in fractions]
    filters += [AlphaWordsFilter(t) for t in fractions]
    filters += [StopWordsFilter(n) for n in range(9)]
    filters += [LineShareFilter(is_bullet_line, t, "bullet_lines") for t in fractions]
    filters += [LineShareFilter(is_ellipsis_line, t, "ellipsis_lines") for t in fractions]
    filters += [LineShareFilter(lambda line: "a" in line, t, "has_a") for t in fractions[::4]]
    filters += [
        RepetitionFilter(a, b, c, d)
        for a in (0.1, 0.3, 1.0)
        for b in (0.2, 1.0)
        for c in (0.1, 0.3, 1.0)
        for d in (0.2, 1.0)
    ]
    filters += [LinePunctuationFilter(t) for t in fractions]
    return filters


@pytest.fixture(scope="module")
def varied_corpus():
    """The embedded corpus's documents (normalised, as the stage judges them) and fuzzed texts raw."""
    docs = [normalize_text(text) for _, text in default_corpus_documents()]
    fuzz = _fuzz_texts(400)
    return docs + fuzz + [normalize_text(text) for text in fuzz]


# ASCII text on either side of each condition that lets normalize_text only strip its ends.
_NORMALIZE_EDGES = [
    "  plain text, two lines\nand no blank at a line's end \t ",
    "a blank ends \nthis line",
    "a tab ends\t\nthis line",
    "a blank line of blanks\n \t\nbetween",
    "two newlines\n\nkept",
    "three newlines\n\n\ncollapse",
    "many newlines" + "\n" * 20 + "collapse",
    "\n\n\nleading newlines and trailing ones\n\n\n",
    "a control\x07 character",
    "a form feed\x0cbreaks a line",
    "a carriage return\r\nand a lone\rone",
    "a unit separator\x1fis a blank",
    "DEL\x7f goes",
    "\tindented\n\ttwice",
]


def test_normalize_gives_the_text_the_plain_version_gave(varied_corpus):
    for text in varied_corpus + _fuzz_texts(400, seed=1) + _NORMALIZE_EDGES:
        assert normalize_text(text) == _ref_normalize(text), repr(text)


def _ref_word_counts(text):
    raw = text.split()
    return (
        len(raw),
        len(_ref_words(text)),
        sum(1 for word in raw if any(ch.isalpha() for ch in word)),
        sum(1 for word in raw for ch in word if ch not in _REF_PUNCTUATION),
        sum(1 for word in raw for ch in word if ch in _REF_PUNCTUATION),
    )


def test_words_counted_together_are_each_texts_own(varied_corpus):
    edges = ["", " ", "\n\n", "word", " lead", "trail ", "...", "( )", "2 + 2", "a\U0001f600b \U0001d400x", "中文 ²½"]
    texts = varied_corpus + edges
    assert count_words_together(texts) == [_ref_word_counts(text) for text in texts]
    assert count_words_together(edges[::-1]) == [_ref_word_counts(text) for text in edges[::-1]]
    assert count_words_together([]) == []


def test_filters_decide_on_the_words_counted_together(varied_corpus):
    """Within words_counted the filters read the counts made together, in runs of texts (one of them with a
    text far longer than a run), and decide as the plain version does."""
    texts = varied_corpus + [("lorem ipsum " * 60_000).strip()] + varied_corpus[:50]
    filters = [WordCountFilter(20, 100_000), MeanWordLengthFilter(3, 10)]
    filters += [SymbolWordRatioFilter(0.1), AlphaWordsFilter(0.8), AlphaWordsFilter(0.4)]
    reasons = Counter()
    with words_counted(texts):
        for text in texts:
            for f in filters:
                reasons[reason := f.decide(text)] += 1
                assert reason == _ref_decide(f, text), (type(f).__name__, repr(text[:200]))
    assert reasons.keys() == {
        None,
        "too_short",
        "too_long",
        "mean_word_length",
        "symbol_word_ratio",
        "alpha_words_frac",
    }


@pytest.mark.slow  # ~140 filters on ~2,400 texts, through the reference too
def test_every_filter_decides_as_the_plain_version_at_every_threshold(varied_corpus):
    filters = _filters_at_many_thresholds()
    reasons = Counter()
    for text in varied_corpus:
        for f in filters:
            expected = _ref_decide(f, text)
            assert f.decide(text) == expected, (type(f).__name__, vars(f), repr(text[:200]))
            reasons[expected] += 1
    # The inputs reach every decision (a comparison that only ever saw documents kept would prove little).
    assert set(reasons) == {
        None, "invalid_utf8", "too_short", "too_long", "lorem_ipsum", "curly_bracket", "mean_word_length",
        "symbol_word_ratio", "alpha_words_frac", "stop_words", "bullet_lines", "ellipsis_lines", "has_a",
        "dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac", "line_punct_frac",
    }  # fmt: skip


# -- the stage's files: the same bytes as before, and cached per shard -------------------------------------


def _ref_judge(text, filters):
    """(reason, the detection of the language filter when the document reached it)."""
    found = None
    for f in filters:
        if isinstance(f, LanguageFilter):
            found = detect_language(text, f.sample_chars)
        if reason := _ref_decide(f, text):
            return reason, found
    return None, found


def _ref_clean_shard(src, docs_out, removed_out, cfg):
    """The stage's shard cleaning as first written, on the reference normalisation and decisions, with the
    language filter's columns as that filter came with them."""
    filters = build_filters(cfg)
    schema = pq.read_schema(src)
    if "n_bytes" not in schema.names:
        schema = schema.append(pa.field("n_bytes", pa.int64()))
    if cfg.languages:
        schema = schema.append(pa.field("language", pa.string())).append(pa.field("language_score", pa.float64()))
    removed_schema = schema.append(pa.field("reason", pa.string()))
    with (
        pq.ParquetWriter(docs_out, schema, compression="zstd") as kept_writer,
        pq.ParquetWriter(removed_out, removed_schema, compression="zstd") as removed_writer,
    ):
        for batch in read_batches(src):
            table = pa.Table.from_batches([batch])
            cleaned = [_ref_normalize(text or "") for text in table.column("text").to_pylist()]
            judged = [_ref_judge(text, filters) for text in cleaned]
            verdicts = [reason for reason, _ in judged]
            sizes = [len(text.encode("utf-8")) for text in cleaned]
            table = table.set_column(table.column_names.index("text"), "text", pa.array(cleaned, type=pa.string()))
            table = table.set_column(table.column_names.index("n_bytes"), "n_bytes", pa.array(sizes, pa.int64()))
            if cfg.languages:
                codes = [None if found is None else found.language for _, found in judged]
                scores = [None if found is None else found.score for _, found in judged]
                table = table.append_column("language", pa.array(codes, pa.string()))
                table = table.append_column("language_score", pa.array(scores, pa.float64()))
            keep = [i for i, reason in enumerate(verdicts) if reason is None]
            drop = [i for i, reason in enumerate(verdicts) if reason is not None]
            kept_writer.write_table(table.take(pa.array(keep, pa.int64())).cast(schema))
            dropped = table.take(pa.array(drop, pa.int64())).append_column(
                "reason", pa.array([verdicts[i] for i in drop], pa.string())
            )
            removed_writer.write_table(dropped.cast(removed_schema))


FRENCH = (  # longer than the web preset's 50 words
    "La bibliothèque municipale ouvre ses portes à neuf heures tous les jours sauf le dimanche. Les lecteurs "
    "peuvent emprunter jusqu'à cinq livres pour une durée de trois semaines, et les prolonger une fois en ligne "
    "ou au guichet. Une salle de lecture silencieuse se trouve au premier étage, à côté des journaux et des "
    "revues que l'on peut consulter sur place sans inscription."
)
GERMAN = (
    "Die Stadtbibliothek ist montags bis samstags von neun bis achtzehn Uhr geöffnet. Leser dürfen bis zu fünf "
    "Bücher für drei Wochen ausleihen und die Leihfrist einmal verlängern, entweder im Internet oder an der "
    "Theke. Im ersten Stock gibt es einen ruhigen Lesesaal, in dem man Zeitungen und Zeitschriften ohne "
    "Anmeldung lesen kann, solange man sie danach wieder an ihren Platz legt."
)


def _varied_shards():
    docs = [(f"doc-{i}", text) for i, (_, text) in enumerate(default_corpus_documents()[:300])]
    docs += [(f"fuzz-{i}", text) for i, text in enumerate(_fuzz_texts(100, seed=2))]
    docs += [("spam", "#buy #cheap #pills " * 30), ("dup", "same line\n" * 20), ("lorem", PROSE + " Lorem ipsum.")]
    docs += [("fr", FRENCH), ("de", GERMAN), ("mixed", PROSE + "\n\n" + FRENCH), ("fr-short", "Bonjour à tous.")]
    random.Random(3).shuffle(docs)
    return [docs[i : i + 150] for i in range(0, len(docs), 150)]


@pytest.mark.parametrize("preset", ["default", "web"])
@pytest.mark.parametrize("languages", [[], ["en"]], ids=["no-language-filter", "language-filter"])
def test_the_stage_writes_the_bytes_the_plain_version_wrote(tmp_path, preset, languages):
    root = tmp_path / "store"
    cfg = (CleanConfig.web if preset == "web" else CleanConfig)(languages=languages)
    extract = publish_extract(root, _varied_shards())
    folder = Store(root).path("clean", STAGE.run(root, cfg, {"extract": extract}).version)
    shards = sorted((Store(root).path("extract", extract) / "docs").glob("*.parquet"))
    assert len(shards) == 3
    for src in shards:
        (tmp_path / "ref").mkdir(exist_ok=True)
        _ref_clean_shard(src, tmp_path / "ref" / "docs.parquet", tmp_path / "ref" / "removed.parquet", cfg)
        assert (folder / "docs" / src.name).read_bytes() == (tmp_path / "ref" / "docs.parquet").read_bytes()
        assert (folder / "removed" / src.name).read_bytes() == (tmp_path / "ref" / "removed.parquet").read_bytes()
    removed = {row["doc_id"]: row for row in pq.read_table(folder / "removed").to_pylist()}
    assert len(removed) > 50  # the filters did remove documents
    if languages:  # the language filter too; the documents it looked at carry what it found, kept or not
        found = {doc_id: (removed[doc_id]["reason"], removed[doc_id]["language"]) for doc_id in ("fr", "lorem")}
        assert found == {"fr": ("language", "fr"), "lorem": ("lorem_ipsum", "en")}
        assert removed["fr-short"]["language"] is None  # too short: dropped before the language filter


def _shard_entries(root):
    return sorted(path.name for path in (root / "clean" / ".shards" / "clean").glob("*/*"))


def test_a_new_extract_version_recleans_only_its_new_shard_and_writes_the_same_bytes(tmp_path):
    root = tmp_path / "store"
    shards = [[(f"doc-{s}-{i}", f"{PROSE} Shard {s}, document {i}.") for i in range(20)] for s in range(3)]
    first = STAGE.run(root, CleanConfig(), {"extract": publish_extract(root, shards[:2], version="extract-v1")})
    assert len(_shard_entries(root)) == 2
    # A nightly extract: the same two shards and a new one. A new clean version, two shards from the cache.
    second = STAGE.run(root, CleanConfig(), {"extract": publish_extract(root, shards, version="extract-v2")})
    assert second.version != first.version and not second.reused
    assert len(_shard_entries(root)) == 3
    store = Store(root)
    before, after = (store.manifest("clean", ref.version)["files"] for ref in (first, second))
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"docs/shard-00002.parquet", "removed/shard-00002.parquet"}
    assert store.manifest("clean", second.version)["metrics"]["docs_in"] == 60
    # A forced rebuild of the same version is made of the cached shards alone, to the same bytes.
    forced = STAGE.run(root, CleanConfig(), {"extract": "extract-v2"}, force=True)
    assert forced.version == second.version and len(_shard_entries(root)) == 3
    assert store.manifest("clean", forced.version)["files"] == after


def test_a_cached_shard_is_recomputed_when_a_setting_changes(tmp_path):
    root = tmp_path / "store"
    extract = publish_extract(root, [[("a", PROSE), ("b", PROSE + " More words here.")]])
    STAGE.run(root, CleanConfig(), {"extract": extract})
    ref = STAGE.run(root, CleanConfig(min_words=52), {"extract": extract})  # PROSE has 51 words
    assert len(_shard_entries(root)) == 2
    removed = read_rows(Store(root).path("clean", ref.version) / "removed" / "shard-00000.parquet")
    assert [row["reason"] for row in removed] == ["too_short"]
