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

from model.checkpoint import save_model
from model.evaluate import bits_per_byte, eval_loss, eval_windows, unigram_loss
from model.gpt import GPT, GPTConfig
from model.tokenizer import train_char
from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.evaluate import REPORT_JSON, REPORT_MD, EvaluateConfig, choose_champion
from tasks.evaluate import STAGE as EVALUATE
from tasks.quantize import STAGE as QUANTIZE
from tasks.quantize import QuantizeConfig

TEXT = "the cat sat on the mat. a dog ran to the cat. "
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
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.as_tensor(tokens.astype(np.int64))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,))
        x = torch.stack([data[s : s + 64] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1 : s + 65] for s in starts])  # (B, T)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[GPT, GPT]:
    tokenizer = train_char([TEXT])
    tokens = np.array(tokenizer.encode(TEXT * 20), dtype=np.uint16)
    return train_tiny(tokens, tokenizer.vocab_size, steps=120), train_tiny(tokens, tokenizer.vocab_size, steps=0)


def publish_inputs(
    root: Path, pretrained: GPT, finetuned: GPT, meta_changes: dict | None = None, heldout: list | None = None
) -> dict[str, str]:
    store = Store(root)
    tokenizer = train_char([TEXT])
    store.publish("tokenizer", "tk", lambda out: tokenizer.save(out / "tokenizer.json"), **_fake("t"))

    train, val = tokenizer.encode(TEXT * 30), tokenizer.encode(TEXT * 6)
    meta = {"tokenizer_version": "tk", "train_docs": 30, "val_docs": 6, "tokenizer_kind": "char"}
    builders.publish_tokens(
        root,
        train,
        val,
        vocab_size=tokenizer.vocab_size,
        eot_token=tokenizer.eot_id,
        version="tok",
        inputs={"tokenizer": "tk"},
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

    store.publish("pretrain", "pre", model_build(pretrained, False), **_fake("t", tokens="tok"))
    store.publish("finetune", "fin", model_build(finetuned, True), **_fake("t", pretrain="pre"))
    quantized = QUANTIZE.run(root, QuantizeConfig(latency_runs=1), {"finetune": "fin", "tokens": "tok"})
    return {"tokens": "tok", "tokenizer": "tk", "pretrain": "pre", "finetune": "fin", "quantize": quantized.version}


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
    assert report["eval_tokens"] == len(TEXT) * 6
    assert {(s["model"], s["prompt"]) for s in report["samples"]} == {
        (m, p) for m in ("pretrain", "finetune", "quantized") for p in ("the ", "a do")
    }
    # A model that learned the text continues a prompt with it.
    learned = next(s for s in report["samples"] if s["model"] == "pretrain" and s["prompt"] == "the ")
    assert set(learned["completion"].split()) & {"cat", "mat.", "sat", "on", "the"}

    markdown = (folder / REPORT_MD).read_text()
    assert "| pretrain **(champion)** | pre |" in markdown and "| unigram baseline |" in markdown
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


def test_champion_by_heldout_loss_needs_heldout_pairs(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    inputs = publish_inputs(tmp_path / "store", *trained, heldout=[])
    with pytest.raises(DataIntegrityError, match="heldout.jsonl: no held-out pairs"):
        EVALUATE.run(tmp_path / "store", small_cfg(champion_metric="heldout_loss"), inputs)
    ref = EVALUATE.run(tmp_path / "store", small_cfg(), inputs)  # by val loss it still runs
    report = json.loads((Store(tmp_path / "store").path("evaluate", ref.version) / REPORT_JSON).read_text())
    assert report["models"]["finetune"]["heldout_loss"] is None and report["heldout_pairs"] == 0


def test_evaluate_rejects_token_counts_it_cannot_convert(tmp_path: Path, trained: tuple[GPT, GPT]) -> None:
    inputs = publish_inputs(tmp_path / "store", *trained, meta_changes={"val_bytes": 0})
    with pytest.raises(DataIntegrityError, match="meta.json: needs positive val_tokens and val_bytes"):
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
