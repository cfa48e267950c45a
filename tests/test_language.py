import pyarrow.parquet as pq
import pytest
from builders import publish_docs

from storage.store import Store
from tasks.clean import STAGE, CleanConfig, build_filters, first_reason, normalize_text
from tasks.language import LanguageFilter, detect_language

ENGLISH = (
    "The library opens at nine every morning except on Sundays. Readers may borrow up to five books for three "
    "weeks and renew them once, online or at the desk. A quiet reading room is on the first floor, next to the "
    "newspapers and magazines, which anyone may read there without signing up."
)
FRENCH = (
    "La bibliothèque municipale ouvre ses portes à neuf heures tous les jours sauf le dimanche. Les lecteurs "
    "peuvent emprunter jusqu'à cinq livres pour une durée de trois semaines, et les prolonger une fois en ligne "
    "ou au guichet. Une salle de lecture silencieuse se trouve au premier étage, à côté des journaux."
)
GERMAN = (
    "Die Stadtbibliothek ist montags bis samstags von neun bis achtzehn Uhr geöffnet. Leser dürfen bis zu fünf "
    "Bücher für drei Wochen ausleihen und die Leihfrist einmal verlängern, entweder im Internet oder an der "
    "Theke. Im ersten Stock gibt es einen ruhigen Lesesaal, in dem man Zeitungen ohne Anmeldung lesen kann."
)


def run_clean(tmp_path, shards, cfg=None, name="store"):
    root = tmp_path / name
    extract = publish_docs(root, "extract", shards)
    ref = STAGE.run(root, cfg or CleanConfig(), {"extract": extract})
    return Store(root), ref


