import json

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
