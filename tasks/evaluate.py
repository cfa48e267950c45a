"""Stage "evaluate": the pretrained, fine-tuned and quantized models scored side by side, against two count
baselines, on a completion suite, and across versions on a frozen set; a champion chosen.

Output (contract): `report.json` (`models` -> pretrain / finetune / quantized, each with val_loss,
perplexity, bits_per_byte, heldout_loss and its store version; the unigram and bigram baselines; the
champion and why; samples), `report.md` (the same for a person: each number explained, the tables, the
promotion decision, the plots), and small PNG plots (tens of KB each): `val_loss.png` (per
model: validation loss against the baselines, and accuracies), `quantize.png` (float against quantized:
file size, decoding speed, validation loss) and `curves.png` (the training curves).

What the numbers are:
- `val_loss`: mean next-token cross-entropy (nats per token) on the first `eval_tokens` validation tokens,
  every one of them but the first predicted (`scored_tokens` = eval_tokens - 1 targets);
  `perplexity` = exp(val_loss); `gain_over_unigram` = unigram_val_loss - val_loss, and `gain_over_bigram`
  = bigram_val_loss - val_loss, nats per token.
- `bits_per_byte`: the scored targets' summed loss / ln 2 / `scored_bytes`, the UTF-8 bytes those very
  targets decode to with the tokens' tokenizer. <|endoftext|> targets count 0 bytes (they are separators,
  as in meta.json's byte counts) while their loss, knowing where a document ends, still counts.
- the baselines (`unigram_val_loss`, `unigram_perplexity`, `unigram_bits_per_byte`, and `bigram_...` alike;
  model/baselines.py): the same targets and bytes, scored by counts of the training split alone. The unigram
  knows how common each token is; the bigram (interpolated with the unigram, its weights fitted on a slice
  of the training split) also knows the token before. A model's gain over the bigram is what it learned from
  more context than one token.
- `next_token_accuracy`: the share of the scored targets that are the model's most likely token, in the
  windows the loss is computed on.
- the completion suite (`completion` in report.json, model/completion.py): HellaSwag-style items cut from the
  complete validation documents within the scored tokens; `completion_accuracy` (the true ending has the
  highest log-likelihood) and `completion_accuracy_norm` (per character), against a chance of 1 / n_choices.
  Too little text for one item (no sentence long enough) leaves it out, with the reason in the report.
- `heldout_loss`: mean loss per response token of the held-out fine-tuning pairs; `heldout_pairs` is how
  many of the pairs read (`heldout_pairs_read`) have a response token within the context and were scored.
- `quantization`: what the quantize stage measured of its model (size, speed, loss change). A quantized
  model the quantize stage marks `rejected` (with `rejected_reason`) is scored and reported, never the
  challenger.

The champion across runs (`promotion` in report.json, the model registry in storage/registry.py): the run's
best model (`champion` above, by `champion_metric`) is the *challenger*. It and the registry's champion are
scored in this run on the frozen evaluation set: the validation documents (the first `eval_tokens` tokens,
as text) and held-out pairs of the run that made the first champion, kept in the registry so that nightly
data growth does not move them. Each model encodes that text with its own tokenizer: the numbers are
`val_loss` (per token of its tokenizer), `bits_per_byte` (the summed loss in bits over the UTF-8 bytes of
the documents, the same bytes for every tokenizer, since a leading end-of-text makes every byte a scored
target), and `heldout_loss` / `heldout_bits_per_byte` on the pairs' responses. Per-token losses of two
different tokenizers measure different things, so a gate on one of them (`promotion.metric` or a guard)
rejects such a challenger; the per-byte ones compare any two models. The challenger is promoted when
`promotion.metric` improves by at least `promotion.min_improvement` and no guard gets worse by more than its
tolerance; the first model is promoted by itself, and fixes the frozen set. Every decision, with its
reason, is committed to the registry. The champion judged against is part of the version id
(`EvaluateStage`): another champion makes a new evaluation, never a cached one that reports a stale
decision, while a rerun with nothing changed (the evaluation that promoted the champion included) is cached.

The comparison across versions (`comparison` in report.json): this run's models, the previous run's (the
models of the newest earlier evaluation in the store that scored other models) and the champion, all scored
in this run on the frozen set, each named by its store version. It records the store as this evaluation
found it: the previous evaluation is not part of the version id (a rerun with nothing changed stays cached).
"""

import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.baselines import BaselineScore, bigram_baseline, unigram_baseline
from model.checkpoint import load_config, load_model
from model.completion import (
    CompletionSuite,
    CompletionSuiteConfig,
    build_completion_suite,
    documents_from_tokens,
    evaluate_suite,
    next_token_accuracy,
)
from model.evaluate import (
    bits_per_byte,
    eval_loss,
    perplexity,
    scored_targets,
    target_bytes,
    token_byte_lengths,
    tokens_read,
)
from model.finetune import IGNORE_INDEX, encode_pairs, read_pairs, response_loss
from model.gpt import GPT
from model.quantize import load_quantized
from model.tokenizer import FILENAME, Tokenizer
from model.train import CPU_THREADS, fixed_threads, read_metrics, resolve_device
from storage.errors import ConfigError, DataIntegrityError
from storage.registry import CHAMPION, PROMOTED, REJECTED, FrozenSet, Registry, model_id, split_model_id
from storage.store import MANIFEST, Store, atomic_write_json, atomic_write_text, canonical_json, sha256_file
from storage.tokens import META, open_tokens, read_meta
from tasks.quantize import REPORT as QUANTIZE_REPORT
from tasks.stage import Stage, StageConfig, StageContext, stage_task

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
VAL_LOSS_PLOT = "val_loss.png"
QUANTIZE_PLOT = "quantize.png"
CURVES_PLOT = "curves.png"
HELDOUT = "heldout.jsonl"
METRICS = "metrics.jsonl"
MODELS = ("pretrain", "finetune", "quantized")  # report names; "quantized" comes from the quantize stage
_STAGE_OF = {"pretrain": "pretrain", "finetune": "finetune", "quantized": "quantize"}
_NAME_OF = {stage: name for name, stage in _STAGE_OF.items()}
_PER_MODEL = (
    "val_loss",
    "perplexity",
    "bits_per_byte",
    "heldout_loss",
    "next_token_accuracy",
    "completion_accuracy",
    "completion_accuracy_norm",
)
# What the comparison across versions reports of each model, scored on the frozen set (`score_frozen`).
_FROZEN_KEYS = ("val_loss", "bits_per_byte", "scored_tokens", "heldout_loss", "heldout_bits_per_byte", "heldout_pairs")
# Roles in the comparison across versions.
THIS_RUN, PREVIOUS_RUN, CHALLENGER_ROLE, CHAMPION_ROLE = "this run", "previous run", "challenger", "champion"
# What the quantize plot and section show of quantize_report.json, where the report has it.
_QUANTIZE_KEYS = (
    "bits",
    "group_size",
    "method",
    "fp32_file_bytes",
    "quantized_file_bytes",
    "size_ratio",
    "eval_tokens",
    "val_loss_fp32",
    "val_loss_quantized",
    "val_loss_delta",
    "val_loss_cpu_kernel",
    "max_loss_increase",
    "cpu_threads",
    "latency_fp32_ms",
    "latency_quantized_ms",
    "decode_tokens_per_s_fp32",
    "decode_tokens_per_s_quantized",
    "decode_speedup",
)


# The numbers a challenger and the champion are compared by, on the frozen set; lower is better for each.
FrozenMetric = Literal["bits_per_byte", "val_loss", "heldout_bits_per_byte", "heldout_loss"]
# Per-token losses depend on the tokenizer; their per-byte counterparts compare models of any two.
PER_BYTE = {"val_loss": "bits_per_byte", "heldout_loss": "heldout_bits_per_byte"}


