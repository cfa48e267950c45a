"""Stage "finetune": supervised fine-tuning of the pretrained model on prompt/response pairs.

The pairs come from a JSONL file of {"prompt", "response"} objects, or from the embedded default set. For
a file, a seeded hash of each pair's content decides whether it is held out (heldout_fraction), so held-out
pairs are never trained on. The default pairs carry their side (`split`): those of the modules left out of
the default pretraining corpus are held out, so their answers are neither pretrained nor fine-tuned on.
Held-out pairs are published as heldout.jsonl for the evaluate stage. The version follows the data's
content (the `identity` hook), not its path. Output: model.pt, model_config.json, metrics.jsonl
(val_loss = held-out response loss), heldout.jsonl, loss.png.
"""

import hashlib
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from model.checkpoint import load_model, save_model
from model.finetune import finetune, read_pairs, response_loss, split_pairs
from model.tokenizer import FILENAME, Tokenizer
from model.train import METRICS, plot_losses, resolve_device
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store, canonical_json
from tasks.pretrain import RUN_RECORDS, TrainingConfig, result_metrics, training_environment, training_fields
from tasks.sample_data import default_finetune_pairs
from tasks.stage import Stage, StageContext, stage_task

HELDOUT = "heldout.jsonl"


class FinetuneConfig(
    training_fields(
        max_steps=300,
        learning_rate=3e-4,
        min_lr=3e-5,  # peak / 10, as pretraining's
        warmup_steps=20,
        eval_interval=50,
        eval_steps=50,
        checkpoint_interval=50,
        batch_size=8,
    )
):
    """Fine-tuning data, held-out split and training loop. Loop defaults are the pretraining ones scaled
    down: fewer steps at a lower peak rate, as fine-tuning a pretrained model calls for (nanoGPT's
    finetune_shakespeare: a constant 3e-5 on GPT-2; a tiny model from scratch tolerates more)."""

    # The path only says where the data is; the version follows its content through the identity hook.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = TrainingConfig.RUNTIME_FIELDS | {"data"}

    data: str | None = Field(
        None, description='JSONL file of {"prompt": ..., "response": ...} objects; unset = the embedded default set.'
    )
    heldout_fraction: float = Field(
        0.1,
        description="Share of a data file's pairs held out for evaluation (chosen by a seeded hash of each pair). "
        "The default set's held-out pairs are fixed: those of the modules its corpus leaves out.",
        ge=0,
        le=0.5,
    )


@cache
def _default_pairs() -> tuple[dict[str, str], ...]:
    # Computed in a fresh interpreter: worth doing once per process (identity and build both need it).
    return tuple(default_finetune_pairs())


def finetune_pairs(cfg: FinetuneConfig) -> list[dict[str, str]]:
    return read_pairs(Path(cfg.data)) if cfg.data else list(_default_pairs())


def data_identity(cfg: FinetuneConfig, store: Store | None = None) -> dict[str, str]:
    """The sha256 of the data file's bytes (or of the default pairs' canonical JSON): the version changes
    exactly when the data does."""
    if cfg.data:
        path = Path(cfg.data)
        if not path.is_file():
            raise ConfigError(f"fine-tuning data {path} does not exist")
        return {"data_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"default_pairs_sha256": hashlib.sha256(canonical_json(list(_default_pairs())).encode()).hexdigest()}


def check_tokenizer(ctx: StageContext, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer must be the one the pretrained model's tokens were made with."""
    tokenizer_path = ctx.input_path("tokenizer") / FILENAME
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"{tokenizer_path}: {tokenizer.vocab_size} ids, more than the pretrained model's vocabulary ({vocab_size})"
        )
    ctx.require_common_ancestor("pretrain", "tokenizer")


def write_pairs(pairs: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)


def build(ctx: StageContext, cfg: FinetuneConfig) -> dict[str, Any]:
    pairs = finetune_pairs(cfg)
    train_pairs, heldout = split_pairs(pairs, cfg.heldout_fraction, cfg.seed)
    if not train_pairs:
        raise DataIntegrityError(f"all {len(pairs)} pairs were held out: none is left to train on")
    tokenizer = Tokenizer.load(ctx.input_path("tokenizer") / FILENAME)
    model = load_model(ctx.input_path("pretrain"))
    check_tokenizer(ctx, tokenizer, model.config.vocab_size)
    train_cfg = cfg.train_config()
    device = resolve_device(train_cfg.device)
    model.to(device)
    ctx.log.info("fine-tuning on %d pairs, %d held out", len(train_pairs), len(heldout))

    def heldout_loss() -> float | None:
        if not heldout:
            return None
        return response_loss(model, tokenizer, heldout, model.config.block_size, cfg.batch_size, device)

    before = heldout_loss()
    result, counts = finetune(
        model,
        tokenizer,
        train_pairs,
        heldout,
        train_cfg,
        ctx.work,
        metrics_path=ctx.work / METRICS,
        log=ctx.log.info,
        on_record=lambda record: ctx.progress(record["step"] / cfg.max_steps),
    )
    after = heldout_loss()
    if counts["dropped_truncated"]:
        ctx.log.warning(
            "%d pairs left out: their prompt fills the whole context of %d tokens",
            counts["dropped_truncated"],
            model.config.block_size,
        )

    save_model(ctx.out, model)
    shutil.copyfile(ctx.work / METRICS, ctx.out / METRICS)
    write_pairs(heldout, ctx.out / HELDOUT)
    plot_losses(result.records, ctx.out / "loss.png", title="fine-tuning loss (val = held-out responses)")
    return {
        "pairs": len(pairs),
        "pairs_train": len(train_pairs),
        "pairs_heldout": len(heldout),
        "pairs_dropped_truncated": counts["dropped_truncated"],
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        **result_metrics(result),
    }


STAGE = Stage(
    name="finetune",
    module=__name__,
    config=FinetuneConfig,
    build=build,
    inputs=("pretrain", "tokenizer"),
    identity=data_identity,
    libraries=("torch", "numpy"),
    environment=training_environment,
    records=RUN_RECORDS,
)
finetune_task = stage_task(STAGE, retries=2, backoff_seconds=10)
