import json
import logging
import random

import pytest
from builders import publish_dedup

from model.tokenizer import EOT, FILENAME, Tokenizer, train_bpe, train_char
from storage.errors import ConfigError, DataIntegrityError
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
    assert metrics == {
        "kind": "char",
        "vocab_size": 7,
        "train_docs": 3,
        "train_chars": 7,
        "split_seed": 1337,
        "val_fraction": 0.05,
    }

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
    assert metrics["max_vocab_size"] == 290


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
    for wrong in ("", "../tokenizer/abc", ".hidden"):
        with pytest.raises(ValueError, match="reuse"):
            TokenizerConfig(reuse=wrong)


# -- reuse ----------------------------------------------------------------------------------------------

SPLIT = SplitConfig(seed=3, val_fraction=0.3)


def split_ids(n, val, split=SPLIT):
    found = (f"doc-{i}" for i in range(10**6))
    chosen = (d for d in found if is_val(d, split.seed, split.val_fraction) == val)
    return [next(chosen) for _ in range(n)]


def corpora(root):
    """Two dedup versions: the second adds training documents with characters the first has not."""
    train, val = split_ids(4, val=False), split_ids(1, val=True)
    first = [(train[0], "abc"), (train[1], "bcd"), (val[0], "xyz")]
    return publish_dedup(root, [first], "dedup-v1"), publish_dedup(root, [first, [(train[2], "qrs")]], "dedup-v2")


def tokenizer_bytes(root, version):
    return (Store(root).path("tokenizer", version) / FILENAME).read_bytes()


def test_reuse_keeps_the_tokenizer_byte_for_byte_with_its_split(tmp_path):
    root = tmp_path / "store"
    first, second = corpora(root)
    trained = STAGE.run(root, TokenizerConfig(kind="char", split=SPLIT), {"dedup": first})
    retrained = STAGE.run(root, TokenizerConfig(kind="char", split=SPLIT), {"dedup": second})
    assert tokenizer_bytes(root, retrained.version) != tokenizer_bytes(root, trained.version)  # "qrs" is new
    Store(root).set_latest("tokenizer", trained.version)

    kept = STAGE.run(root, TokenizerConfig(reuse="latest"), {"dedup": second})
    assert kept.version not in (trained.version, retrained.version)
    assert tokenizer_bytes(root, kept.version) == tokenizer_bytes(root, trained.version)
    manifest = Store(root).manifest("tokenizer", kept.version)
    assert manifest["inputs"] == {"dedup": second}  # the lineage the tokens stage checks
    assert manifest["metrics"] == {
        **Store(root).manifest("tokenizer", trained.version)["metrics"],
        "reused_from": trained.version,
    }
    assert (manifest["metrics"]["split_seed"], manifest["metrics"]["val_fraction"]) == (3, 0.3)
    assert Store(root).latest("tokenizer") == kept.version


def test_the_same_reused_tokenizer_gives_the_same_version_however_it_is_named(tmp_path):
    root = tmp_path / "store"
    first, second = corpora(root)
    trained = STAGE.run(root, TokenizerConfig(kind="bpe", vocab_size=300, split=SPLIT), {"dedup": first})
    by_latest = STAGE.run(root, TokenizerConfig(reuse="latest"), {"dedup": second})
    assert not by_latest.reused
    # latest now names the kept copy; it, the trained version and "latest" are the same tokenizer.
    for name in ("latest", trained.version, by_latest.version):
        again = STAGE.run(root, TokenizerConfig(reuse=name), {"dedup": second})
        assert (again.version, again.reused) == (by_latest.version, True)
    # A copy of a copy carries the first one's split and vocabulary setting.
    metrics = Store(root).manifest("tokenizer", by_latest.version)["metrics"]
    assert Store(root).manifest("tokenizer", by_latest.version)["params"]["split"] == SplitConfig().model_dump()
    third = publish_dedup(root, [[(split_ids(1, val=False)[0], "abc")], [(split_ids(1, val=True)[0], "z")]], "dedup-v3")
    chained = STAGE.run(root, TokenizerConfig(reuse=by_latest.version), {"dedup": third})
    assert Store(root).manifest("tokenizer", chained.version)["metrics"] == {
        **metrics,
        "reused_from": by_latest.version,
    }
    assert (metrics["split_seed"], metrics["val_fraction"], metrics["max_vocab_size"]) == (3, 0.3, 300)