class PromotionConfig(BaseModel):
    """When the run's best model (the challenger) replaces the champion of the model registry. Both are
    scored in the same run on the frozen evaluation set, each with its own tokenizer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    metric: FrozenMetric = Field(
        "bits_per_byte",
        description="What must improve on the frozen set: bits per byte of its documents (comparable whatever "
        "the tokenizers), their loss per token (comparable only between models of one tokenizer), or the same "
        "two on its held-out responses.",
    )
    min_improvement: float = Field(
        0.005,
        ge=0.0,
        le=100.0,
        description="The challenger is promoted only when the metric drops by at least this much (and by more "
        "than 0). 0.005 bits per byte is about twice the 0.002-0.003 by which two tiny-preset builds of the "
        "embedded corpus differed: a retrained model of the same quality does not replace the champion.",
    )
    guards: dict[FrozenMetric, float] = Field(
        default_factory=lambda: {"heldout_bits_per_byte": 0.05},
        description="Metrics that must not get worse than the champion's by more than their tolerance (in the "
        "metric's unit). 0.05 bits per byte of the held-out responses is above the 0.03 by which two "
        "tiny-preset pretrained models differed on the ~300 held-out pairs.",
    )

    @model_validator(mode="after")
    def _check(self) -> "PromotionConfig":
        problems = [f"guards.{name}: tolerance {tol} is not >= 0" for name, tol in self.guards.items() if not tol >= 0]
        if problems:
            raise ValueError("invalid promotion settings: " + "; ".join(problems))
        return self


class EvaluateConfig(StageConfig):
    """What the models are scored on, how the samples are drawn, and how the champion is chosen."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"device"})

    eval_tokens: int = Field(
        65_536,
        ge=2,
        le=1_000_000_000,
        description="Validation tokens read (the first ones, in fixed non-overlapping windows); each but the "
        "first is a scored target. 64K is 512 windows of the tiny preset's 128-token context, seconds per model "
        "on 2 CPU cores.",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Windows (or held-out pairs) per forward pass.")
    heldout_pairs: int = Field(
        512, ge=1, le=1_000_000, description="At most this many held-out fine-tuning pairs are scored."
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["The module", "A list is", "To open a file"],
        max_length=32,
        description="Sample prompts; the defaults fit the default corpus of Python documentation text.",
    )
    max_new_tokens: int = Field(80, ge=1, le=4096, description="Tokens generated per sample.")
    temperature: float = Field(
        0.8, ge=0.0, le=5.0, description="Sampling temperature; 0 is greedy. 0.8 as nanoGPT's sample.py."
    )
    top_k: int | None = Field(
        40,
        ge=1,
        description="Sample among the k most likely tokens only (None: all); nanoGPT samples with 200 "
        "for GPT-2's 50K vocabulary, 40 suits the small vocabularies of the presets.",
    )
    seed: int = Field(1337, ge=0, le=2**63 - 1, description="Seed of the sampling generator (nanoGPT's default).")
    champion_metric: Literal["val_loss", "heldout_loss"] = Field(
        "val_loss",
        description="The champion is the model with the lowest value of this: the pretraining validation "
        "loss, or the loss on held-out fine-tuning responses.",
    )
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig,
        description="How the run's best model is judged against the champion of the model registry.",
    )
    bigram_train_tokens: int = Field(
        100_000_000,
        ge=3,
        le=1_000_000_000_000,
        description="The bigram baseline is counted on the first this many training tokens (all of a shorter "
        "split). Counting takes ~4.4 s per 16M tokens of a 50K vocabulary on one core here: 100M keeps it under "
        "a minute (all 9B tokens of OpenWebText would take ~40 min) and covers the tiny preset's whole split.",
    )
    completion: CompletionSuiteConfig = Field(
        default_factory=CompletionSuiteConfig,
        description="The completion suite cut from the complete validation documents within the scored "
        "tokens (model/completion.py; HellaSwag-style, its defaults: 500 items of 4 candidate endings).",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "cpu", description="Where the models are evaluated; auto = CUDA, else MPS, else CPU."
    )

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        problems = [f"prompts[{i}] is empty" for i, prompt in enumerate(self.prompts) if not prompt.strip()]
        if problems:
            raise ValueError("invalid evaluate settings: " + "; ".join(problems))
        return self


# -- reading inputs ---------------------------------------------------------------------------------------


def read_heldout(path: Path, limit: int) -> list[dict[str, str]]:
    """The first `limit` held-out {"prompt", "response"} pairs (none when the file is absent)."""
    return read_pairs(path, allow_empty=True)[:limit] if path.is_file() else []


def byte_lengths(tokenizer: Tokenizer, tokenizer_file: Path) -> np.ndarray:
    """UTF-8 bytes of each id (`token_byte_lengths`), its failure naming the tokenizer file."""
    try:
        return token_byte_lengths(tokenizer)
    except DataIntegrityError as exc:
        raise DataIntegrityError(f"{tokenizer_file}: {exc}") from exc


def scored_counts(
    val: np.ndarray, lengths: np.ndarray, eval_tokens: int, *, val_file: Path, tokenizer_file: Path
) -> tuple[int, int]:
    """(targets, bytes) of what is scored: the targets among the first `eval_tokens` validation tokens and
    the UTF-8 bytes they decode to (`lengths` per id; end-of-text: 0), which turn their loss into bits per
    byte. Counted on the scored tokens themselves, so they hold for any eval_tokens, whole split or not."""
    try:
        n_targets, n_bytes = len(scored_targets(val, eval_tokens)), target_bytes(val, eval_tokens, lengths)
    except DataIntegrityError as exc:
        raise DataIntegrityError(f"{val_file}: {exc} ({tokenizer_file})") from exc
    if n_bytes == 0:
        raise DataIntegrityError(f"{val_file}: the {n_targets} scored tokens decode to 0 bytes (end-of-text only?)")
    return n_targets, n_bytes


def baselines(
    train: np.ndarray, val: np.ndarray, vocab_size: int, lengths: np.ndarray, cfg: EvaluateConfig, train_file: Path
) -> tuple[BaselineScore, BaselineScore]:
    """(unigram, bigram) on the targets the models are scored on, both counted on the training split alone."""
    try:
        unigram = unigram_baseline(train, val, vocab_size, cfg.eval_tokens, lengths)
        bigram = bigram_baseline(train[: cfg.bigram_train_tokens], val, vocab_size, cfg.eval_tokens, lengths)
    except DataIntegrityError as exc:
        raise DataIntegrityError(f"{train_file}: {exc}") from exc
    return unigram, bigram


def quantize_summary(folder: Path) -> dict[str, Any]:
    """What the quantize stage reported of the model in `folder` (its quantize_report.json, else its manifest's
    metrics): the figures the report shows, and whether the stage `rejected` the model and why."""
    path = folder / QUANTIZE_REPORT
    source = path if path.is_file() else folder / MANIFEST
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataIntegrityError(f"{source}: unreadable ({type(exc).__name__})") from exc
    if source.name == MANIFEST:
        data = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise DataIntegrityError(f"{source}: not a JSON object of quantize figures")
    rejected = data.get("rejected", False)
    if not isinstance(rejected, bool):
        raise DataIntegrityError(f"{source}: 'rejected' is {rejected!r}, not true or false")
    summary = {key: data[key] for key in _QUANTIZE_KEYS if key in data}
    reason = data.get("rejected_reason")
    summary.update(
        rejected=rejected, rejected_reason=(str(reason) if reason else "no reason given") if rejected else None
    )
    return summary


def completion_suite(
    val: np.ndarray, tokenizer: Tokenizer, cfg: EvaluateConfig
) -> tuple[CompletionSuite | None, dict[str, Any]]:
    """The completion suite of the complete validation documents within the first `eval_tokens` tokens (the
    text the losses score), and what the report says of it: its size, chance level and settings, or why
    there is none (no sentence long enough, too few other documents for the distractors)."""
    documents = documents_from_tokens(val[: tokens_read(val, cfg.eval_tokens)], tokenizer)
    info: dict[str, Any] = {"documents": len(documents), "chance": 1.0 / cfg.completion.n_choices}
    info.update(cfg.completion.model_dump(mode="json"))
    try:
        suite = build_completion_suite(documents, cfg.completion)
    except DataIntegrityError as exc:
        return None, {**info, "items": 0, "skipped": str(exc)}
    return suite, {**info, "items": len(suite.items), "chance": suite.chance, "skipped": None}


# -- scoring ----------------------------------------------------------------------------------------------


