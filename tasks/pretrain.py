"""Stage "pretrain": train a GPT from scratch on the tokens stage's train.bin, validating on val.bin.

Checkpoints go to the version's scratch folder (`ctx.work`), which survives a failed attempt: a Prefect
retry or a rerun of the same version resumes from the last checkpoint, with the same batches and the same
result as a run that was never interrupted. Output (contract): model.pt, model_config.json, metrics.jsonl,
and loss.png.

With nproc > 1 the training runs in that many processes (PyTorch DDP under torchrun, model/train_entry.py)
that this stage waits for, forwarding their log; the files published are the same.
"""

import shutil
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from model.checkpoint import CONFIG, WEIGHTS, save_model
from model.data import check_window_fits
from model.gpt import GPTConfig
from model.train import (
    CPU_THREADS,
    METRICS,
    TrainConfig,
    TrainResult,
    plot_losses,
    precision,
    resolve_device,
    schedule_problems,
)
from model.train_entry import PretrainSettings, launch, pretrain
from storage.errors import ConfigError, DataIntegrityError
from storage.tokens import open_tokens, read_meta
from tasks.stage import Stage, StageConfig, StageContext, stage_task

# Matmul kernels work in tiles of 64 (and more) along the vocabulary; a padded vocabulary fills every
# tile (nanoGPT: GPT-2's 50,257 -> 50,304, ~25% faster). Padded ids never occur, so they only learn to
# be unlikely.
VOCAB_MULTIPLE = 64


class TrainingFields(StageConfig):
    """The training-loop fields shared by pretrain and finetune. Defaults: nanoGPT's shakespeare_char
    CPU recipe, which reaches ~1.9 nats/char in minutes on a laptop CPU (ENV-NOTES reference run)."""

    # `compile`, like the device, changes how the run executes (kernels), not what it learns.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"device", "progress", "compile"})

    batch_size: int = Field(12, description="Sequences per micro-batch (nanoGPT CPU recipe: 12).", ge=1, le=4096)
    grad_accum_steps: int = Field(
        1, description="Micro-batches per optimizer step (effective batch = batch_size x this).", ge=1, le=1024
    )
    max_steps: int = Field(2000, description="Optimizer steps (nanoGPT CPU recipe: 2000).", ge=1, le=10_000_000)
    learning_rate: float = Field(1e-3, description="Peak learning rate (nanoGPT shakespeare_char: 1e-3).", gt=0, le=1)
    min_lr: float = Field(
        1e-4, description="Learning rate at the end of the cosine decay (nanoGPT: peak / 10).", ge=0, le=1
    )
    warmup_steps: int = Field(
        100, description="Linear warmup steps (nanoGPT shakespeare_char: 100).", ge=0, le=10_000_000
    )
    weight_decay: float = Field(0.1, description="AdamW weight decay on matrices (GPT-3: 0.1).", ge=0, le=10)
    beta1: float = Field(0.9, description="AdamW beta1 (GPT-3: 0.9).", ge=0, lt=1)
    beta2: float = Field(
        0.99, description="AdamW beta2 (nanoGPT shakespeare_char: 0.99, for few tokens per step).", ge=0, lt=1
    )
    grad_clip: float = Field(1.0, description="Clip the gradient norm to this (GPT-3: 1.0); 0 = off.", ge=0, le=1e6)
    eval_interval: int = Field(
        250, description="Evaluate train and val loss every this many steps.", ge=1, le=10_000_000
    )
    eval_steps: int = Field(20, description="Batches per split in each evaluation.", ge=1, le=100_000)
    checkpoint_interval: int = Field(
        250, description="Write a resumable checkpoint every this many steps.", ge=1, le=10_000_000
    )
    log_interval: int = Field(10, description="Write a metrics.jsonl line every this many steps.", ge=1, le=10_000_000)
    seed: int = Field(1337, description="Seed of the initial weights, batches and dropout.", ge=0, le=2**32 - 1)
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs; ~1x on this CPU).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: auto = cuda if available, else mps, else cpu."
    )
    progress: bool = Field(False, description="Show a progress bar (loss, tokens/s) on the terminal.")
    cpu_threads: int = Field(
        CPU_THREADS,
        description="Intra-op threads the training loop computes on (CPU work). Part of the version id: the "
        "thread count changes how sums are split, so the same setting gives the same weights on any machine, "
        "busy or not. 1 is fastest for small models on a shared machine; raise it on a large idle CPU.",
        ge=1,
        le=1024,
    )

    def problems(self) -> list[str]:
        """Cross-field problems; subclasses add theirs."""
        return schedule_problems(self.model_dump())

    @model_validator(mode="after")
    def _check_together(self) -> "TrainingFields":
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))
        return self

    def train_config(self) -> TrainConfig:
        names = TrainConfig.__dataclass_fields__
        return TrainConfig(**{name: getattr(self, name) for name in names})