def test_reuse_latest_with_no_tokenizer_stored_trains_one(tmp_path, caplog):
    root = tmp_path / "store"
    first, _ = corpora(root)
    caplog.set_level(logging.INFO, logger="gptflow.tokenizer")
    ref = STAGE.run(root, TokenizerConfig(kind="char", split=SPLIT, reuse="latest"), {"dedup": first})
    assert "the store holds no tokenizer yet: training one" in caplog.text
    metrics = Store(root).manifest("tokenizer", ref.version)["metrics"]
    assert "reused_from" not in metrics and metrics["train_docs"] == 2
    # What it made is what training makes: the same version.
    again = STAGE.run(root, TokenizerConfig(kind="char", split=SPLIT), {"dedup": first})
    assert (again.version, again.reused) == (ref.version, True)


def test_reusing_a_version_that_is_not_stored_is_a_one_line_config_error(tmp_path):
    root = tmp_path / "store"
    first, _ = corpora(root)
    with pytest.raises(ConfigError, match="tokenizer.reuse: no tokenizer version 'abc123def456' in the store") as exc:
        STAGE.run(root, TokenizerConfig(reuse="abc123def456"), {"dedup": first})
    assert "\n" not in str(exc.value)
    assert Store(root).latest("tokenizer") is None


def test_settings_given_with_reuse_must_match_the_reused_tokenizer(tmp_path):
    root = tmp_path / "store"
    first, second = corpora(root)
    trained = STAGE.run(root, TokenizerConfig(kind="bpe", vocab_size=300, split=SPLIT), {"dedup": first})
    ids = Store(root).manifest("tokenizer", trained.version)["metrics"]["vocab_size"]
    assert ids < 300  # three tiny documents: fewer merges than asked for
    for given in ({"vocab_size": 300}, {"vocab_size": ids}, {"kind": "bpe", "split": SPLIT.model_dump()}):
        ref = STAGE.run(root, TokenizerConfig.model_validate({"reuse": trained.version, **given}), {"dedup": second})
        assert Store(root).manifest("tokenizer", ref.version)["metrics"]["reused_from"] == trained.version
    wrong = {"kind": "char", "vocab_size": 4096, "split": {"seed": 4, "val_fraction": 0.3}}
    for field, expected in (
        ("kind", r"kind 'char' \(it is 'bpe'\)$"),
        ("vocab_size", rf"vocab_size 4096 \(it has {ids} ids, trained with vocab_size 300\)$"),
        ("split", r"split seed=4, val_fraction=0.3 \(it was trained with seed=3, val_fraction=0.3\)$"),
    ):
        cfg = TokenizerConfig.model_validate({"reuse": "latest", field: wrong[field]})
        with pytest.raises(ConfigError, match=f"does not match the settings given with it: {expected}"):
            STAGE.run(root, cfg, {"dedup": second})
    with pytest.raises(ConfigError, match="kind 'char' .*; vocab_size 4096 .*; split seed=4") as exc:
        STAGE.run(root, TokenizerConfig.model_validate({"reuse": "latest", **wrong}), {"dedup": second})
    assert "\n" not in str(exc.value)


def test_a_damaged_tokenizer_is_not_reused(tmp_path):
    root = tmp_path / "store"
    first, second = corpora(root)
    trained = STAGE.run(root, TokenizerConfig(kind="char", split=SPLIT), {"dedup": first})
    path = Store(root).path("tokenizer", trained.version) / FILENAME
    content = path.read_bytes()
    path.write_bytes(content.replace(b'"a"', b'"A"'))  # same size, other bytes
    with pytest.raises(DataIntegrityError, match=r"tokenizer to reuse is damaged \(tokenizer.json does not match"):
        STAGE.run(root, TokenizerConfig(reuse="latest"), {"dedup": second})
    path.unlink()
    with pytest.raises(DataIntegrityError, match=r"tokenizer to reuse is damaged \(tokenizer.json is missing\)"):
        STAGE.run(root, TokenizerConfig(reuse="latest"), {"dedup": second})
    assert Store(root).latest("tokenizer") == trained.version