def sample_texts(model: GPT, tokenizer: Tokenizer, cfg: EvaluateConfig, device: torch.device) -> list[dict[str, str]]:
    """One completion per prompt. Each prompt's generator is seeded alike for every model, so two models'
    samples differ by what the models learned, not by the random stream."""
    samples = []
    for i, prompt in enumerate(cfg.prompts):
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        idx = torch.tensor([ids[-model.config.block_size :]], dtype=torch.long, device=device)  # (1, T)
        generator = torch.Generator(device=device).manual_seed(cfg.seed + i)
        out = model.generate(
            idx,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            generator=generator,
            stop_token=tokenizer.eot_id,
        )
        new = out[0, idx.size(1) :].tolist()
        if tokenizer.eot_id in new:
            new = new[: new.index(tokenizer.eot_id)]
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return samples


def score_model(
    model: GPT,
    tokenizer: Tokenizer,
    val: np.ndarray,
    heldout: list[dict[str, str]],
    counts: tuple[int, int],
    cfg: EvaluateConfig,
    device: torch.device,
    suite: CompletionSuite | None = None,
) -> dict[str, Any]:
    """val_loss, perplexity, bits_per_byte (with `counts` = (scored targets, their bytes)), heldout_loss,
    next_token_accuracy on the same windows as the loss, and the accuracies on `suite` (None without one)."""
    block = model.config.block_size
    loss = eval_loss(model, val, block, cfg.batch_size, cfg.eval_tokens, device)
    heldout_loss = response_loss(model, tokenizer, heldout, block, cfg.batch_size, device) if heldout else None
    completion = evaluate_suite(model, tokenizer, suite, block, cfg.batch_size, device) if suite else None
    return {
        "val_loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_byte": bits_per_byte(loss, *counts),
        "heldout_loss": heldout_loss,
        "next_token_accuracy": next_token_accuracy(model, val, block, cfg.batch_size, cfg.eval_tokens, device),
        "completion_accuracy": None if completion is None else completion.accuracy,
        "completion_accuracy_norm": None if completion is None else completion.accuracy_norm,
    }


def choose_champion(models: dict[str, dict[str, Any]], metric: str) -> tuple[str, str]:
    """(name, reason): the model with the lowest `metric` among those not `rejected`; a tie goes to the one
    listed first."""
    scored = {name: entry[metric] for name, entry in models.items() if entry.get(metric) is not None}
    candidates = {name: value for name, value in scored.items() if not models[name].get("rejected")}
    if not candidates:
        raise DataIntegrityError(f"no model has a {metric} to choose the champion by (no held-out pairs?)")
    best = min(candidates, key=lambda name: candidates[name])
    others = ", ".join(f"{name} {value:.4f}" for name, value in candidates.items() if name != best)
    reason = f"lowest {metric}: {candidates[best]:.4f} (vs {others})" if others else f"only model with a {metric}"
    left_out = [
        f"{name} ({value:.4f}) is not a candidate: rejected by its stage ({models[name]['rejected_reason']})"
        for name, value in scored.items()
        if name not in candidates
    ]
    return best, "; ".join([reason, *left_out])


# -- the champion across runs ----------------------------------------------------------------------------


def frozen_documents(val: np.ndarray, tokenizer: Tokenizer, eval_tokens: int) -> list[str]:
    """The documents among the first `eval_tokens` validation tokens, as text (split at end-of-text; the last
    one may be cut short): what the frozen evaluation set holds when the first champion is made."""
    ids = np.asarray(val[: tokens_read(val, eval_tokens)], dtype=np.int64)
    pieces = np.split(ids, np.flatnonzero(ids == tokenizer.eot_id))  # each but the first starts with one
    texts = [tokenizer.decode(piece[piece != tokenizer.eot_id].tolist()) for piece in pieces]
    return [text for text in texts if text]


def frozen_stream(documents: tuple[str, ...] | list[str], tokenizer: Tokenizer) -> np.ndarray:
    """`eot doc eot doc ... eot` in the tokenizer's ids. The leading end-of-text (the one input nothing
    predicts) makes every byte of text a scored target, whatever the tokenizer."""
    ids = [tokenizer.eot_id]
    for encoded in tokenizer.encode_batch(list(documents)):
        ids += encoded
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, dtype=np.int64)


def score_frozen(
    model: GPT, tokenizer: Tokenizer, frozen: FrozenSet, cfg: EvaluateConfig, device: torch.device
) -> dict[str, Any]:
    """A model's numbers on the frozen set, encoded with the model's own tokenizer: per token, and per UTF-8
    byte of the documents (the same bytes for any tokenizer) and of the scored response tokens."""
    block = model.config.block_size
    stream = frozen_stream(frozen.documents, tokenizer)
    loss = eval_loss(model, stream, block, cfg.batch_size, None, device)
    scores: dict[str, Any] = {
        "val_loss": loss,
        "bits_per_byte": bits_per_byte(loss, len(stream) - 1, frozen.text_bytes),
        "scored_tokens": len(stream) - 1,
        "heldout_loss": None,
        "heldout_bits_per_byte": None,
        "heldout_pairs": 0,
    }
    examples, _ = encode_pairs(tokenizer, list(frozen.heldout), block)
    if examples:
        labels = np.array([label for _, pair_labels in examples for label in pair_labels], dtype=np.int64)
        labels = labels[labels != IGNORE_INDEX]
        response_bytes = int(token_byte_lengths(tokenizer)[labels].sum())
        heldout = response_loss(model, tokenizer, list(frozen.heldout), block, cfg.batch_size, device)
        scores.update(
            heldout_loss=heldout,
            heldout_bits_per_byte=bits_per_byte(heldout, len(labels), response_bytes) if response_bytes else None,
            heldout_pairs=len(examples),
        )
    return scores


def decide(
    challenger: dict[str, Any], champion: dict[str, Any], cfg: PromotionConfig, same_tokenizer: bool
) -> tuple[str, str]:
    """(promoted or rejected, why) for a challenger and the champion scored alike on the frozen set."""

    def comparable(metric: str) -> str | None:
        """Why `metric` cannot compare the two models, or None."""
        if not same_tokenizer and metric in PER_BYTE:
            return f"{metric} is per token of two different tokenizers and compares nothing (use {PER_BYTE[metric]})"
        if challenger.get(metric) is None and champion.get(metric) is not None:
            return f"the challenger has no {metric} (no held-out response within its context)"
        return None

    problems = []
    metric = cfg.metric
    new, old = challenger.get(metric), champion.get(metric)
    if (why := comparable(metric)) is not None:
        problems.append(why)
    elif new is None or old is None:
        problems.append(f"{metric} cannot be scored on the frozen set (no held-out response within the context)")
    elif old - new <= 0:
        problems.append(f"{metric} {new:.4f} is no better than the champion's {old:.4f}")
    elif old - new < cfg.min_improvement:
        problems.append(
            f"{metric} improves by {old - new:.4f} ({old:.4f} -> {new:.4f}), less than min_improvement "
            f"{cfg.min_improvement}"
        )
    held = []
    for guard, tolerance in sorted(cfg.guards.items()):
        guard_new, guard_old = challenger.get(guard), champion.get(guard)
        if (why := comparable(guard)) is not None:
            problems.append(f"guard {guard}: {why}")
        elif guard_new is None or guard_old is None:
            held.append(f"{guard} not scored (no held-out response within the context)")
        elif guard_new - guard_old > tolerance:
            problems.append(
                f"guard {guard} gets worse by {guard_new - guard_old:.4f} ({guard_old:.4f} -> {guard_new:.4f}), "
                f"more than its tolerance {tolerance}"
            )
        else:
            held.append(f"{guard} {guard_old:.4f} -> {guard_new:.4f} (tolerance {tolerance})")
    if problems:
        return REJECTED, "; ".join(problems)
    reason = f"{metric} improves by {old - new:.4f} ({old:.4f} -> {new:.4f}; min_improvement {cfg.min_improvement})"
    return PROMOTED, reason + (f"; guards: {', '.join(held)}" if held else "")


def load_stored_model(store: Store, model: str, device: torch.device, what: str) -> tuple[GPT, Tokenizer, str, str]:
    """A model of the registry or of an earlier run (`what` it is, for the errors): its weights, its tokenizer
    (from its lineage), that tokenizer's version and the tokenizer file's sha256."""
    stage, version = split_model_id(model)
    if not store.has(stage, version):
        raise DataIntegrityError(
            f"{what} {model} is not in the store at {store.root} (gc keeps what the registry and the runs "
            "name: was it deleted by hand?)"
        )
    if (damage := store.damage(stage, version)) is not None:
        raise DataIntegrityError(f"{what} {model} is damaged: {damage}")
    tokenizer_version = store.lineage(stage, version).get("tokenizer")
    if tokenizer_version is None:
        raise DataIntegrityError(f"{what} {model} has no tokenizer in its lineage")
    tokenizer_file = store.path("tokenizer", tokenizer_version) / FILENAME
    folder = store.path(stage, version)
    weights = load_quantized(folder, device) if stage == _STAGE_OF["quantized"] else load_model(folder, device)
    return weights, Tokenizer.load(tokenizer_file), tokenizer_version, sha256_file(tokenizer_file)


