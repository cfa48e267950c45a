"""The fast BPE encoder (tiktoken's core) gives the ids the `tokenizers` library gives, or is not used."""

import json
import random

import pytest
import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from model.fast_bpe import GPT2_PATTERN, fast_encoder
from model.tokenizer import EOT, Tokenizer, train_bpe
from tasks.sample_data import default_corpus_documents

# Characters where regex engines and Unicode tables could part ways: every kind of blank (NEL, no-break,
# ideographic, zero-width), letters and digits of other scripts (Lm, Lo, Nl, No), combining marks,
# apostrophes that are not ', emoji with joiners, and what GPT-2's pattern cuts on ('s 're, space runs).
TRICKY = (
    list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2007\u200a\u200b\u2028\u2029\u202f\u205f\u3000\ufeff")
    + list("aZé\u00df\u0131\u01c5\u02b0\u05d0\u0627\u0915\u0e01\u4e2d\u3042\uac00\U0001d400")
    + list("09\u00b2\u00bd\u0660\u0966\u2163\u2460\uff10\U0001d7ce")
    + list("\u0301\u0308\u093f\u20dd\u0e31")
    + list(".,!?;:-_'\"’`()[]{}<>|/\\@#$%^&*+=~")
    + ["'s", "'re", "'ve", "'ll", "'d", "'m", "'t", "'S", "  ", "   ", "\n\n", " \n ", "👍🏽", "👨‍👩‍👧", "🇫🇷", EOT]
)


def _hf_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    backend = HFTokenizer.from_str(tokenizer.to_json())
    backend.encode_special_tokens = True
    return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]


def _hostile_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    texts = [text for _, text in default_corpus_documents()[:300]]
    return train_bpe(texts + _hostile_texts(300, seed=1), vocab_size=1200)


def test_a_trained_tokenizer_encodes_through_the_fast_path(trained):
    assert fast_encoder(json.loads(trained.to_json())) is not None


def test_the_fast_path_gives_the_librarys_ids_on_prose_and_hostile_text(trained):
    prose = [text for _, text in default_corpus_documents()[300:500]]
    hostile = _hostile_texts(3000, seed=2)
    texts = prose + hostile + ["", " ", "<|endoftext|>", "a<|endoftext|>b", "x" * 5000, "  \n  \n\n\t "]
    assert trained.encode_batch(texts) == _hf_ids(trained, texts)
    assert [trained.encode(text) for text in hostile[:200]] == _hf_ids(trained, hostile[:200])
    # "<|endoftext|>" inside a document is ordinary text, as it is with the library.
    assert trained.eot_id not in trained.encode("a<|endoftext|>b")


def test_the_fast_path_gives_the_same_ids_on_one_thread_or_several(trained, monkeypatch):
    texts = _hostile_texts(200, seed=3)
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    one = trained.encode_batch(texts)
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    assert trained.encode_batch(texts) == one == _hf_ids(trained, texts)


def _spec_with(trained: Tokenizer, extra: dict[str, int], merges: list[list[str]]) -> dict:
    """`trained`'s file with only the byte tokens, then `extra` tokens made by `merges`."""
    spec = json.loads(trained.to_json())
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i <= 256}
    spec["model"]["vocab"] = vocab | extra
    spec["model"]["merges"] = merges
    return spec


def test_a_vocabulary_where_rank_order_changes_the_result_is_left_to_the_library(trained, tmp_path):
    # "abc" is made from (a, bc), but "ab" ranks before "bc": the library ends "abc" as [ab, c] (no merge
    # joins ab and c), rank-based BPE would join ab and c into abc all the same.
    spec = _spec_with(trained, {"ab": 257, "bc": 258, "abc": 259}, [["a", "b"], ["b", "c"], ["a", "bc"]])
    library = HFTokenizer.from_str(json.dumps(spec))
    assert library.encode("abc", add_special_tokens=False).ids == [257, library.token_to_id("c")]
    ranks = tiktoken.Encoding("check", pat_str=GPT2_PATTERN, mergeable_ranks=_ranks(spec), special_tokens={})
    assert ranks.encode_ordinary("abc") == [259]  # what the unchecked fast path would give
    assert fast_encoder(spec) is None
    # So the tokenizer encodes it through the library, and the token files get the library's ids.
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    assert Tokenizer.load(path).encode_batch(["abc", "abc abc"]) == [[257, library.token_to_id("c")]] + [
        library.encode("abc abc", add_special_tokens=False).ids
    ]
    # The same tokens made in an order rank-based BPE follows: the fast path is taken.
    assert fast_encoder(_spec_with(trained, {"ab": 257, "bc": 258, "abc": 259}, [["a", "b"], ["b", "c"], ["ab", "c"]]))


def _ranks(spec: dict) -> dict[bytes, int]:
    from model.fast_bpe import _as_bytes

    return {_as_bytes(token): i for token, i in spec["model"]["vocab"].items() if token != EOT}


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(normalizer={"type": "NFKC"}),
        lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
        lambda s: s["pre_tokenizer"].update(use_regex=False),
        lambda s: s["model"].update(dropout=0.1),
        lambda s: s["model"].update(byte_fallback=True),
        lambda s: s["model"].update(continuing_subword_prefix="##"),
        lambda s: s["added_tokens"].append({**s["added_tokens"][0], "id": 5000, "content": "<x>", "special": False}),
        lambda s: s["model"]["merges"].reverse(),  # ids no longer grow with the merge order
        lambda s: s["model"]["merges"].pop(),  # a token no merge makes
    ],
    ids=["normalizer", "prefix_space", "no_regex", "dropout", "byte_fallback", "prefix", "added", "order", "orphan"],
)
def test_anything_but_gpt2s_scheme_is_left_to_the_library(trained, change):
    spec = json.loads(trained.to_json())
    change(spec)
    assert fast_encoder(spec) is None
