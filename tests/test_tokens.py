import json
from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import publish_dedup

from model.tokenizer import FILENAME, Tokenizer, train_char
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store
from storage.tokens import TokenFileWriter, open_tokens, read_meta, token_dtype
from tasks import tokenizer as tokenizer_stage
from tasks.shards import read_batches
from tasks.split import SplitConfig, is_val
from tasks.tokens import STAGE, TokensConfig

SPLIT = SplitConfig(seed=3, val_fraction=0.3)
WORDS = ["data", "flows", "through", "a", "pipeline", "into", "tokens", "ünïcode", "東京", "🐍", "and", "back"]


def make_docs(n):
    rng = np.random.default_rng(0)
    return [(f"doc-{i}", " ".join(rng.choice(WORDS, size=5 + i % 9)) + ".") for i in range(n)]


def build_tokens(root, shards, kind="bpe", tokens_cfg=None, split=SPLIT):
    dedup = publish_dedup(root, shards)
    tok_cfg = tokenizer_stage.TokenizerConfig(kind=kind, vocab_size=300, split=split)
    tok_ref = tokenizer_stage.STAGE.run(root, tok_cfg, {"dedup": dedup})
    ref = STAGE.run(root, tokens_cfg or TokensConfig(), {"dedup": dedup, "tokenizer": tok_ref})
    return Store(root).path("tokens", ref.version), tok_ref


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_token_files_match_meta_index_and_documents(tmp_path, kind):
    docs = make_docs(40)
    folder, tok_ref = build_tokens(
        tmp_path / "store", [docs[:25], docs[25:]], kind=kind, tokens_cfg=TokensConfig(batch_docs=7)
    )
    meta = read_meta(folder)
    tok = Tokenizer.load(folder / FILENAME)
    assert (folder / FILENAME).read_bytes() == (
        Store(tmp_path / "store").path("tokenizer", tok_ref.version) / FILENAME
    ).read_bytes()
    assert meta["tokenizer_version"] == tok_ref.version
    assert meta["tokenizer_kind"] == kind
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.vocab_size
    assert meta["eot_token"] == tok.eot_id
    assert (meta["split_seed"], meta["val_fraction"]) == (SPLIT.seed, SPLIT.val_fraction)

    val_ids = {d for d, _ in docs if is_val(d, SPLIT.seed, SPLIT.val_fraction)}
    texts = dict(docs)
    for split, wanted in (
        ("train", [d for d, _ in docs if d not in val_ids]),
        ("val", sorted(val_ids, key=lambda d: int(d[4:]))),
    ):
        data = open_tokens(folder, split)
        assert data.size == meta[f"{split}_tokens"] == (folder / f"{split}.bin").stat().st_size // 2
        assert meta[f"{split}_docs"] == len(wanted) > 0
        assert meta[f"{split}_bytes"] == sum(len(texts[d].encode()) for d in wanted)
        # <|endoftext|> follows every document and nothing else: splitting at it gives the documents back.
        ends = np.flatnonzero(data == tok.eot_id)
        assert ends.size == len(wanted) and ends[-1] == data.size - 1
        pieces = np.split(np.asarray(data), ends[:-1] + 1)
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == [texts[d] for d in wanted]

    index = pq.read_table(folder / "index.parquet").to_pylist()
    assert [row["doc_id"] for row in index] == [d for d, _ in docs]  # every document once, in shard order
    for row in index:
        assert row["split"] == ("val" if row["doc_id"] in val_ids else "train")
        data = open_tokens(folder, row["split"])
        span = data[row["offset"] : row["offset"] + row["n_tokens"]].tolist()
        assert span == tok.encode(texts[row["doc_id"]])
        assert data[row["offset"] + row["n_tokens"]] == tok.eot_id

    metrics = Store(tmp_path / "store").manifest("tokens", folder.name)["metrics"]
    assert metrics == meta