def model_record(
    store: Store, name: str, version: str, scores: dict[str, Any], frozen_scores: dict[str, Any] | None
) -> dict[str, Any]:
    """What the registry keeps of an evaluated model: where it came from (code, settings, data, tokenizer,
    quantization) and how it scored."""
    stage = _STAGE_OF[name]
    lineage = store.lineage(stage, version)
    manifests = {s: store.manifest(s, v) for s, v in {stage: version, **lineage}.items()}
    params = manifests[stage]["params"]
    return {
        "model": model_id(stage, version),
        "stage": stage,
        "version": version,
        "name": name,
        "created_at": manifests[stage]["created_at"],
        "code_version": manifests[stage]["code_version"],
        "code_versions": {s: m.get("code_version") for s, m in manifests.items()},
        "environment": manifests[stage].get("environment", {}),
        # One hash of every setting the model was made with, its own and its inputs'.
        "config_hash": hashlib.sha256(
            canonical_json({s: m.get("params") for s, m in manifests.items()}).encode()
        ).hexdigest()[:16],
        "lineage": lineage,
        "data_version": lineage.get("tokens"),
        "tokenizer_version": lineage.get("tokenizer"),
        "quantization": {k: params.get(k) for k in ("bits", "group_size")} if name == "quantized" else None,
        "metrics": scores,
        "frozen_metrics": frozen_scores,
    }


def flow_run_id() -> str | None:
    """The pipeline run this evaluation belongs to (its Prefect flow run, the run record's id), or None for
    a stage run outside a flow. Under a flow Prefect is loaded already; outside one it is not loaded for this."""
    if "prefect" not in sys.modules:
        return None
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def registry_snapshot(cfg: EvaluateConfig, store: Store) -> dict[str, Any] | None:
    """The identity hook: the champion alias as it stands (one small file); `EvaluateStage.compared_with`
    resolves from it which champion an evaluation is compared with."""
    champion = Registry(store.root).alias(CHAMPION)
    if champion is None:
        return None
    return {key: champion.get(key) for key in ("model", "seq", "frozen_set", "promoted_by", "compared_with")}


