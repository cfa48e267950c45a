import json
import math
from pathlib import Path

import builders
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from model.baselines import bigram_baseline
from model.checkpoint import save_model
from model.completion import (
    CompletionSuiteConfig,
    build_completion_suite,
    documents_from_tokens,
    evaluate_suite,
    next_token_accuracy,
)
from model.evaluate import bits_per_byte, eval_loss, eval_windows, target_bytes, token_byte_lengths, unigram_loss
from model.gpt import GPT, GPTConfig
from model.quantize import save_quantized
from model.tokenizer import EOT, BPETokenizer, Tokenizer, train_bpe, train_char
from storage.errors import DataIntegrityError
from storage.registry import CHAMPION, PROMOTED, Registry
from storage.store import Store
from storage.tokens import open_tokens, read_meta
from tasks import tokenizer as tokenizer_stage
from tasks import tokens as tokens_stage
from tasks.evaluate import (
    REPORT_JSON,
    REPORT_MD,
    EvaluateConfig,
    choose_champion,
    quantize_summary,
    registry_snapshot,
)
from tasks.evaluate import STAGE as EVALUATE
from tasks.quantize import STAGE as QUANTIZE
from tasks.quantize import QuantizeConfig
from tasks.split import SplitConfig
from tasks.stage import cache_key