def test_uint32_past_65536_ids():
    assert token_dtype(65_536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(50_257) == np.uint16


def test_a_vocabulary_past_65536_ids_writes_uint32_tokens(tmp_path):
    chars = [chr(cp) for cp in range(0x100, 0x20000) if not 0xD800 <= cp <= 0xDFFF][:70_000]
    ids = [f"doc-{i}" for i in range(200)]
    train_id = next(d for d in ids if not is_val(d, SPLIT.seed, SPLIT.val_fraction))
    val_id = next(d for d in ids if is_val(d, SPLIT.seed, SPLIT.val_fraction))
    big = "".join(chars)
    folder, _ = build_tokens(tmp_path / "store", [[(train_id, big), (val_id, big[-5:])]], kind="char")
    meta = read_meta(folder)
    assert meta["dtype"] == "uint32"
    assert meta["vocab_size"] == train_char([big]).vocab_size == 70_002
    data = open_tokens(folder, "train")
    assert data.dtype == np.uint32 and int(data.max()) > 65_535
    tok = Tokenizer.load(folder)
    assert tok.decode(data[:-1].tolist()) == big
    assert tok.decode(open_tokens(folder, "val")[:-1].tolist()) == big[-5:]


def test_an_empty_split_is_a_clear_error(tmp_path):
    docs = [(d, t) for d, t in make_docs(60) if not is_val(d, SPLIT.seed, SPLIT.val_fraction)][:5]
    with pytest.raises(DataIntegrityError, match=r"5 train and 0 val documents, val_fraction 0.3"):
        build_tokens(tmp_path / "store", [docs])
    assert Store(tmp_path / "store").latest("tokens") is None


def test_the_split_must_be_the_tokenizers(tmp_path):
    docs = make_docs(30)
    other = SplitConfig(seed=4, val_fraction=0.3)
    with pytest.raises(ConfigError, match=r"seed=4, val_fraction=0.3\).*\(seed=3, val_fraction=0.3\)"):
        build_tokens(tmp_path / "a", [docs], tokens_cfg=TokensConfig(split=other))
    folder, _ = build_tokens(tmp_path / "b", [docs], tokens_cfg=TokensConfig(split=SPLIT))
    assert read_meta(folder)["split_seed"] == 3


def test_a_tokenizer_without_a_recorded_split_is_refused(tmp_path):
    root = tmp_path / "store"
    dedup = publish_dedup(root, [make_docs(10)])

    def build(out):
        train_char(["abc"]).save(out)

    Store(root).publish("tokenizer", "tok", build, params={}, inputs={}, code_version="test")
    with pytest.raises(DataIntegrityError, match=r"tokenizer/tok: its manifest records no valid split \(metrics"):
        STAGE.run(root, TokensConfig(), {"dedup": dedup, "tokenizer": "tok"})


def test_meta_is_plain_json_readers_can_check(tmp_path):
    folder, _ = build_tokens(tmp_path / "store", [make_docs(20)])
    meta = json.loads((folder / "meta.json").read_text())
    for key in (
        "dtype",
        "vocab_size",
        "eot_token",
        "train_tokens",
        "val_tokens",
        "train_docs",
        "val_docs",
        "tokenizer_version",
        "tokenizer_kind",
        "split_seed",
        "val_fraction",
        "train_bytes",
        "val_bytes",
        "val_paragraphs",
        "val_leaked_paragraphs",
        "val_leakage",
        "val_leakage_chars",
    ):
        assert key in meta


def test_a_tokenizer_trained_on_other_documents_is_refused(tmp_path):
    root = tmp_path / "store"
    docs = make_docs(40)
    _, tok_ref = build_tokens(root, [docs[:30]])
    other = publish_dedup(root, [docs[10:]], version="dedup-v2")
    with pytest.raises(ConfigError, match=f"tokenizer/{tok_ref.version} was built from dedup/dedup-v1, not from the "):
        STAGE.run(root, TokensConfig(), {"dedup": other, "tokenizer": tok_ref})
    assert Store(root).versions("tokens")[-1]["inputs"]["dedup"] == "dedup-v1"  # nothing published for v2


# -- per-shard encoding ---------------------------------------------------------------------------------

ONE_PASS_INDEX_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("split", pa.string()), ("offset", pa.int64()), ("n_tokens", pa.int64())]
)
OUTPUTS = ("train.bin", "val.bin", "index.parquet")