class EvaluateStage(Stage):
    """The evaluate stage, whose version id also names the champion it is compared with."""

    def compared_with(
        self, cfg: StageConfig, inputs: Mapping[str, str], snapshot: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """The champion (`champion`, its alias `seq` and `frozen_set`) an evaluation of `inputs` is judged
        against, from the identity hook's snapshot: None before the first champion. The current champion,
        except for the very evaluation that promoted it, which stays judged against the champion before:
        so rerunning a pipeline with nothing changed finds its evaluation cached, instead of judging its
        champion against itself."""
        if snapshot is None:
            return None
        before = snapshot["compared_with"]
        if snapshot["promoted_by"] == super().version(cfg, inputs, before):
            return before
        return {"champion": snapshot["model"], "seq": snapshot["seq"], "frozen_set": snapshot["frozen_set"]}

    def version(self, cfg: StageConfig, inputs: Mapping[str, str], identity: Any = None) -> str:
        return super().version(cfg, inputs, self.compared_with(cfg, inputs, identity))


# -- the comparison across versions -----------------------------------------------------------------------


def make_frozen_set(
    ctx: StageContext,
    cfg: EvaluateConfig,
    compared: dict[str, Any] | None,
    val: np.ndarray,
    tokenizer: Tokenizer,
    heldout: list[dict[str, str]],
) -> FrozenSet:
    """The registry's frozen evaluation set that the champion judged against was scored on; before the first
    champion, the one this run makes of its validation documents and held-out pairs."""
    if compared is not None:
        return Registry(ctx.store.root).frozen(compared["frozen_set"])
    source = {key: ctx.inputs[key] for key in ("tokens", "tokenizer", "finetune")}
    documents = frozen_documents(val, tokenizer, cfg.eval_tokens)
    return FrozenSet.make(documents, heldout, {**source, "eval_tokens": tokens_read(val, cfg.eval_tokens)})


def previous_evaluation(
    store: Store, version: str, models: set[str], log: logging.Logger | logging.LoggerAdapter
) -> dict[str, Any] | None:
    """The previous run: the newest evaluation in the store, made before evaluate/`version`, that scored other
    models than `models` (model ids), as {"version", "created_at", "models": {name: model id}}; None when
    there is none. A rebuilt version looks before its first build, and so finds what that build found."""
    cutoff = store.manifest("evaluate", version)["created_at"] if store.has("evaluate", version) else None
    for manifest in reversed(store.versions("evaluate")):
        other = manifest["version"]
        if other == version or (cutoff is not None and manifest["created_at"] >= cutoff):
            continue
        path = store.path("evaluate", other) / REPORT_JSON
        try:
            scored = json.loads(path.read_text(encoding="utf-8"))["models"]
            named = {name: model_id(_STAGE_OF[name], scored[name]["version"]) for name in MODELS if name in scored}
        except (OSError, ValueError, KeyError, TypeError) as exc:  # an evaluation of another layout
            log.warning("%s is unreadable (%s): not compared with", path, type(exc).__name__)
            continue
        if named and set(named.values()) != models:
            return {"version": other, "created_at": manifest["created_at"], "models": named}
    return None


def compare_versions(
    ctx: StageContext,
    cfg: EvaluateConfig,
    frozen: FrozenSet,
    compared: dict[str, Any] | None,
    challenger: str,
    models: dict[str, dict[str, Any]],
    loaders: dict[str, Callable[[], GPT]],
    tokenizer: Tokenizer,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """This run's models, the previous run's and the champion, each scored in this run on the frozen set with
    its own tokenizer. Returns the report's `comparison` (a row per model, with its roles) and the scores by
    model id. A model of the previous run that cannot be loaded is listed with the reason (`skipped`, and no
    scores); the champion must load (the gate needs it)."""
    this_run = {model_id(_STAGE_OF[name], models[name]["version"]): name for name in MODELS}
    previous = previous_evaluation(ctx.store, ctx.version, set(this_run), ctx.log)
    rows: dict[str, dict[str, Any]] = {}
    named = [(model, THIS_RUN) for model in this_run] + [(challenger, CHALLENGER_ROLE)]
    named += [(model, PREVIOUS_RUN) for model in (previous or {}).get("models", {}).values()]
    named += [] if compared is None else [(compared["champion"], CHAMPION_ROLE)]
    for model, role in named:
        stage, version = split_model_id(model)
        row = rows.setdefault(model, {"model": model, "stage": stage, "version": version, "roles": []})
        row["roles"].append(role)
    own_sha = sha256_file(ctx.input_path("tokenizer") / FILENAME)
    scores: dict[str, dict[str, Any]] = {}
    for model, row in rows.items():
        row.update(rejected=False, rejected_reason=None, skipped=None)
        if model in this_run:
            name = this_run[model]
            weights, its_tokenizer = loaders[name](), tokenizer
            tokenizer_version, sha = ctx.inputs["tokenizer"], own_sha
            row.update(rejected=bool(models[name].get("rejected")), rejected_reason=models[name].get("rejected_reason"))
        else:
            what = "the champion" if CHAMPION_ROLE in row["roles"] else "the previous run's model"
            try:
                weights, its_tokenizer, tokenizer_version, sha = load_stored_model(ctx.store, model, device, what)
                if row["stage"] == _STAGE_OF["quantized"]:
                    quantized = quantize_summary(ctx.store.path(row["stage"], row["version"]))
                    row.update(rejected=quantized["rejected"], rejected_reason=quantized["rejected_reason"])
            except DataIntegrityError as exc:
                if CHAMPION_ROLE in row["roles"]:
                    raise
                ctx.log.warning("not compared: %s", exc)
                row["skipped"] = str(exc)
                continue
        ctx.log.info("scoring %s (%s) on the frozen evaluation set %s", model, ", ".join(row["roles"]), frozen.id)
        scores[model] = score_frozen(weights, its_tokenizer, frozen, cfg, device)
        del weights  # one model in memory at a time
        row.update(tokenizer_version=tokenizer_version, same_tokenizer=sha == own_sha)
        row.update({key: scores[model][key] for key in _FROZEN_KEYS})
    comparison = {
        "frozen_set": frozen.describe(),
        "tokenizer_version": ctx.inputs["tokenizer"],
        "previous_evaluation": previous,
        "champion": None if compared is None else compared["champion"],
        "models": list(rows.values()),
    }
    return comparison, scores


def judge(
    ctx: StageContext,
    cfg: EvaluateConfig,
    challenger: str,
    models: dict[str, dict[str, Any]],
    compared: dict[str, Any] | None,
    frozen: FrozenSet,
    comparison: dict[str, Any],
    scores: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Judge the run's best model `challenger` (a model id) against the registry's champion, both scored on the
    frozen set (`scores`), commit the decision and record the models; returns the report's `promotion`."""
    registry = Registry(ctx.store.root)
    challenger_scores = scores[challenger]
    champion_scores: dict[str, Any] | None = None
    same_tokenizer = True
    if compared is None:
        decision, reason = PROMOTED, f"the first champion; the frozen set is made from tokens/{ctx.inputs['tokens']}"
    elif compared["champion"] == challenger:
        decision, reason = PROMOTED, f"{challenger} is the champion already (decision {compared['seq']})"
        champion_scores = challenger_scores
    else:
        champion_scores = scores[compared["champion"]]
        same_tokenizer = next(r for r in comparison["models"] if r["model"] == compared["champion"])["same_tokenizer"]
        decision, reason = decide(challenger_scores, champion_scores, cfg.promotion, same_tokenizer)

    run_id = flow_run_id()
    records = []
    for name in MODELS:
        version = models[name]["version"]
        frozen_scores = scores.get(model_id(_STAGE_OF[name], version))
        record = model_record(ctx.store, name, version, models[name], frozen_scores)
        records.append(
            {**record, "run_id": run_id, "evaluate_version": ctx.version, "evaluated_at": datetime.now(UTC).isoformat()}
        )
    champion = None if compared is None else compared["champion"]
    settings = cfg.promotion.model_dump(mode="json")
    seq = None
    if champion == challenger:  # no decision to make: only the models are recorded
        registry.record(records)
    else:
        committed = registry.commit(
            {
                "decision": decision,
                "challenger": challenger,
                "champion": champion,
                "reason": reason,
                "metrics": {"challenger": challenger_scores, "champion": champion_scores},
                "settings": settings,
                "same_tokenizer": same_tokenizer,
                "frozen_set": frozen.id,
                "compared_with": compared,
                "evaluate_version": ctx.version,
                "run_id": run_id,
            },
            expected_seq=None if compared is None else compared["seq"],
            models=records,
            frozen=frozen if compared is None else None,
        )
        decision, reason, seq = committed["decision"], committed["reason"], committed["seq"]
    ctx.log.info("%s %s: %s", decision, challenger, reason)
    return {
        "decision": decision,
        "challenger": challenger,
        "champion": champion,
        "reason": reason,
        "metrics": {"challenger": challenger_scores, "champion": champion_scores},
        "champion_after": challenger if decision == PROMOTED else champion,
        "seq": seq,
        "same_tokenizer": same_tokenizer,
        "frozen_set": frozen.describe(),
        **settings,
    }


# -- writing ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mark(name: str, entry: dict[str, Any], report: dict[str, Any]) -> str:
    if entry.get("rejected"):
        return f"{name} **(rejected)**"
    return f"{name} **(challenger)**" if name == report["champion"] else name


def render_summary(report: dict[str, Any]) -> list[str]:
    """The title and a paragraph that says what came out."""
    best = report["models"][report["champion"]]
    if best["gain_over_bigram"] > 0:
        verdict = "better than the bigram, so it uses more context than the token before"
    elif best["gain_over_unigram"] > 0:
        verdict = (
            "better than token frequencies alone but not than the bigram, so it has learned no more than the token "
            "before tells"
        )
    else:
        verdict = "no better than token frequencies alone, so it has learned no context"
    promotion = report["promotion"]
    if promotion["decision"] != PROMOTED:
        outcome = f"the champion stays {promotion['champion']}"
    elif promotion["champion"] is None:
        outcome = "the registry's first champion"
    elif promotion["champion"] == promotion["challenger"]:
        outcome = "it is the champion already"
    else:
        outcome = f"it replaces {promotion['champion']} as the champion"
    return [
        "# Evaluation",
        "",
        f"The best model of this run is **{report['champion']}**, by the {report['champion_reason']}. On validation "
        f"text it never saw it scores {best['val_loss']:.4f} nats/token, where the unigram baseline scores "
        f"{report['unigram_val_loss']:.4f} and the bigram {report['bigram_val_loss']:.4f}: {verdict}. Judged against "
        f"the registry's champion: **{promotion['decision']}**, {outcome}.",
    ]


def render_models(report: dict[str, Any]) -> list[str]:
    """This run's models and the baselines on this run's validation tokens, each column explained."""
    unscored = report["heldout_pairs_read"] - report["heldout_pairs"]
    lines = [
        "## This run's models",
        "",
        f"Scored on the first {report['eval_tokens']:,} validation tokens of tokens/{report['tokens_version']} "
        f"({report['scored_tokens']:,} predicted targets, {report['scored_bytes']:,} bytes of text; end-of-text "
        f"counts 0 bytes) and {report['heldout_pairs']} held-out fine-tuning pairs"
        + (f" ({unscored} more have no response token within the context)." if unscored else "."),
        "",
        "| model | version | val loss | perplexity | bits/byte | next-token accuracy | gain over bigram | "
        "gain over unigram | held-out loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["models"].items():
        lines.append(
            f"| {_mark(name, entry, report)} | {entry['version']} | {_fmt(entry['val_loss'])} | "
            f"{entry['perplexity']:.2f} | {_fmt(entry['bits_per_byte'])} | {_pct(entry['next_token_accuracy'])} | "
            f"{entry['gain_over_bigram']:+.4f} | {entry['gain_over_unigram']:+.4f} | {_fmt(entry['heldout_loss'])} |"
        )
    for baseline in ("bigram", "unigram"):
        lines.append(
            f"| {baseline} baseline | - | {_fmt(report[f'{baseline}_val_loss'])} | "
            f"{report[f'{baseline}_perplexity']:.2f} | {_fmt(report[f'{baseline}_bits_per_byte'])} | - | - | - | - |"
        )
    rejected = [
        f"{name} was rejected by its stage ({entry['rejected_reason']}): it is scored here, never the challenger."
        for name, entry in report["models"].items()
        if entry.get("rejected")
    ]
    if rejected:
        lines += ["", *rejected]
    lines += [
        "",
        "- **val loss**: the mean cross-entropy of the next token, in nats per token (lower is better); "
        "**perplexity** is e^loss, how many equally likely tokens the model is as unsure as.",
        "- **bits/byte**: the same loss in bits per byte of UTF-8 text, which compares models of any tokenizers.",
        "- **next-token accuracy**: the share of those targets that are the model's most likely token.",
        "- **gain over bigram / unigram**: the baseline's loss minus the model's (nats/token; higher is better). "
        "The unigram knows only how common each token is in the training split; the bigram also knows the token "
        f"before (counted on the first {report['bigram_train_tokens']:,} training tokens, interpolated with the "
        "unigram). A gain over the bigram is what the model learned from more context than one token.",
        "- **held-out loss**: the mean loss per response token of fine-tuning pairs held out from training.",
    ]
    return lines


def render_completion(report: dict[str, Any]) -> list[str]:
    """The completion suite: what it is, its size and chance level, and each model's accuracies."""
    suite = report["completion"]
    lines = ["## Completion suite", ""]
    if suite["skipped"] is not None:
        return [*lines, f"No completion suite this run: {suite['skipped']}."]
    # The largest standard error of an accuracy over this many items (at 50%): sqrt(0.25 / items).
    stderr = math.sqrt(0.25 / suite["items"])
    lines += [
        f"{suite['items']:,} items cut from {suite['documents']:,} validation documents (those complete within the "
        f"scored tokens; seed {suite['seed']}). Each item is a document's text up to the last "
        f"{suite['ending_words']} words of one of its sentences, and {suite['n_choices']} candidate endings: the true "
        f"one and {suite['n_choices'] - 1} endings of other documents' sentences of about the same length. A model "
        f"picks the ending it finds most likely. Chance is {_pct(suite['chance'])}; over {suite['items']:,} items an "
        f"accuracy's standard error is at most {_pct(stderr)}, so a difference under twice that is noise.",
        "",
        "| model | accuracy | accuracy per character |",
        "|---|---:|---:|",
    ]
    for name, entry in report["models"].items():
        lines.append(
            f"| {_mark(name, entry, report)} | {_pct(entry['completion_accuracy'])} | "
            f"{_pct(entry['completion_accuracy_norm'])} |"
        )
    lines += [
        f"| chance | {_pct(suite['chance'])} | {_pct(suite['chance'])} |",
        "",
        "- **accuracy**: the true ending has the highest summed log-likelihood of its tokens.",
        "- **accuracy per character**: that log-likelihood divided by the ending's characters "
        "(lm-evaluation-harness's acc_norm), which does not favour short endings.",
    ]
    return lines


def render_comparison(comparison: dict[str, Any]) -> list[str]:
    """This run's models, the previous run's and the champion, on the frozen set, each by its store version."""
    frozen, previous = comparison["frozen_set"], comparison["previous_evaluation"]
    champion = next((r for r in comparison["models"] if r["model"] == comparison["champion"]), None)
    lines = [
        "## Across versions",
        "",
        f"Every model below was scored in this run on the registry's frozen evaluation set {frozen['id']} "
        f"({frozen['documents']:,} documents, {frozen['text_bytes']:,} bytes of text, {frozen['heldout_pairs']} "
        f"held-out pairs; made from tokens/{frozen['source'].get('tokens')}), each with its own tokenizer, so that "
        "nightly data growth does not move the numbers. "
        + (
            f"The previous run is evaluate/{previous['version']} ({previous['created_at'][:19]}), the newest earlier "
            "evaluation of other models. "
            if previous
            else "No earlier evaluation of other models is in the store. "
        )
        + (f"The champion is {champion['model']}." if champion else "There was no champion before this run."),
        "**bits/byte** compares any two models; the per-token **val loss** and **held-out loss** compare only models "
        "of one tokenizer, and show `-` for a model of another; **vs champion** is bits/byte minus the champion's "
        "(negative: better).",
        "",
        "| model | store version | role | tokenizer | bits/byte | vs champion | val loss | held-out bits/byte | "
        "held-out loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    skipped = []
    for row in comparison["models"]:
        if row["skipped"] is not None:
            skipped.append(f"{row['model']} ({', '.join(row['roles'])}) is not compared: {row['skipped']}")
            continue
        same = row["same_tokenizer"]
        delta = None if champion is None or champion["skipped"] else row["bits_per_byte"] - champion["bits_per_byte"]
        roles = ", ".join(row["roles"]) + (" (rejected)" if row["rejected"] else "")
        tokenizer = "this run's" if same else f"other (tokenizer/{row['tokenizer_version']})"
        lines.append(
            f"| {_NAME_OF.get(row['stage'], row['stage'])} | {row['model']} | {roles} | {tokenizer} | "
            f"{_fmt(row['bits_per_byte'])} | {'-' if delta is None else f'{delta:+.4f}'} | "
            f"{_fmt(row['val_loss'] if same else None)} | {_fmt(row['heldout_bits_per_byte'])} | "
            f"{_fmt(row['heldout_loss'] if same else None)} |"
        )
    if skipped:
        lines += ["", *skipped]
    return lines


def render_promotion(promotion: dict[str, Any]) -> list[str]:
    """The report's section on the challenger judged against the registry's champion."""
    frozen = promotion["frozen_set"]
    outcome = (
        f"**{promotion['challenger']}** is the champion"
        if promotion["decision"] == PROMOTED
        else f"the champion stays **{promotion['champion']}**"
    )
    lines = [
        "## Promotion",
        "",
        f"**{promotion['decision']}**: {outcome} ({promotion['reason']}).",
        "",
        "The registry's champion is the model a deployment serves; the run's best model (the challenger) replaces it "
        "only when it is better by the gate below on the frozen set.",
        f"Both scored on the frozen evaluation set {frozen['id']} ({frozen['documents']:,} documents, "
        f"{frozen['text_bytes']:,} bytes of text, {frozen['heldout_pairs']} held-out pairs; made from "
        f"tokens/{frozen['source'].get('tokens')}), each model with its own tokenizer"
        + ("." if promotion["same_tokenizer"] else " (two different tokenizers: compare per byte only)."),
        f"Gate: {promotion['metric']} must improve by at least {promotion['min_improvement']}"
        + "".join(f"; {g} may get worse by at most {t}" for g, t in sorted(promotion["guards"].items()))
        + ".",
        "",
        "| model | role | bits/byte | val loss | held-out bits/byte | held-out loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    roles = [("challenger", promotion["challenger"])]
    if promotion["champion"] not in (None, promotion["challenger"]):
        roles.append(("champion", promotion["champion"]))
    for role, model in roles:
        m = promotion["metrics"][role]
        lines.append(
            f"| {model} | {role} | {_fmt(m['bits_per_byte'])} | {_fmt(m['val_loss'])} | "
            f"{_fmt(m['heldout_bits_per_byte'])} | {_fmt(m['heldout_loss'])} |"
        )
    return lines


def _speed(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def render_quantization(quantization: dict[str, Any]) -> list[str]:
    """What the quantize stage measured: size, speed and validation loss, float against quantized."""
    q = quantization
    method = q.get("method") or f"int{q.get('bits', '?')} weights"
    lines = ["## Quantization", "", f"quantize/{q['version']}: {method}."]
    if q["rejected"]:
        lines[-1] += f" **Rejected by the quantize stage**: {q['rejected_reason']}."
    bits = f"int{q['bits']}" if "bits" in q else "quantized"
    lines += [
        "Measured by the quantize stage on the CPU"
        + (f" on {q['cpu_threads']} thread(s)" if "cpu_threads" in q else "")
        + " (timings: medians of its timed runs).",
        "",
        f"| | fp32 | {bits} | change |",
        "|---|---:|---:|---:|",
    ]
    if "fp32_file_bytes" in q and "quantized_file_bytes" in q:
        ratio = q["fp32_file_bytes"] / q["quantized_file_bytes"]
        lines.append(
            f"| weights file (MB) | {q['fp32_file_bytes'] / 1e6:.2f} | {q['quantized_file_bytes'] / 1e6:.2f} | "
            f"{ratio:.2f}x smaller |"
        )
    if "decode_tokens_per_s_fp32" in q and "decode_tokens_per_s_quantized" in q:
        fp32, quantized = q["decode_tokens_per_s_fp32"], q["decode_tokens_per_s_quantized"]
        lines.append(f"| greedy decoding (tokens/s) | {fp32:.0f} | {quantized:.0f} | {_speed(quantized / fp32)} |")
    if "latency_fp32_ms" in q and "latency_quantized_ms" in q:
        fp32, quantized = q["latency_fp32_ms"], q["latency_quantized_ms"]
        lines.append(f"| forward pass, one context (ms) | {fp32:.2f} | {quantized:.2f} | {_speed(fp32 / quantized)} |")
    if "val_loss_fp32" in q and "val_loss_quantized" in q:
        delta = q["val_loss_quantized"] - q["val_loss_fp32"]
        bound = f" (bound +{q['max_loss_increase']})" if "max_loss_increase" in q else ""
        tokens = f", first {q['eval_tokens']:,} tokens" if "eval_tokens" in q else ""
        lines.append(
            f"| val loss, stored weights (nats/token{tokens}) | {q['val_loss_fp32']:.4f} | "
            f"{q['val_loss_quantized']:.4f} | {delta:+.4f}{bound} |"
        )
    if "val_loss_fp32" in q and "val_loss_cpu_kernel" in q:
        delta = q["val_loss_cpu_kernel"] - q["val_loss_fp32"]
        lines.append(f"| val loss, CPU kernels | - | {q['val_loss_cpu_kernel']:.4f} | {delta:+.4f} |")
    return [*lines, "", f"![Quantization: file size, decoding speed and validation loss]({QUANTIZE_PLOT})"]


FINETUNE_LOSSES = ("heldout_loss_before", "heldout_loss_after_full", "heldout_loss_after_lora")


def finetune_summary(manifest_metrics: dict[str, Any]) -> dict[str, Any]:
    """What fine-tuning did to the held-out response loss, as its stage measured it: before, after full
    fine-tuning and after LoRA (null for a method not trained; `finetune.compare` trains both), with each
    drop, and which method's weights were published."""
    found: dict[str, Any] = {"method": manifest_metrics.get("method", "full")}
    found.update({key: manifest_metrics.get(key) for key in FINETUNE_LOSSES})
    before = found["heldout_loss_before"]
    for method in ("full", "lora"):
        after = found[f"heldout_loss_after_{method}"]
        found[f"drop_{method}"] = before - after if before is not None and after is not None else None
    return found


def render_finetune(finetune: dict[str, Any]) -> list[str]:
    lines = [
        "## Fine-tuning",
        "",
        "The held-out response loss (nats per response token, on pairs of modules left out of pretraining) before "
        f"fine-tuning and after each method, as the finetune stage measured it; `{finetune['method']}` was published.",
        "",
        "| | held-out loss | drop |",
        "|---|---|---|",
        f"| before | {_fmt(finetune['heldout_loss_before'])} | |",
    ]
    for method in ("full", "lora"):
        after = finetune[f"heldout_loss_after_{method}"]
        if after is not None:
            lines.append(f"| after {method} | {_fmt(after)} | {_fmt(finetune[f'drop_{method}'])} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        *render_summary(report),
        "",
        *render_models(report),
        "",
        *render_completion(report),
        "",
        f"![Per model: validation loss against the baselines, and accuracy]({VAL_LOSS_PLOT})",
        "",
        *render_comparison(report["comparison"]),
        "",
        *render_promotion(report["promotion"]),
        "",
        *render_quantization(report["quantization"]),
        "",
        *(render_finetune(report["finetune"]) + [""] if report.get("finetune") else []),
        "## Training curves",
        "",
        "The losses pretraining and fine-tuning logged as they ran, pretraining's beside the baselines' validation "
        "loss (fine-tuning's validation loss is on its held-out responses).",
        "",
        f"![Training and validation loss of pretraining and fine-tuning]({CURVES_PLOT})",
        "",
        "## Samples",
        "",
    ]
    sampling = report["sampling"]
    lines.append(
        f"temperature {sampling['temperature']}, top_k {sampling['top_k']}, "
        f"{sampling['max_new_tokens']} new tokens, seed {sampling['seed']}"
    )
    for sample in report["samples"]:
        lines += ["", f"**{sample['model']}**, prompt `{sample['prompt']}`:", "", "```text"]
        lines += [sample["prompt"] + sample["completion"], "```"]
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------------

# The plots are embedded in the Prefect UI's artifact (tasks/artifacts.py), which keeps them in its database:
# at 100 dpi and these sizes each is a few tens of KB (a noisy 20,000-point curve: 31 KB).
_BLUE, _ORANGE, _GRAY = "#4c72b0", "#dd8452", "#b0b0b0"


def _model_colors(report: dict[str, Any]) -> list[str]:
    return [
        _GRAY if entry.get("rejected") else _ORANGE if name == report["champion"] else _BLUE
        for name, entry in report["models"].items()
    ]


def plot_models(path: Path, report: dict[str, Any]) -> None:
    """Per model: the validation loss against the two baselines, and the accuracies against chance."""
    names = list(report["models"])
    fig = Figure(figsize=(11, 4), dpi=100)
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    bars = loss_ax.bar(names, [report["models"][name]["val_loss"] for name in names], color=_model_colors(report))
    loss_ax.bar_label(bars, fmt="%.3f")
    loss_ax.axhline(report["unigram_val_loss"], color="gray", linestyle="--", label="unigram baseline")
    loss_ax.axhline(report["bigram_val_loss"], color="black", linestyle=":", label="bigram baseline")
    loss_ax.set_ylabel("validation loss (nats/token)")
    loss_ax.set_title("Validation loss (the challenger in orange)")
    loss_ax.legend(loc="lower right", fontsize=8)

    series = [("next token", "next_token_accuracy", "#55a868"), ("completion", "completion_accuracy", "#8172b3")]
    series.append(("completion, per character", "completion_accuracy_norm", "#64b5cd"))
    series = [(label, key, color) for label, key, color in series if report["models"][names[0]][key] is not None]
    width = 0.8 / len(series)
    for i, (label, key, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        values = [100 * report["models"][name][key] for name in names]
        bars = accuracy_ax.bar(xs, values, width, label=label, color=color)
        accuracy_ax.bar_label(bars, fmt="%.0f", fontsize=8)
    if report["completion"]["skipped"] is None:
        chance = 100 * report["completion"]["chance"]
        accuracy_ax.axhline(chance, color="gray", linestyle="--", label="completion chance")
    accuracy_ax.set_xticks(range(len(names)), names)
    accuracy_ax.set_ylim(0, 100)
    accuracy_ax.set_ylabel("accuracy (%)")
    accuracy_ax.set_title("Accuracy")
    accuracy_ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_quantization(path: Path, quantization: dict[str, Any]) -> None:
    q = quantization
    bits = f"int{q['bits']}" if "bits" in q else "quantized"
    panels = [
        ("weights file (MB)", "fp32_file_bytes", "quantized_file_bytes", 1e-6, "%.2f"),
        ("greedy decoding (tokens/s)", "decode_tokens_per_s_fp32", "decode_tokens_per_s_quantized", 1.0, "%.0f"),
        ("val loss (nats/token)", "val_loss_fp32", "val_loss_quantized", 1.0, "%.4f"),
    ]
    fig = Figure(figsize=(9, 3.2), dpi=100)
    axes = fig.subplots(1, len(panels))
    for ax, (title, fp32, quantized, scale, fmt) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        if fp32 not in q or quantized not in q:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        bars = ax.bar(
            ["fp32", bits], [q[fp32] * scale, q[quantized] * scale], color=[_BLUE, _GRAY if q["rejected"] else _ORANGE]
        )
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.margins(y=0.15)  # room for the labels above the bars
        if "val loss" in title and math.isfinite(q[fp32]) and math.isfinite(q[quantized]):
            # The change is in the last digits: show them, not the distance from 0.
            low, high = sorted((q[fp32], q[quantized]))
            margin = max(high - low, 1e-3 * high)
            ax.set_ylim(low - 2 * margin, high + 2 * margin)
    fig.suptitle(f"Quantization ({bits}{', rejected' if q['rejected'] else ''})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(path: Path, curves: dict[str, list[dict[str, Any]]], report: dict[str, Any]) -> None:
    """The logged losses of pretraining and fine-tuning; pretraining's beside the baselines' validation loss
    (fine-tuning's validation loss is on other text, its held-out responses)."""
    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, records) in zip(axes, curves.items(), strict=True):
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, label=key.replace("_", " "), markersize=3)
        if name == "pretrain" and ax.lines:
            ax.axhline(report["bigram_val_loss"], color="black", linestyle=":", label="bigram baseline")
            ax.axhline(report["unigram_val_loss"], color="gray", linestyle="--", label="unigram baseline")
        ax.set_title(f"{name} (val: {'held-out responses' if name == 'finetune' else 'validation tokens'})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)


def read_curve(folder: Path) -> list[dict[str, Any]]:
    path = folder / METRICS
    return read_metrics(path) if path.is_file() else []


# -- the stage --------------------------------------------------------------------------------------------


def resolve(device: str) -> torch.device:
    resolved = resolve_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate: device 'cuda' was asked for but no CUDA device is available")
    return resolved


def build(ctx: StageContext, cfg: EvaluateConfig) -> dict[str, Any]:
    # On a fixed thread count, as training: the thread count decides how the kernels split their sums, and
    # so the last digits of every loss reported.
    with fixed_threads(CPU_THREADS):
        return _evaluate(ctx, cfg)


def _evaluate(ctx: StageContext, cfg: EvaluateConfig) -> dict[str, Any]:
    # The models compared must be one lineage, scored on the data they were trained on.
    for model_stage in ("pretrain", "finetune", "quantize"):
        ctx.require_common_ancestor(model_stage, "tokens")
    ctx.require_common_ancestor("finetune", "pretrain")
    ctx.require_common_ancestor("quantize", "finetune")
    device = resolve(cfg.device)
    tokens_dir = ctx.input_path("tokens")
    meta = read_meta(tokens_dir)
    if meta.get("tokenizer_version") not in (None, ctx.inputs["tokenizer"]):
        raise DataIntegrityError(
            f"{tokens_dir / META}: tokens were made with tokenizer/{meta['tokenizer_version']}, "
            f"not the tokenizer/{ctx.inputs['tokenizer']} given to evaluate"
        )
    val = open_tokens(tokens_dir, "val")
    tokenizer_file = ctx.input_path("tokenizer") / FILENAME
    tokenizer = Tokenizer.load(tokenizer_file)
    lengths = byte_lengths(tokenizer, tokenizer_file)
    counts = scored_counts(
        val, lengths, cfg.eval_tokens, val_file=tokens_dir / "val.bin", tokenizer_file=tokenizer_file
    )
    heldout = read_heldout(ctx.input_path("finetune") / HELDOUT, cfg.heldout_pairs)
    # The three models share one config (finetune and quantize copy their input's), so one context length.
    scored_pairs = len(encode_pairs(tokenizer, heldout, load_config(ctx.input_path("pretrain")).block_size)[0])
    if cfg.champion_metric == "heldout_loss" and not scored_pairs:
        what = (
            f"none of the {len(heldout)} held-out pairs has a response token within the context"
            if heldout
            else "no held-out pairs"
        )
        raise DataIntegrityError(
            f"{ctx.input_path('finetune') / HELDOUT}: {what}, so champion_metric 'heldout_loss' cannot be scored"
        )
    scored_heldout = heldout if scored_pairs else []  # pairs none of which fits the context have no loss
    quantization = {"version": ctx.inputs["quantize"], **quantize_summary(ctx.input_path("quantize"))}
    if quantization["rejected"]:
        ctx.log.warning(
            "quantize/%s was rejected by its stage (%s): scored, never the challenger",
            ctx.inputs["quantize"],
            quantization["rejected_reason"],
        )

    train = open_tokens(tokens_dir, "train")
    ctx.log.info("fitting the unigram and bigram baselines on the training split")
    unigram, bigram = baselines(train, val, meta["vocab_size"], lengths, cfg, tokens_dir / "train.bin")
    suite, completion = completion_suite(val, tokenizer, cfg)
    if suite is None:
        ctx.log.warning("no completion suite: %s", completion["skipped"])
    loaders: dict[str, Callable[[], GPT]] = {
        "pretrain": lambda: load_model(ctx.input_path("pretrain"), device),
        "finetune": lambda: load_model(ctx.input_path("finetune"), device),
        "quantized": lambda: load_quantized(ctx.input_path("quantize"), device),
    }
    models: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, str]] = []
    for name in MODELS:
        model = loaders[name]()  # one model in memory at a time
        if model.config.vocab_size < meta["vocab_size"]:
            raise DataIntegrityError(
                f"{_STAGE_OF[name]}/{ctx.inputs[_STAGE_OF[name]]}: vocab_size {model.config.vocab_size} is "
                f"smaller than the tokens' {meta['vocab_size']} ({tokens_dir / META})"
            )
        ctx.log.info("scoring %s", name)
        entry = score_model(model, tokenizer, val, scored_heldout, counts, cfg, device, suite)
        entry["version"] = ctx.inputs[_STAGE_OF[name]]
        entry["gain_over_unigram"] = unigram.loss - entry["val_loss"]
        entry["gain_over_bigram"] = bigram.loss - entry["val_loss"]
        if name == "quantized" and quantization["rejected"]:
            entry.update(rejected=True, rejected_reason=quantization["rejected_reason"])
        models[name] = entry
        samples += [{"model": name, **sample} for sample in sample_texts(model, tokenizer, cfg, device)]
        del model

    champion, reason = choose_champion(models, cfg.champion_metric)  # this run's best: the challenger
    best = models[champion]["val_loss"]
    if best >= unigram.loss:
        ctx.log.warning(
            "the best model %s (val loss %.4f) does not beat the unigram baseline (%.4f): it learned no context",
            champion,
            best,
            unigram.loss,
        )
    elif best >= bigram.loss:
        ctx.log.warning(
            "the best model %s (val loss %.4f) does not beat the bigram baseline (%.4f): it learned nothing from "
            "more context than the token before",
            champion,
            best,
            bigram.loss,
        )
    compared = STAGE.compared_with(cfg, ctx.inputs, ctx.identity)  # what the version id was made from
    frozen = make_frozen_set(ctx, cfg, compared, val, tokenizer, heldout)
    challenger = model_id(_STAGE_OF[champion], ctx.inputs[_STAGE_OF[champion]])
    comparison, frozen_scores = compare_versions(
        ctx, cfg, frozen, compared, challenger, models, loaders, tokenizer, device
    )
    promotion = judge(ctx, cfg, challenger, models, compared, frozen, comparison, frozen_scores)
    report = {
        "models": models,
        "unigram_val_loss": unigram.loss,
        "unigram_perplexity": unigram.perplexity,
        "unigram_bits_per_byte": unigram.bits_per_byte,
        "bigram_val_loss": bigram.loss,
        "bigram_perplexity": bigram.perplexity,
        "bigram_bits_per_byte": bigram.bits_per_byte,
        "bigram_train_tokens": min(len(train), cfg.bigram_train_tokens),
        "completion": completion,
        "champion": champion,
        "champion_version": models[champion]["version"],
        "champion_metric": cfg.champion_metric,
        "champion_reason": reason,
        "samples": samples,
        "sampling": {k: getattr(cfg, k) for k in ("temperature", "top_k", "max_new_tokens", "seed")},
        "eval_tokens": tokens_read(val, cfg.eval_tokens),
        "scored_tokens": counts[0],
        "scored_bytes": counts[1],
        "heldout_pairs": scored_pairs,
        "heldout_pairs_read": len(heldout),
        "tokens_version": ctx.inputs["tokens"],
        "quantization": quantization,
        "finetune": finetune_summary(ctx.store.manifest("finetune", ctx.inputs["finetune"])["metrics"]),
        "comparison": comparison,
        "promotion": promotion,
    }
    atomic_write_json(ctx.out / REPORT_JSON, report)
    atomic_write_text(ctx.out / REPORT_MD, render_markdown(report))
    plot_models(ctx.out / VAL_LOSS_PLOT, report)
    plot_quantization(ctx.out / QUANTIZE_PLOT, quantization)
    plot_curves(ctx.out / CURVES_PLOT, {s: read_curve(ctx.input_path(s)) for s in ("pretrain", "finetune")}, report)
    ctx.log.info("best of this run: %s (%s)", champion, reason)

    metrics: dict[str, Any] = {f"{name}_{key}": models[name][key] for name in MODELS for key in _PER_MODEL}
    metrics.update(
        champion=champion,
        unigram_val_loss=unigram.loss,
        unigram_bits_per_byte=unigram.bits_per_byte,
        bigram_val_loss=bigram.loss,
        bigram_bits_per_byte=bigram.bits_per_byte,
        completion_items=completion["items"],
        completion_chance=completion["chance"],
        eval_tokens=report["eval_tokens"],
        scored_tokens=report["scored_tokens"],
        scored_bytes=report["scored_bytes"],
        promotion=promotion["decision"],
        challenger=promotion["challenger"],
        registry_champion=promotion["champion_after"],
        previous_evaluation=(comparison["previous_evaluation"] or {}).get("version"),
    )
    return metrics


STAGE = EvaluateStage(
    name="evaluate",
    module=__name__,
    config=EvaluateConfig,
    build=build,
    inputs=("tokens", "tokenizer", "pretrain", "finetune", "quantize"),
    # The champion alias: which champion a run's best model is judged against (EvaluateStage.compared_with).
    identity=registry_snapshot,
    libraries=("torch", "numpy", "tokenizers", "tiktoken"),
    # Losses computed on a GPU differ from a CPU's in the last digits: another device, another version.
    environment=lambda cfg: {"device": resolve(cfg.device).type},
)
evaluate_task = stage_task(STAGE)