class PretrainConfig(TrainingFields):
    """Model shape and training loop of the pretraining stage."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = TrainingFields.RUNTIME_FIELDS | {"nproc"}

    n_layer: int = Field(4, description="Transformer blocks (nanoGPT CPU recipe: 4).", ge=1, le=256)
    n_head: int = Field(4, description="Attention heads per block (nanoGPT CPU recipe: 4).", ge=1, le=256)
    n_embd: int = Field(128, description="Embedding width (nanoGPT CPU recipe: 128).", ge=1, le=32768)
    block_size: int = Field(64, description="Context length in tokens (nanoGPT CPU recipe: 64).", ge=2, le=131072)
    dropout: float = Field(0.0, description="Dropout rate (nanoGPT: 0 for pretraining, 0.1+ to fine-tune).", ge=0, lt=1)
    bias: bool = Field(False, description="Biases in Linear and LayerNorm (GPT-2: True; False trains a bit better).")
    nproc: int = Field(
        1,
        description=(
            "Training processes on this machine, one per GPU (PyTorch DDP under torchrun; gloo on CPUs). They "
            "share each step's grad_accum_steps micro-batches, so the result equals one process's up to the "
            "order of floating-point sums: not part of the version id."
        ),
        ge=1,
        le=1024,
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.grad_accum_steps % self.nproc:
            problems.append(
                f"grad_accum_steps ({self.grad_accum_steps}) must be divisible by nproc ({self.nproc}): "
                "each process runs an equal share of a step's micro-batches"
            )
        return problems


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_token_range(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    """Ids at or past vocab_size would index past the embedding (a device-side assert on CUDA)."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataIntegrityError(f"{name}: holds token id {int(tokens.max())}, meta.json says vocab_size {vocab_size}")


def result_metrics(result: TrainResult) -> dict[str, Any]:
    """The loop's figures as a stage records them in its manifest."""
    return {
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        "train_eval_loss": result.train_eval_loss,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "device": result.device,
        "cpu_threads": result.cpu_threads,
        "resumed_from_step": result.resumed_from,
    }


def build(ctx: StageContext, cfg: PretrainConfig) -> dict[str, Any]:
    folder = ctx.input_path("tokens")
    meta = read_meta(folder)
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise DataIntegrityError(f"{folder / 'meta.json'}: no valid vocab_size ({meta.get('vocab_size')!r})")
    for split in ("train", "val"):
        tokens = open_tokens(folder, split)
        check_token_range(tokens, meta["vocab_size"], str(folder / f"{split}.bin"))
        check_window_fits(tokens, cfg.block_size, str(folder / f"{split}.bin"))  # before processes start

    model_config = GPTConfig(
        vocab_size=padded_vocab_size(meta["vocab_size"]),
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        bias=cfg.bias,
    )
    settings = PretrainSettings(
        tokens=str(folder),
        model=model_config.to_dict(),
        train=asdict(cfg.train_config()),
        work=str(ctx.work),
        out=str(ctx.work / "final"),
    )

    def on_record(record: dict[str, Any]) -> None:
        ctx.progress(record["step"] / cfg.max_steps)

    check_processes_fit(cfg.nproc, resolve_device(cfg.device))
    if cfg.nproc == 1:
        model, result = pretrain(settings, log=ctx.log.info, on_record=on_record)
        params = model.num_params()
        save_model(ctx.out, model)
    else:
        result, params = launch(settings, cfg.nproc, log=ctx.log.info, warn=ctx.log.warning, on_record=on_record)
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(ctx.work / "final" / name, ctx.out / name)

    shutil.copyfile(ctx.work / METRICS, ctx.out / METRICS)
    plot_losses(result.records, ctx.out / "loss.png", title="pretrain loss")
    return {
        "params": params,
        "vocab_size": meta["vocab_size"],
        "padded_vocab_size": model_config.vocab_size,
        "processes": cfg.nproc,
        **result_metrics(result),
    }


def training_environment(cfg: TrainingFields) -> dict[str, Any]:
    """What of the machine shapes a trained model: the device kind, and the precision the loop computes in
    there (bf16 autocast on CUDA GPUs that support it, fp32 elsewhere). A CUDA bf16 model and a CPU fp32 one
    are different versions, though their settings are the same."""
    device = resolve_device(cfg.device)
    return {"device": device.type, "precision": precision(device)}


def check_processes_fit(nproc: int, device: torch.device) -> None:
    """On GPUs each process takes one device: more processes than devices would fail deep inside NCCL."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"pretrain.nproc={nproc} needs {nproc} CUDA devices, this machine has {torch.cuda.device_count()}: "
            "lower nproc (it must divide grad_accum_steps)"
        )


# Timings and their plot describe how the run went; the weights and the losses are what it made.
RUN_RECORDS = (METRICS, "loss.png")
STAGE = Stage(
    name="pretrain",
    module=__name__,
    config=PretrainConfig,
    build=build,
    inputs=("tokens",),
    libraries=("torch", "numpy"),
    environment=training_environment,
    records=RUN_RECORDS,
)
pretrain_task = stage_task(STAGE, retries=2, backoff_seconds=10)
