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
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import Field, model_validator

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
from model.finetune import encode_pairs, read_pairs, response_loss
from model.gpt import GPT
from model.quantize import load_quantized
from model.tokenizer import Tokenizer
from model.train import CPU_THREADS, fixed_threads, read_metrics, resolve_device
from storage.errors import ConfigError, DataIntegrityError
from storage.store import atomic_write_json, atomic_write_text
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


# -- writing ----------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


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
        mark = " **(champion)**" if name == report["champion"] else ""
        lines.append(
            f"| {name}{mark} | {entry['version']} | {_fmt(entry['val_loss'])} | {entry['perplexity']:.2f} | "
            f"{_fmt(entry['bits_per_byte'])} | {_fmt(entry['heldout_loss'])} |"
        )
    lines.append(
        f"| unigram baseline | - | {_fmt(report['unigram_val_loss'])} | "
        f"{report['unigram_perplexity']:.2f} | {_fmt(report['unigram_bits_per_byte'])} | - |"
    )
    lines += ["", f"Champion: **{report['champion']}** ({report['champion_reason']}).", "", "## Samples", ""]
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
    ax.set_title("Validation loss per model (champion in orange)")
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

    champion, reason = choose_champion(models, cfg.champion_metric)
    if models[champion]["val_loss"] >= unigram:
        ctx.log.warning(
            "the champion %s (val loss %.4f) does not beat the unigram baseline (%.4f): it learned no context",
            champion,
            models[champion]["val_loss"],
            unigram,
        )
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
    }
    atomic_write_json(ctx.out / REPORT_JSON, report)
    atomic_write_text(ctx.out / REPORT_MD, render_markdown(report))
    plot_val_losses(ctx.out / VAL_LOSS_PLOT, report)
    plot_curves(ctx.out / CURVES_PLOT, {s: read_curve(ctx.input_path(s)) for s in ("pretrain", "finetune")})
    ctx.log.info("champion: %s (%s)", champion, reason)

    metrics: dict[str, Any] = {f"{name}_{key}": models[name][key] for name in MODELS for key in _PER_MODEL}
    metrics.update(
        champion=champion,
        unigram_val_loss=unigram,
        unigram_bits_per_byte=report["unigram_bits_per_byte"],
        eval_tokens=report["eval_tokens"],
        scored_tokens=report["scored_tokens"],
        scored_bytes=report["scored_bytes"],
    )
    return metrics


STAGE = Stage(
    name="evaluate",
    module=__name__,
    config=EvaluateConfig,
    build=build,
    inputs=("tokens", "tokenizer", "pretrain", "finetune", "quantize"),
    libraries=("torch", "numpy", "tokenizers"),
    # Losses computed on a GPU differ from a CPU's in the last digits: another device, another version.
    environment=lambda cfg: {"device": resolve(cfg.device).type},
)
evaluate_task = stage_task(STAGE)
