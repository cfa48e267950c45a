import json
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

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
    first_reason,
    is_bullet_line,
    is_ellipsis_line,
    normalize_text,
)

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
    assert thresholds == {case.setting for case in THRESHOLDS}


def test_first_failing_filter_names_the_reason():
    filters = build_filters(CleanConfig())
    assert first_reason("", filters) == "too_short"
    assert first_reason(PROSE, filters) is None
    assert first_reason(PROSE + " lorem ipsum", filters) == "lorem_ipsum"
    assert first_reason("\ufffd" * 10 + " " + PROSE, filters) == "invalid_utf8"


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
    assert set(kept[0]) == set(DOC_SCHEMA.names)

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
