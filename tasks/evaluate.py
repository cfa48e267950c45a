"""Stage "evaluate": the pretrained, fine-tuned and quantized models scored side by side; a champion chosen.

Output (contract): `report.json` (`models` -> pretrain / finetune / quantized, each with val_loss,
perplexity, bits_per_byte, heldout_loss and its store version; the unigram baseline; the champion and why;
samples), `report.md` (the same as a table, and the samples), `val_loss.png` and `curves.png`.

What the numbers are:
- `val_loss`: mean next-token cross-entropy (nats per token) on the first `eval_tokens` validation tokens,
  every one of them but the first predicted (`scored_tokens` = eval_tokens - 1 targets);
  `perplexity` = exp(val_loss); `gain_over_unigram` = unigram_val_loss - val_loss, nats per token.
- `bits_per_byte`: the scored targets' summed loss / ln 2 / `scored_bytes`, the UTF-8 bytes those very
  targets decode to with the tokens' tokenizer. <|endoftext|> targets count 0 bytes (they are separators,
  as in meta.json's byte counts) while their loss, knowing where a document ends, still counts.
- the unigram baseline (`unigram_val_loss`, `unigram_perplexity`, `unigram_bits_per_byte`): the same
  targets and bytes, scored by add-one-smoothed training-token frequencies.
- `heldout_loss`: mean loss per response token of the held-out fine-tuning pairs; `heldout_pairs` is how
  many of the pairs read (`heldout_pairs_read`) have a response token within the context and were scored.

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
"""

import hashlib
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.checkpoint import load_config, load_model
from model.evaluate import (
    bits_per_byte,
    eval_loss,
    perplexity,
    scored_targets,
    target_bytes,
    token_byte_lengths,
    tokens_read,
    unigram_loss,
)
from model.finetune import IGNORE_INDEX, encode_pairs, read_pairs, response_loss
from model.gpt import GPT
from model.quantize import load_quantized
from model.tokenizer import FILENAME, Tokenizer
from model.train import CPU_THREADS, fixed_threads, read_metrics, resolve_device
from storage.errors import ConfigError, DataIntegrityError
from storage.registry import CHAMPION, PROMOTED, REJECTED, FrozenSet, Registry, model_id, split_model_id
from storage.store import Store, atomic_write_json, atomic_write_text, canonical_json, sha256_file
from storage.tokens import META, open_tokens, read_meta
from tasks.stage import Stage, StageConfig, StageContext, stage_task

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
VAL_LOSS_PLOT = "val_loss.png"
CURVES_PLOT = "curves.png"
HELDOUT = "heldout.jsonl"
METRICS = "metrics.jsonl"
MODELS = ("pretrain", "finetune", "quantized")  # report names; "quantized" comes from the quantize stage
_STAGE_OF = {"pretrain": "pretrain", "finetune": "finetune", "quantized": "quantize"}
_PER_MODEL = ("val_loss", "perplexity", "bits_per_byte", "heldout_loss")


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


def scored_counts(
    val: np.ndarray, tokenizer: Tokenizer, eval_tokens: int, *, val_file: Path, tokenizer_file: Path
) -> tuple[int, int]:
    """(targets, bytes) of what is scored: the targets among the first `eval_tokens` validation tokens and
    the UTF-8 bytes they decode to with the tokenizer (end-of-text: 0), which turn their loss into bits per
    byte. Counted on the scored tokens themselves, so they hold for any eval_tokens, whole split or not."""
    try:
        lengths = token_byte_lengths(tokenizer)
    except DataIntegrityError as exc:
        raise DataIntegrityError(f"{tokenizer_file}: {exc}") from exc
    try:
        n_targets, n_bytes = len(scored_targets(val, eval_tokens)), target_bytes(val, eval_tokens, lengths)
    except DataIntegrityError as exc:
        raise DataIntegrityError(f"{val_file}: {exc} ({tokenizer_file})") from exc
    if n_bytes == 0:
        raise DataIntegrityError(f"{val_file}: the {n_targets} scored tokens decode to 0 bytes (end-of-text only?)")
    return n_targets, n_bytes


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
) -> dict[str, Any]:
    """val_loss, perplexity, bits_per_byte (with `counts` = (scored targets, their bytes)) and heldout_loss."""
    block = model.config.block_size
    loss = eval_loss(model, val, block, cfg.batch_size, cfg.eval_tokens, device)
    heldout_loss = response_loss(model, tokenizer, heldout, block, cfg.batch_size, device) if heldout else None
    return {
        "val_loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_byte": bits_per_byte(loss, *counts),
        "heldout_loss": heldout_loss,
    }


def choose_champion(models: dict[str, dict[str, Any]], metric: str) -> tuple[str, str]:
    """(name, reason): the model with the lowest `metric`; a tie goes to the one listed first."""
    scored = {name: entry[metric] for name, entry in models.items() if entry.get(metric) is not None}
    if not scored:
        raise DataIntegrityError(f"no model has a {metric} to choose the champion by (no held-out pairs?)")
    best = min(scored, key=lambda name: scored[name])
    others = ", ".join(f"{name} {value:.4f}" for name, value in scored.items() if name != best)
    return best, f"lowest {metric}: {scored[best]:.4f} (vs {others})" if others else f"only model with a {metric}"


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


