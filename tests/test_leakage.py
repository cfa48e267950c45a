"""Leakage between the splits: how much validation text a training document also holds, in the tokens
stage's metrics and meta.json."""

from builders import publish_dedup

from storage.store import Store
from storage.tokens import read_meta
from tasks import tokenizer as tokenizer_stage
from tasks.split import SplitConfig, is_val
from tasks.tokens import PARAGRAPH_CHARS, STAGE, TokensConfig, paragraphs

SPLIT = SplitConfig(seed=3, val_fraction=0.3)
CANDIDATES = [f"doc-{i}" for i in range(200)]
VAL_IDS = [d for d in CANDIDATES if is_val(d, SPLIT.seed, SPLIT.val_fraction)]
TRAIN_IDS = [d for d in CANDIDATES if not is_val(d, SPLIT.seed, SPLIT.val_fraction)]


def paragraph(tag: str, n: int) -> str:
    """A paragraph of exactly n characters, told apart from the others by its tag."""
    text = (f"{tag}: data flows through a pipeline into tokens and back again " * 4)[: n - 1] + "."
    assert len(text) == n
    return text


A, B, C, D, E, F = (
    paragraph("a", 80),
    paragraph("b", PARAGRAPH_CHARS),  # exactly at the threshold: compared
    paragraph("c", PARAGRAPH_CHARS - 1),  # just below: too short to compare, wherever it is
    paragraph("d", 120),
    paragraph("e", 70),
    paragraph("f", 100),
)
# Validation paragraphs, counted each time they occur: A, B, D, E, F, F (C is too short).
VAL_DOCS = [
    (VAL_IDS[0], f"Title\n{A}\n{B}\nshort line\n"),
    (VAL_IDS[1], f"{C}\n{D}\n{F}"),
    (VAL_IDS[2], f"  {E}  \r\n{F}"),
]
VAL_CHARS = 80 + 60 + 120 + 70 + 100 + 100


def leakage(root, shards):
    dedup = publish_dedup(root, shards)
    tok_cfg = tokenizer_stage.TokenizerConfig(kind="char", split=SPLIT)
    tok_ref = tokenizer_stage.STAGE.run(root, tok_cfg, {"dedup": dedup})
    ref = STAGE.run(root, TokensConfig(), {"dedup": dedup, "tokenizer": tok_ref})
    meta = read_meta(Store(root).path("tokens", ref.version))
    assert Store(root).manifest("tokens", ref.version)["metrics"] == meta
    return {key: meta[key] for key in ("val_paragraphs", "val_leaked_paragraphs", "val_leakage", "val_leakage_chars")}


def test_paragraphs_are_lines_of_60_characters_or_more_stripped():
    assert list(paragraphs(VAL_DOCS[0][1])) == [A, B]
    assert list(paragraphs(VAL_DOCS[2][1])) == [E, F]  # surrounding spaces and the \r are not compared
    assert list(paragraphs(C)) == []


def test_validation_paragraphs_copied_into_training_documents_give_the_exact_fraction(tmp_path):
    train_docs = [
        (TRAIN_IDS[0], f"An introduction.\n{A}\nMore text that is not in validation."),
        (TRAIN_IDS[1], f"   {E}"),  # indented in training: the same paragraph
        (TRAIN_IDS[2], f"{C}\nshort line"),  # too short to count, in either split
        (TRAIN_IDS[3], "Nothing from validation here."),
    ]
    # B is found in a training document of another shard than its validation document's.
    shards = [VAL_DOCS + train_docs, [(TRAIN_IDS[4], f"Copied:\n{B}\n")]]
    assert leakage(tmp_path / "store", shards) == {
        "val_paragraphs": 6,
        "val_leaked_paragraphs": 3,  # A, B and E; D and the two Fs are not in training documents
        "val_leakage": 3 / 6,
        "val_leakage_chars": (80 + 60 + 70) / VAL_CHARS,
    }


def test_a_paragraph_repeated_in_validation_counts_each_time(tmp_path):
    shards = [[*VAL_DOCS, (TRAIN_IDS[0], f"{F}\n{F}")]]
    assert leakage(tmp_path / "store", shards) == {
        "val_paragraphs": 6,
        "val_leaked_paragraphs": 2,
        "val_leakage": 2 / 6,
        "val_leakage_chars": 200 / VAL_CHARS,
    }


def test_a_clean_corpus_has_no_leakage(tmp_path):
    train_docs = [(TRAIN_IDS[i], f"{paragraph(f'train {i}', 90)}\n{C}") for i in range(5)]
    assert leakage(tmp_path / "store", [VAL_DOCS[:2], [VAL_DOCS[2], *train_docs]]) == {
        "val_paragraphs": 6,
        "val_leaked_paragraphs": 0,
        "val_leakage": 0.0,
        "val_leakage_chars": 0.0,
    }


def test_validation_without_paragraphs_reports_none(tmp_path):
    shards = [[(VAL_IDS[0], "short\nlines"), (TRAIN_IDS[0], f"{A}\nshort")]]
    assert leakage(tmp_path / "store", shards) == {
        "val_paragraphs": 0,
        "val_leaked_paragraphs": 0,
        "val_leakage": 0.0,
        "val_leakage_chars": 0.0,
    }


def test_leakage_measured_from_cached_shards_is_the_same(tmp_path):
    root = tmp_path / "store"
    first = leakage(root, [VAL_DOCS, [(TRAIN_IDS[0], f"{D}\ntext")]])
    assert first["val_leaked_paragraphs"] == 1
    tok_ref = Store(root).latest("tokenizer")
    ref = STAGE.run(root, TokensConfig(), {"dedup": "dedup-v1", "tokenizer": tok_ref}, force=True)
    metrics = Store(root).manifest("tokens", ref.version)["metrics"]
    assert {key: metrics[key] for key in first} == first


def test_paragraph_dedup_drives_the_leakage_to_zero(tmp_path):
    from builders import publish_docs

    from tasks import dedup as dedup_stage

    train_docs = [
        (TRAIN_IDS[0], f"An introduction of its own, long enough to stay a document.\n{A}\n{D}"),
        (TRAIN_IDS[1], f"  {E}\nAnd a closing line that is only in this training document, nowhere else."),
    ]
    shards = [train_docs[:1] + VAL_DOCS[:2], VAL_DOCS[2:] + train_docs[1:]]
    root = tmp_path / "store"
    clean = publish_docs(root, "clean", shards, "clean-v1", columns=("doc_id", "text", "n_bytes"))

    def measured(paragraphs_on: bool) -> dict:
        cfg = dedup_stage.DedupConfig(method="exact", paragraphs=paragraphs_on)
        dedup = dedup_stage.STAGE.run(root, cfg, {"clean": clean})
        tok = tokenizer_stage.STAGE.run(
            root, tokenizer_stage.TokenizerConfig(kind="char", split=SPLIT), {"dedup": dedup}
        )
        ref = STAGE.run(root, TokensConfig(), {"dedup": dedup, "tokenizer": tok})
        return read_meta(Store(root).path("tokens", ref.version))

    before, after = measured(False), measured(True)
    assert before["val_leaked_paragraphs"] > 0 and before["val_leakage"] > 0
    assert after["val_leaked_paragraphs"] == 0 and after["val_leakage"] == 0.0
    assert after["val_docs"] > 0 and after["train_docs"] > 0  # the documents stay, less their repeated lines