def rows(store, ref, folder):
    path = store.path("clean", ref.version) / folder
    return [row for shard in sorted(path.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


def test_english_kept_french_and_german_removed_for_their_language_with_the_detection_audited(tmp_path):
    store, ref = run_clean(tmp_path, [[("en", ENGLISH), ("fr", FRENCH)], [("de", GERMAN), ("short", "Bonjour.")]])
    kept = rows(store, ref, "docs")
    removed = {row["doc_id"]: row for row in rows(store, ref, "removed")}

    assert [row["doc_id"] for row in kept] == ["en"]
    assert kept[0]["language"] == "en" and kept[0]["language_score"] >= 0.9
    assert {doc_id: row["reason"] for doc_id, row in removed.items()} == {
        "fr": "language",
        "de": "language",
        "short": "too_short",  # the filters before the language one still decide first
    }
    assert (removed["fr"]["language"], removed["de"]["language"]) == ("fr", "de")
    assert removed["fr"]["language_score"] >= 0.9 and removed["de"]["language_score"] >= 0.9
    # Dropped before the language filter looked at it: no language, rather than a guess from one word.
    assert (removed["short"]["language"], removed["short"]["language_score"]) == (None, None)
    metrics = store.manifest("clean", ref.version)["metrics"]
    assert metrics["removed_by_reason"] == {"language": 2, "too_short": 1}


def test_a_document_a_later_filter_drops_still_carries_the_language_found(tmp_path):
    store, ref = run_clean(tmp_path, [[("lorem", ENGLISH + " Lorem ipsum dolor sit amet."), ("fr", FRENCH)]])
    removed = {row["doc_id"]: row for row in rows(store, ref, "removed")}
    assert (removed["lorem"]["reason"], removed["lorem"]["language"]) == ("lorem_ipsum", "en")
    assert removed["lorem"]["language_score"] >= 0.9
    assert (removed["fr"]["reason"], removed["fr"]["language"]) == ("language", "fr")


def test_every_language_listed_is_kept(tmp_path):
    cfg = CleanConfig(languages=["en", "fr"], min_stop_words=0)  # the stop words counted are English ones
    store, ref = run_clean(tmp_path, [[("en", ENGLISH), ("fr", FRENCH), ("de", GERMAN)]], cfg)
    assert [row["doc_id"] for row in rows(store, ref, "docs")] == ["en", "fr"]
    assert [row["reason"] for row in rows(store, ref, "removed")] == ["language"]


def test_no_languages_no_language_filter_and_no_language_columns(tmp_path):
    cfg = CleanConfig(languages=[], min_stop_words=0)
    assert not any(isinstance(f, LanguageFilter) for f in build_filters(cfg))
    store, ref = run_clean(tmp_path, [[("en", ENGLISH), ("fr", FRENCH)]], cfg)
    kept = rows(store, ref, "docs")
    assert [row["doc_id"] for row in kept] == ["en", "fr"]
    assert "language" not in kept[0] and "language_score" not in kept[0]


def test_min_language_score_keeps_a_mixed_document_on_it_and_drops_it_just_above():
    mixed = normalize_text(ENGLISH + "\n\n" + FRENCH[:150])
    found = detect_language(mixed, 4096)
    assert found.language == "en" and 0.5 < found.score < 0.95
    assert LanguageFilter(frozenset({"en"}), found.score, 4096).decide(mixed) is None
    assert LanguageFilter(frozenset({"en"}), found.score + 0.01, 4096).decide(mixed) == "language"
    cfg = CleanConfig(min_language_score=found.score + 0.01)
    assert first_reason(mixed, build_filters(cfg)) == "language"


def test_only_the_first_sample_chars_are_read():
    text = ENGLISH + "\n\n" + "\n\n".join([FRENCH] * 10)
    assert detect_language(text, len(ENGLISH)).language == "en"
    assert detect_language(text, 4096).language == "fr"


@pytest.mark.parametrize(
    "text",
    [
        ENGLISH + " \x00\x01\x0b\x7f\x9f\ufdd0\ufffe\uffff\U0010ffff",  # what CLD2 refuses as "invalid UTF-8"
        ENGLISH + " \ud800 lone \udfff",  # surrogates: not even encodable
        ENGLISH + " \ufffd\ufffd",  # bytes that were not UTF-8, as extract decodes them
    ],
)
def test_characters_the_detector_refuses_do_not_stop_it(text):
    assert detect_language(text, 4096).language == "en"
    assert LanguageFilter(frozenset({"en"}), 0.5, 4096).decide(text) is None


def test_empty_and_undecodable_documents_are_removed_for_what_they_are(tmp_path):
    binary = "\ufffd\x00" * 200
    store, ref = run_clean(tmp_path, [[("empty", ""), ("binary", binary), ("en", ENGLISH)]])
    removed = {row["doc_id"]: row for row in rows(store, ref, "removed")}
    assert {doc_id: row["reason"] for doc_id, row in removed.items()} == {
        "empty": "too_short",
        "binary": "invalid_utf8",
    }
    assert all(row["language"] is None and row["language_score"] is None for row in removed.values())


def test_unknown_language_codes_are_one_clear_error():
    with pytest.raises(ValueError, match=r"languages \['eng', 'xx'\] are not ISO 639-1 codes"):
        CleanConfig(languages=["en", "eng", "xx"])


@pytest.mark.slow  # two runs of the stage, one of them starting worker processes
def test_two_workers_write_the_same_bytes_as_one_with_the_language_filter(tmp_path):
    docs = [ENGLISH, FRENCH, GERMAN]
    shards = [[(f"doc-{s}-{i}", f"{docs[(s + i) % 3]} {s} {i}.") for i in range(12)] for s in range(4)]
    files = []
    for workers in (1, 2):
        store, ref = run_clean(tmp_path, shards, CleanConfig(workers=workers), name=f"store-{workers}")
        files.append({name: info["sha256"] for name, info in store.manifest("clean", ref.version)["files"].items()})
        assert store.manifest("clean", ref.version)["metrics"]["removed_by_reason"] == {"language": 32}
    assert files[0] == files[1]