def load_champion(store: Store, model: str, device: torch.device) -> tuple[GPT, Tokenizer, str]:
    """The champion's model, its tokenizer (from its lineage) and that tokenizer file's sha256."""
    stage, version = split_model_id(model)
    if not store.has(stage, version):
        raise DataIntegrityError(
            f"the champion {model} is not in the store at {store.root} (gc keeps it: was it deleted by hand?)"
        )
    if (damage := store.damage(stage, version)) is not None:
        raise DataIntegrityError(f"the champion {model} is damaged: {damage}")
    tokenizer_version = store.lineage(stage, version).get("tokenizer")
    if tokenizer_version is None:
        raise DataIntegrityError(f"the champion {model} has no tokenizer in its lineage")
    tokenizer_file = store.path("tokenizer", tokenizer_version) / FILENAME
    folder = store.path(stage, version)
    weights = load_quantized(folder, device) if stage == _STAGE_OF["quantized"] else load_model(folder, device)
    return weights, Tokenizer.load(tokenizer_file), sha256_file(tokenizer_file)


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


def registry_snapshot(cfg: "EvaluateConfig", store: Store) -> dict[str, Any] | None:
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


def judge(
    ctx: StageContext,
    cfg: EvaluateConfig,
    name: str,
    models: dict[str, dict[str, Any]],
    load: Callable[[], GPT],
    tokenizer: Tokenizer,
    val: np.ndarray,
    heldout: list[dict[str, str]],
    device: torch.device,
) -> dict[str, Any]:
    """Judge the run's best model `name` (the challenger) against the registry's champion on the frozen set,
    commit the decision and record the models; returns the report's `promotion`."""
    registry = Registry(ctx.store.root)
    compared = STAGE.compared_with(cfg, ctx.inputs, ctx.identity)  # what the version id was made from
    stage = _STAGE_OF[name]
    challenger = model_id(stage, ctx.inputs[stage])
    if compared is None:
        source = {key: ctx.inputs[key] for key in ("tokens", "tokenizer", "finetune")}
        documents = frozen_documents(val, tokenizer, cfg.eval_tokens)
        frozen = FrozenSet.make(documents, heldout, {**source, "eval_tokens": tokens_read(val, cfg.eval_tokens)})
    else:
        frozen = registry.frozen(compared["frozen_set"])
    model = load()
    ctx.log.info("scoring the challenger %s on the frozen evaluation set %s", challenger, frozen.id)
    challenger_scores = score_frozen(model, tokenizer, frozen, cfg, device)
    del model
    champion_scores: dict[str, Any] | None = None
    same_tokenizer = True
    if compared is None:
        decision, reason = PROMOTED, f"the first champion; the frozen set is made from tokens/{ctx.inputs['tokens']}"
    elif compared["champion"] == challenger:
        decision, reason = PROMOTED, f"{challenger} is the champion already (decision {compared['seq']})"
        champion_scores = challenger_scores
    else:
        champion_model, champion_tokenizer, champion_sha = load_champion(ctx.store, compared["champion"], device)
        ctx.log.info("scoring the champion %s on the frozen evaluation set %s", compared["champion"], frozen.id)
        champion_scores = score_frozen(champion_model, champion_tokenizer, frozen, cfg, device)
        del champion_model
        same_tokenizer = champion_sha == sha256_file(ctx.input_path("tokenizer") / FILENAME)
        decision, reason = decide(challenger_scores, champion_scores, cfg.promotion, same_tokenizer)

    run_id = flow_run_id()
    records = [
        {
            **model_record(ctx.store, n, ctx.inputs[_STAGE_OF[n]], models[n], challenger_scores if n == name else None),
            "run_id": run_id,
            "evaluate_version": ctx.version,
            "evaluated_at": datetime.now(UTC).isoformat(),
        }
        for n in MODELS
    ]
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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


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