def encode_in_one_pass(dedup_dir, tokenizer_file, split, batch_docs, out):
    """The token files as one pass over every shard writes them (the stage before it encoded per shard)."""
    tokenizer = Tokenizer.load(tokenizer_file)
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir()
    with ExitStack() as stack:
        writers = {n: stack.enter_context(TokenFileWriter(out / f"{n}.bin", dtype)) for n in ("train", "val")}
        index = stack.enter_context(pq.ParquetWriter(out / "index.parquet", ONE_PASS_INDEX_SCHEMA, compression="zstd"))
        for shard in sorted((dedup_dir / "docs").glob("*.parquet")):
            for batch in read_batches(shard, ["doc_id", "text"], batch_docs):
                doc_ids = batch.column("doc_id").to_pylist()
                texts = [text or "" for text in batch.column("text").to_pylist()]
                rows = {name: [] for name in ONE_PASS_INDEX_SCHEMA.names}
                for doc_id, ids in zip(doc_ids, tokenizer.encode_batch(texts), strict=True):
                    name = "val" if is_val(doc_id, split.seed, split.val_fraction) else "train"
                    offset = writers[name].write(np.array([*ids, tokenizer.eot_id], dtype=np.int64))
                    for key, value in zip(rows, (doc_id, name, offset, len(ids)), strict=True):
                        rows[key].append(value)
                index.write_table(pa.table(rows, schema=ONE_PASS_INDEX_SCHEMA))
    return out


def shard_entries(root):
    """The cached shard encodings of the tokens stage."""
    return sorted((root / "tokens" / ".shards" / "encode").glob("*/*"))


def assert_same_files(folder, expected):
    for name in OUTPUTS:
        assert (folder / name).read_bytes() == (expected / name).read_bytes(), name


def test_shard_by_shard_encoding_gives_the_one_pass_bytes_fresh_and_from_the_cache(tmp_path):
    root = tmp_path / "store"
    docs = make_docs(60)
    batch_docs = 7  # several index row groups per shard: they must come out as one pass writes them
    folder, tok_ref = build_tokens(root, [docs[:25], docs[25:40], docs[40:]], tokens_cfg=TokensConfig(batch_docs=7))
    dedup = Store(root).path("dedup", "dedup-v1")
    tokenizer_file = Store(root).path("tokenizer", tok_ref.version) / FILENAME
    expected = encode_in_one_pass(dedup, tokenizer_file, SPLIT, batch_docs, tmp_path / "one-pass")
    assert pq.ParquetFile(folder / "index.parquet").num_row_groups > 3
    assert_same_files(folder, expected)
    assert len(shard_entries(root)) == 3

    # Rebuilt from the three cached shards: the same bytes.
    STAGE.run(root, TokensConfig(batch_docs=7), {"dedup": "dedup-v1", "tokenizer": tok_ref}, force=True)
    assert_same_files(folder, expected)
    assert len(shard_entries(root)) == 3

    # Another batch size makes other index row groups: shards cached with batch_docs 7 are not used for it.
    STAGE.run(root, TokensConfig(batch_docs=11), {"dedup": "dedup-v1", "tokenizer": tok_ref}, force=True)
    assert_same_files(folder, encode_in_one_pass(dedup, tokenizer_file, SPLIT, 11, tmp_path / "one-pass-11"))


def test_a_nightly_run_with_one_new_shard_and_the_same_tokenizer_encodes_that_shard_only(tmp_path):
    root = tmp_path / "store"
    docs = make_docs(60)
    tok_cfg = tokenizer_stage.TokenizerConfig(kind="bpe", vocab_size=300, split=SPLIT, reuse="latest")
    first = publish_dedup(root, [docs[:20], docs[20:40]], version="dedup-v1")
    trained = tokenizer_stage.STAGE.run(root, tok_cfg, {"dedup": first})  # none stored yet: trained
    STAGE.run(root, TokensConfig(), {"dedup": first, "tokenizer": trained})
    assert len(shard_entries(root)) == 2

    second = publish_dedup(root, [docs[:20], docs[20:40], docs[40:]], version="dedup-v2")
    kept = tokenizer_stage.STAGE.run(root, tok_cfg, {"dedup": second})
    assert kept.version != trained.version
    ref = STAGE.run(root, TokensConfig(), {"dedup": second, "tokenizer": kept})
    assert len(shard_entries(root)) == 3  # the two unchanged shards came from the cache
    folder = Store(root).path("tokens", ref.version)
    tokenizer_file = Store(root).path("tokenizer", kept.version) / FILENAME
    expected = encode_in_one_pass(Store(root).path("dedup", second), tokenizer_file, SPLIT, 512, tmp_path / "v2")
    assert_same_files(folder, expected)
    assert read_meta(folder)["tokenizer_version"] == kept.version
    assert read_meta(folder)["train_docs"] + read_meta(folder)["val_docs"] == 60

    # A tokenizer trained anew on the new corpus encodes differently: every shard is encoded again.
    retrained = tokenizer_stage.STAGE.run(
        root, tokenizer_stage.TokenizerConfig(kind="bpe", vocab_size=280, split=SPLIT), {"dedup": second}
    )
    STAGE.run(root, TokensConfig(), {"dedup": second, "tokenizer": retrained})
    assert len(shard_entries(root)) == 6