TEXT = "the cat sat on the mat. a dog ran to the cat. "
# Characters of 1, 2, 3 and 4 UTF-8 bytes: a char tokenizer over them has ids of four byte lengths.
WIDE = "aé€😀"
HELDOUT = [{"prompt": "the cat", "response": " sat on the mat."}, {"prompt": "a dog", "response": " ran to the cat."}]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BigramTable(nn.Module):
    """A model whose logits at a position depend on that position's token only: easy to score by hand."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self.table[idx], None  # (B, T, vocab)


def hand_loss(table: torch.Tensor, tokens: np.ndarray) -> float:
    log_probs = F.log_softmax(table.double(), dim=-1).numpy()
    return float(-np.mean([log_probs[a, b] for a, b in zip(tokens[:-1], tokens[1:], strict=True)]))


def test_windows_cover_every_target_once() -> None:
    windows = eval_windows(23, 5)  # 22 targets: four windows of 5 and a last one of 2
    assert windows == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 2)]
    targets = [t for start, length in windows for t in range(start + 1, start + length + 1)]
    assert targets == list(range(1, 23))


def test_eval_loss_equals_a_hand_computation_whatever_the_batching() -> None:
    model = BigramTable(7)
    tokens = np.random.default_rng(0).integers(0, 7, 103).astype(np.uint16)
    expected = hand_loss(model.table.detach(), tokens)
    assert eval_loss(model, tokens, 10, 4, None) == pytest.approx(expected, rel=1e-6)
    assert eval_loss(model, tokens, 10, 1, None) == pytest.approx(expected, rel=1e-6)
    assert eval_loss(model, tokens, 16, 3, 50) == pytest.approx(hand_loss(model.table.detach(), tokens[:50]), rel=1e-6)


def test_eval_loss_of_a_gpt_is_deterministic_and_leaves_training_mode() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    tokens = np.random.default_rng(1).integers(0, 11, 200)
    first = eval_loss(model, tokens, 8, 4, None)
    assert model.training  # dropout was turned off for the evaluation only
    assert eval_loss(model, tokens, 8, 4, None) == first
    with pytest.raises(DataIntegrityError, match="at least 2 tokens"):
        eval_loss(model, tokens[:1], 8, 4, None)


def test_unigram_baseline_equals_a_hand_computation() -> None:
    train = np.array([0, 0, 1], dtype=np.uint16)  # add-one counts over a vocabulary of 3: 3, 2, 1 of 6
    val = np.array([2, 0, 1, 2], dtype=np.uint16)  # targets 0, 1, 2 (the first token is never a target)
    expected = -(math.log(3 / 6) + math.log(2 / 6) + math.log(1 / 6)) / 3
    assert unigram_loss(train, val, 3, None) == pytest.approx(expected)
    assert unigram_loss(train, val, 3, 3) == pytest.approx(-(math.log(3 / 6) + math.log(2 / 6)) / 2)
    with pytest.raises(DataIntegrityError, match="token id 5 is outside the vocabulary of 3"):
        unigram_loss(np.array([5], dtype=np.uint16), val, 3, None)


def test_bits_per_byte_converts_per_token_nats() -> None:
    # 2 bits per token, and each token stands for 4 bytes on average: half a bit per byte.
    assert bits_per_byte(2 * math.log(2), n_tokens=100, n_bytes=400) == pytest.approx(0.5)
    # A char tokenizer on ASCII text has one token per byte: bits per byte is the loss in bits.
    assert bits_per_byte(1.0, 10, 10) == pytest.approx(1 / math.log(2))
    with pytest.raises(DataIntegrityError, match="positive token and byte counts"):
        bits_per_byte(1.0, 10, 0)


def test_char_ids_count_their_utf8_bytes_and_end_of_text_none() -> None:
    tokenizer = train_char([WIDE])  # ids: a, é, €, 😀, then <|endoftext|> and the unknown id
    assert token_byte_lengths(tokenizer).tolist() == [1, 2, 3, 4, 0, 3]  # unknown: the U+FFFD it decodes to


def test_bpe_ids_count_the_bytes_they_decode_to() -> None:
    texts = ["naïve café, 東京 and 🐍 snakes. ", "the cat sat on the mat. "]
    tokenizer = train_bpe([t * 20 for t in texts], vocab_size=300)
    lengths = token_byte_lengths(tokenizer)
    assert lengths[tokenizer.eot_id] == 0
    for text in [*texts, "ünseen wörds 日本 ☃"]:  # merged tokens, and raw bytes of unseen characters
        ids = tokenizer.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths.max() > 4  # merges span several bytes: a token is not a byte


def test_a_bpe_that_is_not_byte_level_has_no_byte_lengths() -> None:
    backend = HFTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    backend.add_special_tokens([EOT])
    with pytest.raises(DataIntegrityError, match="decoder None is not ByteLevel"):
        token_byte_lengths(BPETokenizer(backend))


def test_bits_per_byte_of_a_hand_computed_example() -> None:
    """Targets of 2, 3, 0 (end of text), 4 and 1 bytes: bits per byte is their summed loss in bits over 10."""
    tokenizer = train_char([WIDE])
    a, e, euro, face, eot = range(5)
    tokens = np.array([a, e, euro, eot, face, a, e], dtype=np.uint16)
    model = BigramTable(tokenizer.vocab_size)
    log_probs = F.log_softmax(model.table.detach().double(), dim=-1).numpy()
    lengths = token_byte_lengths(tokenizer)

    for read, n_bytes in ((6, 2 + 3 + 0 + 4 + 1), (3, 2 + 3)):  # all but the last token; the first three
        targets = tokens[1:read]
        nats = -sum(log_probs[x, y] for x, y in zip(tokens[: read - 1], targets, strict=True))
        assert target_bytes(tokens, read, lengths) == n_bytes
        loss = eval_loss(model, tokens, 4, 2, read)
        assert loss == pytest.approx(nats / len(targets), rel=1e-6)
        assert bits_per_byte(loss, len(targets), n_bytes) == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_champion_is_the_lowest_value_of_the_chosen_metric() -> None:
    models = {
        "pretrain": {"val_loss": 1.5, "heldout_loss": 2.0},
        "finetune": {"val_loss": 1.6, "heldout_loss": 1.2},
        "quantized": {"val_loss": 1.61, "heldout_loss": 1.21},
    }
    assert choose_champion(models, "val_loss")[0] == "pretrain"
    name, reason = choose_champion(models, "heldout_loss")
    assert name == "finetune" and "1.2000" in reason and "pretrain 2.0000" in reason


# -- the stage on fake published inputs ------------------------------------------------------------------


def train_tiny(tokens: np.ndarray, vocab_size: int, steps: int) -> GPT:
    return builders.train_gpt(tokens, vocab_size, steps=steps, block_size=64, batch_size=8)


@pytest.fixture(scope="module")
def trained(one_torch_thread: None) -> tuple[GPT, GPT]:
    tokenizer = train_char([TEXT])
    tokens = np.array(tokenizer.encode(TEXT * 20), dtype=np.uint16)
    return train_tiny(tokens, tokenizer.vocab_size, steps=120), train_tiny(tokens, tokenizer.vocab_size, steps=0)


def publish_inputs(
    root: Path,
    pretrained: GPT,
    finetuned: GPT,
    meta_changes: dict | None = None,
    heldout: list | None = None,
    tokenizer: Tokenizer | None = None,
    val: list[int] | None = None,
    tag: str = "",
) -> dict[str, str]:
    """A store with every input of evaluate; by default a char tokenizer of TEXT, and TEXT as the tokens.
    The versions are named tk, tok, pre and fin, each followed by `tag`: one store holds several runs."""
    store = Store(root)
    tokenizer = tokenizer or train_char([TEXT])
    tk, tok, pre, fin = (f"{name}{tag}" for name in ("tk", "tok", "pre", "fin"))
    store.publish("tokenizer", tk, lambda out: tokenizer.save(out / "tokenizer.json"), **_fake("t"))

    train = tokenizer.encode(TEXT * 30)
    val = tokenizer.encode(TEXT * 6) if val is None else val
    meta = {"tokenizer_version": tk, "train_docs": 30, "val_docs": 6}
    builders.publish_tokens(
        root,
        train,
        val,
        vocab_size=tokenizer.vocab_size,
        eot_token=tokenizer.eot_id,
        version=tok,
        inputs={"tokenizer": tk},
        tokenizer=tokenizer,
        **{**meta, **(meta_changes or {})},
    )

    def model_build(model: GPT, with_heldout: bool) -> object:
        def build(out: Path) -> None:
            save_model(out, model)
            lines = [{"step": s, "train_loss": 3.0 - s / 100, "val_loss": 3.1 - s / 100} for s in range(0, 100, 10)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            if with_heldout:
                pairs = HELDOUT if heldout is None else heldout
                (out / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

        return build

    store.publish("pretrain", pre, model_build(pretrained, False), **_fake("t", tokens=tok))
    store.publish("finetune", fin, model_build(finetuned, True), **_fake("t", pretrain=pre))
    quantized = QUANTIZE.run(root, QuantizeConfig(latency_runs=1), {"finetune": fin, "tokens": tok})
    return {"tokens": tok, "tokenizer": tk, "pretrain": pre, "finetune": fin, "quantize": quantized.version}


def _fake(code: str, **inputs: str) -> dict:
    return {"params": {}, "inputs": inputs, "code_version": code}


def small_cfg(**changes: object) -> EvaluateConfig:
    return EvaluateConfig(prompts=["the ", "a do"], max_new_tokens=20, **changes)


def test_evaluate_stage_reports_every_model_and_the_champion(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    inputs = publish_inputs(tmp_path / "store", *trained)
    ref = EVALUATE.run(tmp_path / "store", small_cfg(), inputs)
    folder = Store(tmp_path / "store").path("evaluate", ref.version)
    report = json.loads((folder / REPORT_JSON).read_text())

    assert set(report["models"]) == {"pretrain", "finetune", "quantized"}
    versions = {name: entry["version"] for name, entry in report["models"].items()}
    assert versions == {"pretrain": "pre", "finetune": "fin", "quantized": inputs["quantize"]}
    for entry in report["models"].values():
        assert entry["perplexity"] == pytest.approx(math.exp(entry["val_loss"]))
        # A char tokenizer on ASCII text: one token per byte, so bits per byte is the loss in bits.
        assert entry["bits_per_byte"] == pytest.approx(entry["val_loss"] / math.log(2))
        assert entry["heldout_loss"] > 0
    # The trained model beats the unigram baseline clearly; the untrained one does not.
    pretrain, finetune = report["models"]["pretrain"], report["models"]["finetune"]
    assert pretrain["val_loss"] < report["unigram_val_loss"] - 1.0
    assert finetune["val_loss"] > report["unigram_val_loss"]
    assert report["champion"] == "pretrain" and report["champion_version"] == "pre"
    assert "lowest val_loss" in report["champion_reason"]
    assert report["models"]["quantized"]["val_loss"] == pytest.approx(finetune["val_loss"], abs=0.01)
    assert report["eval_tokens"] == len(TEXT) * 6 and report["scored_tokens"] == len(TEXT) * 6 - 1
    assert report["unigram_perplexity"] == pytest.approx(math.exp(report["unigram_val_loss"]))
    for name, entry in report["models"].items():
        assert entry["gain_over_unigram"] == pytest.approx(report["unigram_val_loss"] - entry["val_loss"]), name
    assert {(s["model"], s["prompt"]) for s in report["samples"]} == {
        (m, p) for m in ("pretrain", "finetune", "quantized") for p in ("the ", "a do")
    }
    # A model that learned the text continues a prompt with it.
    learned = next(s for s in report["samples"] if s["model"] == "pretrain" and s["prompt"] == "the ")
    assert set(learned["completion"].split()) & {"cat", "mat.", "sat", "on", "the"}

    markdown = (folder / REPORT_MD).read_text()
    assert "| pretrain **(challenger)** | pre |" in markdown and "| unigram baseline |" in markdown
    assert f"{finetune['val_loss']:.4f}" in markdown and "a do" in markdown
    for plot in ("val_loss.png", "curves.png"):
        assert (folder / plot).read_bytes().startswith(PNG_MAGIC)

    metrics = Store(tmp_path / "store").manifest("evaluate", ref.version)["metrics"]
    assert metrics["champion"] == "pretrain" and metrics["pretrain_val_loss"] == pretrain["val_loss"]
    assert metrics["quantized_heldout_loss"] == report["models"]["quantized"]["heldout_loss"]
    assert metrics["unigram_val_loss"] == report["unigram_val_loss"]

    # Same inputs and settings, rebuilt: the same numbers and the same samples.
    again = EVALUATE.run(tmp_path / "store", small_cfg(), inputs, force=True)
    assert json.loads((folder.parent / again.version / REPORT_JSON).read_text()) == report


# The report's plots are embedded in the Prefect UI's artifact, which keeps them in its database.
MAX_PLOT_BYTES = 100_000
# Items of two words' endings: TEXT's sentences are six words long ("the cat sat on the mat."), and its two
# endings " the mat." and " the cat." are each the other's distractor.
SUITE = CompletionSuiteConfig(n_choices=2, ending_words=2, min_prefix_words=2)


def documents(tokenizer: Tokenizer, n: int = 6) -> list[int]:
    """`n` documents of TEXT as the tokens stage writes them: each followed by end-of-text."""
    return [*tokenizer.encode(TEXT), tokenizer.eot_id] * n


def test_the_report_shows_the_bigram_baseline_accuracy_and_the_completion_suite(
    tmp_path: Path, trained: tuple[GPT, GPT]
) -> None:
    tokenizer = train_char([TEXT])
    inputs = publish_inputs(tmp_path / "store", *trained, val=documents(tokenizer))
    ref = EVALUATE.run(tmp_path / "store", small_cfg(completion=SUITE), inputs)
    store = Store(tmp_path / "store")
    folder = store.path("evaluate", ref.version)
    report = json.loads((folder / REPORT_JSON).read_text())
    pretrain, finetune = report["models"]["pretrain"], report["models"]["finetune"]

    # The bigram is counted on the training split alone and scores the models' very targets and bytes.
    tokens = store.path("tokens", inputs["tokens"])
    train, val = open_tokens(tokens, "train"), open_tokens(tokens, "val")
    bigram = bigram_baseline(train, val, tokenizer.vocab_size, None, token_byte_lengths(tokenizer))
    assert report["bigram_val_loss"] == pytest.approx(bigram.loss)
    assert report["bigram_bits_per_byte"] == pytest.approx(bigram.bits_per_byte)
    assert report["bigram_perplexity"] == pytest.approx(math.exp(bigram.loss))
    assert report["bigram_val_loss"] < report["unigram_val_loss"] - 1.0  # the token before says much of this text
    for name, entry in report["models"].items():
        assert entry["gain_over_bigram"] == pytest.approx(report["bigram_val_loss"] - entry["val_loss"]), name
    # The trained model learned from more context than one token; the untrained one not even the bigram's.
    assert pretrain["gain_over_bigram"] > 0.5 and finetune["gain_over_bigram"] < 0

    # Top-1 accuracy on the windows the loss is computed on.
    assert pretrain["next_token_accuracy"] == pytest.approx(next_token_accuracy(trained[0], val, 64, 16, None))
    assert 0.0 <= finetune["next_token_accuracy"] < 0.5 < pretrain["next_token_accuracy"] <= 1.0

    # The completion suite: two sentences per document, two candidate endings each.
    suite = report["completion"]
    assert (suite["items"], suite["documents"], suite["n_choices"], suite["chance"]) == (12, 6, 2, 0.5)
    assert suite["skipped"] is None
    for entry in report["models"].values():
        assert 0.0 <= entry["completion_accuracy"] <= 1.0 and 0.0 <= entry["completion_accuracy_norm"] <= 1.0
    # Cut from the validation documents: the suite those documents give scores the model as reported.
    expected = evaluate_suite(
        trained[0], tokenizer, build_completion_suite(documents_from_tokens(val, tokenizer), SUITE), 64, 16
    )
    assert (pretrain["completion_accuracy"], pretrain["completion_accuracy_norm"]) == pytest.approx(
        (expected.accuracy, expected.accuracy_norm)
    )

    markdown = (folder / REPORT_MD).read_text()
    assert f"| bigram baseline | - | {report['bigram_val_loss']:.4f} |" in markdown
    assert f"| {pretrain['next_token_accuracy'] * 100:.1f}% | {pretrain['gain_over_bigram']:+.4f} |" in markdown
    assert "12 items cut from 6 validation documents" in markdown and "Chance is 50.0%" in markdown
    assert f"| pretrain **(challenger)** | {100 * expected.accuracy:.1f}% |" in markdown
    assert "| chance | 50.0% | 50.0% |" in markdown

    # The quantize stage's figures, and small plots that report.md shows.
    measured = json.loads((store.path("quantize", inputs["quantize"]) / "quantize_report.json").read_text())
    for key in ("quantized_file_bytes", "decode_tokens_per_s_quantized", "val_loss_delta"):
        assert report["quantization"][key] == measured[key], key
    assert f"| greedy decoding (tokens/s) | {measured['decode_tokens_per_s_fp32']:.0f} |" in markdown
    for plot in ("val_loss.png", "quantize.png", "curves.png"):
        data = (folder / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < MAX_PLOT_BYTES, plot
        assert f"]({plot})" in markdown

    metrics = store.manifest("evaluate", ref.version)["metrics"]
    assert metrics["bigram_val_loss"] == report["bigram_val_loss"] and metrics["completion_items"] == 12
    assert metrics["pretrain_completion_accuracy"] == pretrain["completion_accuracy"]


def test_a_quantized_model_its_stage_rejected_is_scored_but_never_the_challenger(
    tmp_path: Path, trained: tuple[GPT, GPT]
) -> None:
    root = tmp_path / "store"
    inputs = publish_inputs(root, trained[1], trained[1])  # pretrain and finetune: untrained
    reason = "int8 weights raise the validation loss by +0.3 nats/token, more than max_loss_increase 0.05"

    def build(out: Path) -> None:
        save_quantized(out, trained[0], bits=8)  # the trained model: by far the lowest loss of the three
        report = {
            "bits": 8,
            "val_loss_fp32": 1.0,
            "val_loss_quantized": 1.3,
            "rejected": True,
            "rejected_reason": reason,
        }
        (out / "quantize_report.json").write_text(json.dumps(report))

    Store(root).publish("quantize", "q-rejected", build, **_fake("t", finetune=inputs["finetune"], tokens="tok"))
    ref = EVALUATE.run(root, small_cfg(), {**inputs, "quantize": "q-rejected"})
    folder = Store(root).path("evaluate", ref.version)
    report = json.loads((folder / REPORT_JSON).read_text())

    quantized = report["models"]["quantized"]
    assert quantized["rejected"] is True and quantized["rejected_reason"] == reason
    assert quantized["val_loss"] < report["models"]["pretrain"]["val_loss"] - 1.0  # the best, were it a candidate
    assert report["champion"] == "pretrain" and report["promotion"]["challenger"] == "pretrain/pre"
    assert (
        f"quantized ({quantized['val_loss']:.4f}) is not a candidate: rejected by its stage ({reason})"
        in (report["champion_reason"])
    )
    assert report["quantization"]["rejected"] is True
    row = next(r for r in report["comparison"]["models"] if r["model"] == "quantize/q-rejected")
    assert row["rejected"] is True and row["roles"] == ["this run"]
    markdown = (folder / REPORT_MD).read_text()
    assert "| quantized **(rejected)** | q-rejected |" in markdown
    assert f"quantized was rejected by its stage ({reason}): it is scored here, never the challenger." in markdown
    assert f"**Rejected by the quantize stage**: {reason}." in markdown


def test_the_quantize_verdict_is_read_from_its_report_or_else_its_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.publish("quantize", "from-manifest", lambda out: {"rejected": True, "rejected_reason": "why"}, **_fake("t"))
    summary = quantize_summary(store.path("quantize", "from-manifest"))
    assert (summary["rejected"], summary["rejected_reason"]) == (True, "why")

    def build(out: Path) -> None:
        (out / "quantize_report.json").write_text(json.dumps({"bits": 8, "rejected": "yes"}))

    store.publish("quantize", "odd", build, **_fake("t"))
    with pytest.raises(DataIntegrityError, match=r"odd/quantize_report.json: 'rejected' is 'yes', not true or false"):
        quantize_summary(store.path("quantize", "odd"))


@pytest.mark.slow  # two runs quantized, three evaluations
def test_the_comparison_names_the_previous_run_and_the_champion_by_version(
    tmp_path: Path, trained: tuple[GPT, GPT]
) -> None:
    """A run of another tokenizer after a first one: the first run's models are the previous run's, its
    pretrained model the champion; all of them scored again on the frozen set, and compared per byte."""
    root = tmp_path / "store"
    first = EVALUATE.run(root, small_cfg(), publish_inputs(root, *trained))
    first_report = json.loads((Store(root).path("evaluate", first.version) / REPORT_JSON).read_text())
    bpe = train_bpe([TEXT * 30], vocab_size=300)
    inputs = publish_inputs(root, untrained(bpe.vocab_size, 0), untrained(bpe.vocab_size, 1), tokenizer=bpe, tag="-b")
    ref = EVALUATE.run(root, small_cfg(), inputs)
    folder = Store(root).path("evaluate", ref.version)
    report = json.loads((folder / REPORT_JSON).read_text())

    comparison = report["comparison"]
    first_models = {name: entry["version"] for name, entry in first_report["models"].items()}
    assert comparison["previous_evaluation"]["version"] == first.version
    assert comparison["previous_evaluation"]["models"] == {
        "pretrain": "pretrain/pre",
        "finetune": "finetune/fin",
        "quantized": f"quantize/{first_models['quantized']}",
    }
    assert comparison["champion"] == "pretrain/pre" == report["promotion"]["champion"]
    rows = {row["model"]: row for row in comparison["models"]}
    challenger = report["promotion"]["challenger"]
    assert list(rows) == [
        "pretrain/pre-b",
        "finetune/fin-b",
        f"quantize/{inputs['quantize']}",
        "pretrain/pre",
        "finetune/fin",
        f"quantize/{first_models['quantized']}",
    ]
    assert rows[challenger]["roles"] == ["this run", "challenger"]
    assert rows["pretrain/pre"]["roles"] == ["previous run", "champion"]
    assert rows["finetune/fin"]["roles"] == ["previous run"]
    assert rows[challenger]["same_tokenizer"] and not rows["pretrain/pre"]["same_tokenizer"]
    # The same frozen set as the first run's gate, and the same numbers for the same model.
    assert rows["pretrain/pre"]["bits_per_byte"] == pytest.approx(
        first_report["promotion"]["metrics"]["challenger"]["bits_per_byte"]
    )
    assert rows[challenger]["bits_per_byte"] == report["promotion"]["metrics"]["challenger"]["bits_per_byte"]

    markdown = (folder / REPORT_MD).read_text()
    assert f"The previous run is evaluate/{first.version}" in markdown and "The champion is pretrain/pre." in markdown
    champion_row = rows["pretrain/pre"]
    # Another tokenizer: its per-token losses are not shown, its bits per byte are, against the champion's.
    assert (
        f"| pretrain | pretrain/pre | previous run, champion | other (tokenizer/tk) | "
        f"{champion_row['bits_per_byte']:.4f} | +0.0000 | - | {champion_row['heldout_bits_per_byte']:.4f} | - |"
    ) in markdown
    line = next(
        line for line in markdown.splitlines() if f"| {challenger} | this run, challenger | this run's |" in line
    )
    assert f"| {rows[challenger]['val_loss']:.4f} |" in line

    # A model of the previous run damaged since: the report says so and goes on.
    with open(Store(root).path("finetune", "fin") / "model.pt", "ab") as f:
        f.write(b"\0")
    again = EVALUATE.run(root, small_cfg(seed=7), inputs)
    folder = Store(root).path("evaluate", again.version)
    rows = {row["model"]: row for row in json.loads((folder / REPORT_JSON).read_text())["comparison"]["models"]}
    assert rows["finetune/fin"]["skipped"].startswith("the previous run's model finetune/fin is damaged: model.pt has")
    assert "finetune/fin (previous run) is not compared: the previous run's model" in (folder / REPORT_MD).read_text()


def test_a_changed_champion_gives_a_new_evaluate_version(tmp_path: Path) -> None:
    cfg, store, registry = small_cfg(), Store(tmp_path), Registry(tmp_path)
    inputs = {"tokens": "tok", "tokenizer": "tk", "pretrain": "pre", "finetune": "fin", "quantize": "q"}

    def version(inputs: dict[str, str]) -> str:
        return EVALUATE.version(cfg, inputs, registry_snapshot(cfg, store))

    first = version(inputs)
    promotes = {"decision": PROMOTED, "reason": "", "frozen_set": "f", "challenger": "pretrain/pre", "champion": None}
    registry.commit({**promotes, "evaluate_version": first, "compared_with": None}, expected_seq=None)
    # The evaluation that made the champion is the same version after it (a rerun finds it cached) ...
    assert version(inputs) == first
    # ... while another one is judged against that champion, and a new champion makes a new version again.
    other = {**inputs, "pretrain": "pre-2"}
    against_first = version(other)
    assert against_first != EVALUATE.version(cfg, other, None)
    compared = {"champion": "pretrain/pre", "seq": 1, "frozen_set": "f"}
    changed = {**promotes, "challenger": "pretrain/pre-2", "champion": "pretrain/pre", "compared_with": compared}
    registry.commit({**changed, "evaluate_version": against_first}, expected_seq=1)
    assert version(other) == against_first
    assert version(inputs) not in (first, against_first)
    # Prefect's cache key follows it: a cached evaluation never reports a decision against an old champion.
    parameters = {"storage": str(tmp_path), "cfg": cfg, "inputs": inputs}
    assert cache_key(EVALUATE)(None, parameters) == f"gptflow-evaluate-{version(inputs)}"


@pytest.mark.slow  # four evaluations
def test_the_champion_compared_with_is_part_of_the_version(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    root = tmp_path / "store"
    inputs = publish_inputs(root, *trained)
    first = EVALUATE.run(root, small_cfg(), inputs)  # no champion yet: its best model promotes itself
    registry = Registry(root)
    assert registry.alias(CHAMPION)["model"] == "pretrain/pre"
    # Run again with nothing changed: the same version, reused (not the champion judged against itself).
    again = EVALUATE.run(root, small_cfg(), inputs)
    assert (again.version, again.reused) == (first.version, True)
    # Other settings: a new evaluation, which finds its best model the champion already and decides nothing.
    resampled = EVALUATE.run(root, small_cfg(seed=7), inputs)
    report = json.loads((Store(root).path("evaluate", resampled.version) / REPORT_JSON).read_text())
    assert report["promotion"]["decision"] == PROMOTED
    assert report["promotion"]["reason"] == "pretrain/pre is the champion already (decision 1)"
    assert len(registry.history()) == 1

    # Another champion (the untrained fine-tuned model, promoted by another evaluation): the same inputs
    # and settings make a new version, judged against it, and so does Prefect's cache key.
    frozen = registry.alias(CHAMPION)["frozen_set"]
    registry.commit(
        {
            "decision": PROMOTED,
            "challenger": "finetune/fin",
            "champion": "pretrain/pre",
            "reason": "by hand",
            "frozen_set": frozen,
            "evaluate_version": "another",
        },
        expected_seq=1,
    )
    changed = EVALUATE.run(root, small_cfg(), inputs)
    assert changed.version != first.version and not changed.reused
    parameters = {"storage": str(root), "cfg": small_cfg(), "inputs": inputs}
    assert cache_key(EVALUATE)(None, parameters) == f"gptflow-evaluate-{changed.version}"
    report = json.loads((Store(root).path("evaluate", changed.version) / REPORT_JSON).read_text())
    promotion = report["promotion"]
    assert (promotion["champion"], promotion["challenger"], promotion["decision"]) == (
        "finetune/fin",
        "pretrain/pre",
        PROMOTED,
    )
    assert registry.alias(CHAMPION)["model"] == "pretrain/pre"
    first_report = json.loads((Store(root).path("evaluate", first.version) / REPORT_JSON).read_text())
    assert first_report["promotion"]["champion"] is None  # the first version still tells its own decision


def test_champion_by_heldout_loss_needs_heldout_pairs(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    inputs = publish_inputs(tmp_path / "store", *trained, heldout=[])
    with pytest.raises(DataIntegrityError, match="heldout.jsonl: no held-out pairs"):
        EVALUATE.run(tmp_path / "store", small_cfg(champion_metric="heldout_loss"), inputs)
    ref = EVALUATE.run(tmp_path / "store", small_cfg(), inputs)  # by val loss it still runs
    report = json.loads((Store(tmp_path / "store").path("evaluate", ref.version) / REPORT_JSON).read_text())
    assert report["models"]["finetune"]["heldout_loss"] is None and report["heldout_pairs"] == 0


def untrained(vocab_size: int, seed: int, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def test_bits_per_byte_is_over_the_bytes_of_the_scored_tokens(tmp_path: Path) -> None:
    """A BPE split whose first document has ~3 bytes per token and whose second has ~1 (characters the
    tokenizer never merged), scored on the first document only: the split's bytes per token would be wrong
    for it, and a count of tokens taken for bytes (or the other way round) is off by 3x."""
    tokenizer = train_bpe([TEXT * 30], vocab_size=300)
    wordy, raw = TEXT * 3, "the ünïcödé 日本語 ☃ ∑ 🐍 ∂ ∫ ß ø"
    ids_wordy, ids_raw = tokenizer.encode(wordy), tokenizer.encode(raw)
    assert ids_wordy[0] == ids_raw[0]  # both start with "the"
    val = [*ids_wordy, tokenizer.eot_id, *ids_raw, tokenizer.eot_id]
    models = untrained(tokenizer.vocab_size, 0), untrained(tokenizer.vocab_size, 1)
    inputs = publish_inputs(tmp_path / "store", *models, tokenizer=tokenizer, val=val)
    # Read the first document, its end-of-text and the second's first token ("the"): the targets are the
    # first document's tokens but its first, the end-of-text (0 bytes) and "the", as many bytes as `wordy`.
    eval_tokens = len(ids_wordy) + 2
    ref = EVALUATE.run(tmp_path / "store", small_cfg(eval_tokens=eval_tokens), inputs)
    report = json.loads((Store(tmp_path / "store").path("evaluate", ref.version) / REPORT_JSON).read_text())

    n_targets, n_bytes = len(ids_wordy) + 1, len(wordy.encode())
    assert n_bytes / n_targets > 2.5  # BPE tokens of several bytes: a swap would be visible
    meta = read_meta(Store(tmp_path / "store").path("tokens", inputs["tokens"]))
    assert meta["val_bytes"] / meta["val_tokens"] < 0.8 * n_bytes / n_targets  # the split's ratio is not ours
    for entry in report["models"].values():
        assert entry["bits_per_byte"] == pytest.approx(entry["val_loss"] * n_targets / math.log(2) / n_bytes)
    unigram_bits = report["unigram_val_loss"] * n_targets / math.log(2) / n_bytes
    assert report["unigram_bits_per_byte"] == pytest.approx(unigram_bits)
    assert (report["eval_tokens"], report["scored_tokens"], report["scored_bytes"]) == (eval_tokens, n_targets, n_bytes)
    markdown = (Store(tmp_path / "store").path("evaluate", ref.version) / REPORT_MD).read_text()
    assert f"({n_targets:,} predicted targets, {n_bytes:,} bytes of text;" in markdown


def test_scored_bytes_of_a_whole_split_are_the_tokens_stage_bytes(tmp_path: Path) -> None:
    """End-of-text counts 0 bytes in both: the bytes of every validation token equal meta.json's val_bytes."""
    words = ["data", "flows", "ünïcode", "東京", "🐍", "and", "back"]
    rng = np.random.default_rng(0)
    docs = [(f"doc-{i}", " ".join(rng.choice(words, size=4 + i % 5))) for i in range(30)]
    dedup = builders.publish_dedup(tmp_path / "store", [docs])
    split = SplitConfig(seed=3, val_fraction=0.3)
    tok = tokenizer_stage.STAGE.run(
        tmp_path / "store", tokenizer_stage.TokenizerConfig(kind="bpe", vocab_size=300, split=split), {"dedup": dedup}
    )
    ref = tokens_stage.STAGE.run(tmp_path / "store", tokens_stage.TokensConfig(), {"dedup": dedup, "tokenizer": tok})
    folder = Store(tmp_path / "store").path("tokens", ref.version)
    val, lengths = open_tokens(folder, "val"), token_byte_lengths(Tokenizer.load(folder / "tokenizer.json"))
    # target_bytes leaves out the first token, which nothing predicts.
    assert target_bytes(val, None, lengths) + lengths[val[0]] == read_meta(folder)["val_bytes"] > 0