def render_markdown(report: dict[str, Any]) -> str:
    unscored = report["heldout_pairs_read"] - report["heldout_pairs"]
    lines = [
        "# Evaluation",
        "",
        f"Scored on the first {report['eval_tokens']:,} validation tokens of tokens/{report['tokens_version']} "
        f"({report['scored_tokens']:,} predicted targets, {report['scored_bytes']:,} bytes of text; end-of-text "
        f"counts 0 bytes) and {report['heldout_pairs']} held-out fine-tuning pairs"
        + (f" ({unscored} more have no response token within the context)." if unscored else "."),
        "",
        "| model | version | val loss | perplexity | bits/byte | held-out loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in report["models"].items():
        mark = " **(challenger)**" if name == report["champion"] else ""
        lines.append(
            f"| {name}{mark} | {entry['version']} | {_fmt(entry['val_loss'])} | {entry['perplexity']:.2f} | "
            f"{_fmt(entry['bits_per_byte'])} | {_fmt(entry['heldout_loss'])} |"
        )
    lines.append(
        f"| unigram baseline | - | {_fmt(report['unigram_val_loss'])} | "
        f"{report['unigram_perplexity']:.2f} | {_fmt(report['unigram_bits_per_byte'])} | - |"
    )
    lines += ["", f"Best of this run, the challenger: **{report['champion']}** ({report['champion_reason']}).", ""]
    lines += [*render_promotion(report["promotion"]), "", "## Samples", ""]
    sampling = report["sampling"]
    lines.append(
        f"temperature {sampling['temperature']}, top_k {sampling['top_k']}, "
        f"{sampling['max_new_tokens']} new tokens, seed {sampling['seed']}"
    )
    for sample in report["samples"]:
        lines += ["", f"**{sample['model']}**, prompt `{sample['prompt']}`:", "", "```text"]
        lines += [sample["prompt"] + sample["completion"], "```"]
    return "\n".join(lines) + "\n"


def plot_val_losses(path: Path, report: dict[str, Any]) -> None:
    names = list(report["models"])
    losses = [report["models"][name]["val_loss"] for name in names]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    bars = ax.bar(names, losses, color=["#4c72b0" if n != report["champion"] else "#dd8452" for n in names])
    ax.bar_label(bars, fmt="%.3f")
    ax.axhline(report["unigram_val_loss"], color="gray", linestyle="--", label="unigram baseline")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss per model (the best, the challenger, in orange)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(path: Path, curves: dict[str, list[dict[str, Any]]]) -> None:
    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, records) in zip(axes, curves.items(), strict=True):
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, label=key.replace("_", " "), markersize=3)
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
    tokenizer_file = ctx.input_path("tokenizer") / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_file)
    counts = scored_counts(
        val, tokenizer, cfg.eval_tokens, val_file=tokens_dir / "val.bin", tokenizer_file=tokenizer_file
    )
    heldout = read_heldout(ctx.input_path("finetune") / HELDOUT, cfg.heldout_pairs)
    # The three models share one config (finetune and quantize copy their input's), so one context length.
    scored_pairs = len(encode_pairs(tokenizer, heldout, load_config(ctx.input_path("pretrain")).block_size)[0])
    if cfg.champion_metric == "heldout_loss" and not heldout:
        raise DataIntegrityError(
            f"{ctx.input_path('finetune') / HELDOUT}: no held-out pairs, so champion_metric 'heldout_loss' "
            "cannot be scored"
        )

    unigram = unigram_loss(open_tokens(tokens_dir, "train"), val, meta["vocab_size"], cfg.eval_tokens)
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
        entry = score_model(model, tokenizer, val, heldout, counts, cfg, device)
        entry["version"] = ctx.inputs[_STAGE_OF[name]]
        entry["gain_over_unigram"] = unigram - entry["val_loss"]
        models[name] = entry
        samples += [{"model": name, **sample} for sample in sample_texts(model, tokenizer, cfg, device)]
        del model

    champion, reason = choose_champion(models, cfg.champion_metric)  # this run's best: the challenger
    if models[champion]["val_loss"] >= unigram:
        ctx.log.warning(
            "the best model %s (val loss %.4f) does not beat the unigram baseline (%.4f): it learned no context",
            champion,
            models[champion]["val_loss"],
            unigram,
        )
    promotion = judge(ctx, cfg, champion, models, loaders[champion], tokenizer, val, heldout, device)
    report = {
        "models": models,
        "unigram_val_loss": unigram,
        "unigram_perplexity": perplexity(unigram),
        "unigram_bits_per_byte": bits_per_byte(unigram, *counts),
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
        "promotion": promotion,
    }
    atomic_write_json(ctx.out / REPORT_JSON, report)
    atomic_write_text(ctx.out / REPORT_MD, render_markdown(report))
    plot_val_losses(ctx.out / VAL_LOSS_PLOT, report)
    plot_curves(ctx.out / CURVES_PLOT, {s: read_curve(ctx.input_path(s)) for s in ("pretrain", "finetune")})
    ctx.log.info("best of this run: %s (%s)", champion, reason)

    metrics: dict[str, Any] = {f"{name}_{key}": models[name][key] for name in MODELS for key in _PER_MODEL}
    metrics.update(
        champion=champion,
        unigram_val_loss=unigram,
        unigram_bits_per_byte=report["unigram_bits_per_byte"],
        eval_tokens=report["eval_tokens"],
        scored_tokens=report["scored_tokens"],
        scored_bytes=report["scored_bytes"],
        promotion=promotion["decision"],
        challenger=promotion["challenger"],
        registry_champion=promotion["champion_after"],
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
    libraries=("torch", "numpy", "tokenizers"),
    # Losses computed on a GPU differ from a CPU's in the last digits: another device, another version.
    environment=lambda cfg: {"device": resolve(cfg.device).type},
)
evaluate_task = stage_task(STAGE)