def test_a_shard_encoded_under_another_split_is_not_taken_from_the_cache(tmp_path):
    root = tmp_path / "store"
    docs = make_docs(40)
    dedup = publish_dedup(root, [docs])
    refs = {}
    for split in (SPLIT, SplitConfig(seed=4, val_fraction=0.3)):
        tok_cfg = tokenizer_stage.TokenizerConfig(kind="char", split=split)
        tok_ref = tokenizer_stage.STAGE.run(root, tok_cfg, {"dedup": dedup})
        refs[split.seed] = (tok_ref, STAGE.run(root, TokensConfig(), {"dedup": dedup, "tokenizer": tok_ref}))
    # The same characters on both training sides: the two tokenizer files are the same bytes.
    files = [Store(root).path("tokenizer", tok.version) / FILENAME for tok, _ in refs.values()]
    assert files[0].read_bytes() == files[1].read_bytes()
    index = pq.read_table(Store(root).path("tokens", refs[4][1].version) / "index.parquet").to_pylist()
    assert [row["split"] for row in index] == ["val" if is_val(d, 4, 0.3) else "train" for d, _ in docs]
    assert len(shard_entries(root)) == 2


def test_tokens_take_the_split_a_reused_tokenizer_carries(tmp_path):
    root = tmp_path / "store"
    docs = make_docs(40)
    first = publish_dedup(root, [docs[:30]], version="dedup-v1")
    trained = tokenizer_stage.STAGE.run(
        root, tokenizer_stage.TokenizerConfig(kind="char", split=SPLIT), {"dedup": first}
    )
    second = publish_dedup(root, [docs], version="dedup-v2")
    # The split left unset with reuse: the kept tokenizer's split holds, though the params record the default.
    kept = tokenizer_stage.STAGE.run(root, tokenizer_stage.TokenizerConfig(reuse=trained.version), {"dedup": second})
    assert Store(root).manifest("tokenizer", kept.version)["params"]["split"] == SplitConfig().model_dump()
    ref = STAGE.run(root, TokensConfig(), {"dedup": second, "tokenizer": kept})
    meta = read_meta(Store(root).path("tokens", ref.version))
    assert (meta["split_seed"], meta["val_fraction"]) == (SPLIT.seed, SPLIT.val_fraction)
    assert meta["val_docs"] == sum(is_val(d, SPLIT.seed, SPLIT.val_fraction) for d, _ in docs)
    with pytest.raises(ConfigError, match=r"tokens split \(seed=1337, val_fraction=0.05\) differs"):
        STAGE.run(root, TokensConfig(split=SplitConfig()), {"dedup": second, "tokenizer": kept})


def test_workers_do_not_change_the_output(tmp_path):
    docs = make_docs(30)
    one, _ = build_tokens(tmp_path / "a", [docs[:10], docs[10:20], docs[20:]], kind="char")
    two, _ = build_tokens(
        tmp_path / "b", [docs[:10], docs[10:20], docs[20:]], kind="char", tokens_cfg=TokensConfig(workers=2)
    )
    assert one.name == two.name
    assert_same_files(one, two)


def test_a_damaged_meta_json_is_one_line_naming_it(tmp_path) -> None:
    from storage.errors import DataIntegrityError
    from storage.tokens import read_meta

    (tmp_path / "meta.json").write_text("{'dtype': 'uint16'}", encoding="utf-8")  # same size as valid JSON
    with pytest.raises(DataIntegrityError, match=r"meta\.json: damaged, not JSON \(JSONDecodeError\)"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataIntegrityError, match="not a JSON object"):
        read_meta(tmp_path)