def test_heldout_pairs_counts_the_pairs_scored(tmp_path: Path) -> None:
    """A 16-token context cannot hold the fine-tuning template's own lines (27 characters): no pair read has a
    response token within it, so none is scored, and the stage reports so instead of failing."""
    vocab_size = train_char([TEXT]).vocab_size
    models = untrained(vocab_size, 0, block_size=16), untrained(vocab_size, 1, block_size=16)
    too_long = {"prompt": "the cat " * 10, "response": " sat."}
    inputs = publish_inputs(tmp_path / "store", *models, heldout=[*HELDOUT, too_long])
    ref = EVALUATE.run(tmp_path / "store", small_cfg(), inputs)
    folder = Store(tmp_path / "store").path("evaluate", ref.version)
    report = json.loads((folder / REPORT_JSON).read_text())
    assert report["heldout_pairs"] == 0 and report["heldout_pairs_read"] == 3
    assert all(entry["heldout_loss"] is None for entry in report["models"].values())
    assert "and 0 held-out fine-tuning pairs (3 more have no response token" in (folder / REPORT_MD).read_text()
    with pytest.raises(DataIntegrityError, match="none of the 3 held-out pairs has a response token"):
        EVALUATE.run(tmp_path / "store", small_cfg(champion_metric="heldout_loss"), inputs)


