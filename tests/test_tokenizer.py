import json
import random

import pytest
from builders import publish_dedup

from model.tokenizer import EOT, FILENAME, Tokenizer, train_bpe, train_char
from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.split import SplitConfig, is_val, split_unit
from tasks.tokenizer import STAGE, TokenizerConfig

TEXTS = [
    "The json module converts Python objects to text and back.",
    "A decoder can be given hooks that are called with every object it reads.",
    "Unicode works too: naïve café, Straße, 東京, emoji 🐍 and ∑ signs.",
] * 20


# -- split ----------------------------------------------------------------------------------------------


def test_split_is_deterministic_order_independent_and_about_the_right_size():
    ids = [f"urlsf_subset00-{i}/{i:07d}" for i in range(4000)]
    chosen = {doc_id for doc_id in ids if is_val(doc_id, 1337, 0.1)}
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert {doc_id for doc_id in shuffled if is_val(doc_id, 1337, 0.1)} == chosen
    assert 320 < len(chosen) < 480  # 10% of 4000, well within sampling noise
    other_seed = {doc_id for doc_id in ids if is_val(doc_id, 7, 0.1)}
    assert other_seed != chosen
    # A larger fraction only adds documents: the held-out set grows, never reshuffles.
    assert chosen <= {doc_id for doc_id in ids if is_val(doc_id, 1337, 0.2)}
    assert all(0.0 <= split_unit(doc_id, 2**64 - 1) < 1.0 for doc_id in ids[:100])


def test_split_config_bounds():
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="seed"):
        SplitConfig(seed=-1)


# -- byte-level BPE -------------------------------------------------------------------------------------


def test_bpe_round_trips_any_text_and_respects_the_vocab_size():
    tok = train_bpe(TEXTS, vocab_size=300, min_frequency=2)
    assert tok.kind == "bpe"
    assert 257 <= tok.vocab_size <= 300
    for text in [*TEXTS[:3], "never seen: Ωmega ☃ \t tabs\n\nnew lines", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(text) for text in TEXTS[:3]]
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges were learned


def test_bpe_end_of_text_is_special_but_cannot_be_injected_by_text():
    tok = train_bpe(TEXTS, vocab_size=300)
    assert tok.decode([tok.eot_id]) == EOT
    ids = tok.encode(f"one{EOT}two")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == f"one{EOT}two"


def test_bpe_training_is_deterministic_and_save_load_is_identical(tmp_path):
    first = train_bpe(TEXTS, vocab_size=320)
    second = train_bpe(iter(TEXTS), vocab_size=320)
    assert first.to_json() == second.to_json()
    path = first.save(tmp_path)
    assert path == tmp_path / FILENAME
    loaded = Tokenizer.load(path)
    assert loaded.kind == "bpe"
    assert loaded.to_json() == first.to_json()
    assert loaded.encode(TEXTS[2]) == first.encode(TEXTS[2])
    assert loaded.encode(EOT) != [first.eot_id]


def test_bpe_vocab_must_hold_every_byte_and_the_end_token():
    with pytest.raises(ValueError, match="vocab_size 256 is below 257"):
        train_bpe(TEXTS, vocab_size=256)


# -- char ------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unknown(tmp_path):
    tok = train_char(["hello wörld", "東京"])
    assert tok.kind == "char"
    assert tok.vocab_size == len(set("hello wörld東京")) + 2
    assert tok.decode(tok.encode("hold 東京 wörld")) == "hold 東京 wörld"
    ids = tok.encode("hex🐍")
    assert ids[2] == tok.encode("x")[0] == tok.unk_id and ids[3] == tok.unk_id
    assert tok.decode(ids) == "he\ufffd\ufffd"
    assert tok.eot_id not in (tok.encode(EOT))
    assert tok.decode([tok.eot_id]) == EOT
    assert tok.encode_batch(["he", "lo"]) == [tok.encode("he"), tok.encode("lo")]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])

    tok.save(tmp_path / "t.json")
    loaded = Tokenizer.load(tmp_path / "t.json")
    assert loaded.kind == "char"
    assert (tmp_path / "t.json").read_text() == train_char(["東京", "hello wörld"]).to_json()
    assert loaded.encode("hello 東京") == tok.encode("hello 東京")


def test_loading_a_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataIntegrityError, match="no tokenizer file"):
        Tokenizer.load(tmp_path)
    (tmp_path / FILENAME).write_text("{not json")
    with pytest.raises(DataIntegrityError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path)
    (tmp_path / FILENAME).write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(DataIntegrityError, match="neither a byte-level BPE nor a char tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / FILENAME).write_text(json.dumps({"format": "gptflow-char", "version": 1, "chars": ["ab"]}))
    with pytest.raises(DataIntegrityError, match="corrupt char vocabulary"):
        Tokenizer.load(tmp_path)


# -- the stage ------------------------------------------------------------------------------------------


def doc_ids(n, val):
    """The first n document ids that fall on the validation (val=True) or training side of the default split."""
    split = SplitConfig()
    found = (f"doc-{i}" for i in range(10**6))
    chosen = (d for d in found if is_val(d, split.seed, split.val_fraction) == val)
    return [next(chosen) for _ in range(n)]


def test_stage_trains_on_training_documents_only(tmp_path):
    root = tmp_path / "store"
    train_ids, val_ids = doc_ids(3, val=False), doc_ids(1, val=True)
    dedup = publish_dedup(
        root,
        [[(train_ids[0], "abc"), (val_ids[0], "xyz only in validation")], [(train_ids[1], "bcd"), (train_ids[2], "e")]],
    )
    ref = STAGE.run(root, TokenizerConfig(kind="char"), {"dedup": dedup})
    folder = Store(root).path("tokenizer", ref.version)
    tok = Tokenizer.load(folder / FILENAME)
    assert tok.encode("xyz") == [tok.unk_id] * 3
    assert tok.decode(tok.encode("abcde")) == "abcde"
    metrics = Store(root).manifest("tokenizer", ref.version)["metrics"]
    assert metrics == {"kind": "char", "vocab_size": 7, "train_docs": 3, "train_chars": 7}

    limited = STAGE.run(root, TokenizerConfig(kind="char", max_train_docs=1), {"dedup": dedup})
    assert Store(root).manifest("tokenizer", limited.version)["metrics"]["train_docs"] == 1


def test_stage_bpe_reports_actual_vocab_size(tmp_path):
    root = tmp_path / "store"
    dedup = publish_dedup(root, [list(zip(doc_ids(len(TEXTS), val=False), TEXTS, strict=True))])
    ref = STAGE.run(root, TokenizerConfig(vocab_size=290), {"dedup": dedup})
    metrics = Store(root).manifest("tokenizer", ref.version)["metrics"]
    assert metrics["kind"] == "bpe"
    assert metrics["vocab_size"] == Tokenizer.load(Store(root).path("tokenizer", ref.version)).vocab_size <= 290
    assert metrics["train_docs"] == len(TEXTS)


def test_no_training_document_is_a_clear_error(tmp_path):
    root = tmp_path / "store"
    dedup = publish_dedup(root, [[(doc_ids(1, val=True)[0], "only a validation document")]])
    with pytest.raises(DataIntegrityError, match=r"no training text \(0 training documents.*val_fraction 0.05"):
        STAGE.run(root, TokenizerConfig(), {"dedup": dedup})
    assert Store(root).latest("tokenizer") is None


def test_config_bounds():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="kind"):
        TokenizerConfig(kind="wordpiece")