def test_evaluate_rejects_scored_tokens_without_text(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    eot = train_char([TEXT]).eot_id
    inputs = publish_inputs(tmp_path / "store", *trained, val=[eot] * 10)  # empty documents only
    with pytest.raises(DataIntegrityError, match=r"val.bin: the 9 scored tokens decode to 0 bytes"):
        EVALUATE.run(tmp_path / "store", small_cfg(), inputs)
    assert Store(tmp_path / "store").latest("evaluate") is None


def test_evaluate_rejects_tokens_of_another_tokenizer(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    inputs = publish_inputs(tmp_path / "store", *trained, meta_changes={"tokenizer_version": "other"})
    with pytest.raises(DataIntegrityError, match="tokenizer/other, not the tokenizer/tk"):
        EVALUATE.run(tmp_path / "store", small_cfg(), inputs)


def test_evaluate_names_a_corrupt_heldout_line(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    inputs = publish_inputs(tmp_path / "store", *trained, heldout=[{"prompt": "x", "response": "y"}, "oops"])
    with pytest.raises(DataIntegrityError, match=r"heldout.jsonl:2: expected an object"):
        EVALUATE.run(tmp_path / "store", small_cfg(), inputs)


def test_evaluate_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match=r"prompts\[1\] is empty"):
        EvaluateConfig(prompts=["ok", "  "])
    with pytest.raises(ValidationError):
        EvaluateConfig(champion_metric="accuracy")
    with pytest.raises(ValidationError):
        EvaluateConfig(temperature=-1.0)


def test_the_report_shows_the_held_out_loss_before_and_after_each_fine_tuning_method() -> None:
    from tasks.evaluate import finetune_summary, render_finetune

    summary = finetune_summary(
        {"method": "full", "heldout_loss_before": 4.6, "heldout_loss_after_full": 4.3, "heldout_loss_after_lora": 4.4}
    )
    assert summary["drop_full"] == pytest.approx(0.3) and summary["drop_lora"] == pytest.approx(0.2)
    text = "\n".join(render_finetune(summary))
    assert "| after full | 4.3000 | 0.3000 |" in text and "| after lora | 4.4000 | 0.2000 |" in text
    # A method the stage did not train has no row, rather than a made-up number.
    only_full = finetune_summary({"heldout_loss_before": 4.6, "heldout_loss_after_full": 4.3})
    assert only_full["drop_lora"] is None and "after lora" not in "\n".join(render_finetune(only_full))
