"""The training loop: AdamW or Muon (model/muon.py), warmup + cosine schedule, gradient accumulation and
clipping, periodic evaluation, atomic checkpoints and exact resume. Pure PyTorch; the caller passes a batch
source and a log callback.

TrainConfig is the one definition of the training settings: each field's default, bounds and description
are declared here once, and the stage configs (tasks/pretrain.py, tasks/finetune.py) take them from it.

Exact resume rests on three things: batches are pure functions of (seed, step, micro-step) (model/data.py),
dropout is reseeded from (seed, step, micro-step) before every micro-batch, and a checkpoint holds the
model, the optimizer state and every metrics record so far. A run killed after a checkpoint and resumed ends
with the same weights, bit for bit, and the same metrics.jsonl as a run that was never interrupted.

Data parallel (several processes under torchrun, model/distributed.py): the model is wrapped in DDP and
the grad_accum_steps micro-batches of each optimizer step are dealt out between the processes, process r
taking micro-steps r, r + W, r + 2W, ... of W processes. Together they draw exactly the batches and dropout
masks of one process, and the gradient DDP averages over processes is the one process's gradient, so the
result does not depend on the number of processes (up to the order of floating-point sums). Evaluation
batches are dealt out the same way and the token-weighted sums added up. Rank 0 alone writes checkpoints and
metrics.jsonl, logs and shows progress; every process resumes from the same checkpoint.

The same weights on any machine: the loop runs on `cpu_threads` intra-op threads (a setting, part of the
version id) whatever the caller, the environment (OMP_NUM_THREADS, a CPU affinity mask) or the core count
would give, because the thread count decides how the kernels split their sums.
"""

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import distributed, flops, muon
from model.checkpoint import atomic_torch_save
from model.data import BatchSource
from model.gpt import GPT
from storage.errors import ConfigError, DataIntegrityError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# The fields of a metrics record that time the run rather than describe what it learned: a resumed run
# replays every other field exactly.
TIMING_FIELDS = ("tokens_per_s", "mfu", "time_s")
CHECKPOINT_FORMAT = 1
# Intra-op threads of the training loop by default. The thread count decides how MKL's matmuls and ATen's
# parallel reductions split their sums, so it changes the weights' last bits (the tiny preset's model, 1
# against 2 threads: 3.6e-7 apart after 100 steps): it is a setting that the version id covers, never taken
# from the machine. One thread: on two cores shared with other work the tiny preset trained ~3x faster than
# on two contending threads, and each process of a CPU launch (nproc) takes one core.
CPU_THREADS = 1

Device = Literal["auto", "cpu", "cuda", "mps"]
OptimizerName = Literal["adamw", "muon"]

_logger = logging.getLogger(__name__)


# Strict, as the stage configs: `max_steps: true` is a mistake, not 1.
@pydantic_dataclass(config=ConfigDict(extra="forbid", strict=True))
class TrainConfig:
    """The loop's parameters. Defaults follow nanoGPT's character-level CPU recipe (shakespeare_char), which
    reaches ~1.9 nats/char in minutes on a laptop CPU (ENV-NOTES reference run)."""

    batch_size: int = Field(
        12, description="Sequences per micro-batch (nanoGPT CPU recipe: 12); fine-tuning: pairs.", ge=1, le=4096
    )
    grad_accum_steps: int = Field(
        1, description="Micro-batches per optimizer step (effective batch = batch_size x this).", ge=1, le=1024
    )
    max_steps: int = Field(2000, description="Optimizer steps (nanoGPT CPU recipe: 2000).", ge=1, le=10_000_000)
    learning_rate: float = Field(
        1e-3,
        description="Peak learning rate of AdamW (nanoGPT shakespeare_char: 1e-3); with Muon, AdamW's rate for "
        "the embeddings, the head and the gains.",
        gt=0,
        le=1,
    )
    min_lr: float = Field(
        1e-4,
        description="Learning rate at the end of the cosine decay (nanoGPT: peak / 10, as Chinchilla). Muon's "
        "decays to the same fraction of its own peak.",
        ge=0,
        le=1,
    )
    warmup_steps: int = Field(
        100, description="Linear warmup steps (nanoGPT shakespeare_char: 100).", ge=0, le=10_000_000
    )
    weight_decay: float = Field(0.1, description="AdamW weight decay on matrices (GPT-3: 0.1).", ge=0, le=10)
    beta1: float = Field(0.9, description="AdamW beta1 (GPT-3: 0.9).", ge=0, lt=1)
    beta2: float = Field(
        0.99,
        description="AdamW beta2 (nanoGPT shakespeare_char: 0.99, a little above GPT-3's 0.95 for few tokens "
        "per step).",
        ge=0,
        lt=1,
    )
    grad_clip: float = Field(1.0, description="Clip the gradient norm to this (GPT-3: 1.0); 0 = off.", ge=0, le=1e6)
    optimizer: OptimizerName = Field(
        "adamw",
        description="adamw: AdamW on every parameter (GPT-2, nanoGPT). muon: Muon (Jordan et al. 2024) on the "
        "matrices inside the blocks and AdamW on the embeddings, the head and the gains (modded-nanogpt's "
        "split).",
    )
    muon_lr: float = Field(
        0.01,
        description="Muon's peak learning rate, in units of spectral norm per update, on the same warmup and "
        "cosine decay. Measured on the tiny preset's model over 200 steps: 0.005-0.01 best, 0.02 and 0.05 "
        "worse (the Muon package's default: 0.02; modded-nanogpt's speedrun, at ~0.5M tokens per step: "
        "0.05). Only with optimizer muon.",
        gt=0,
        le=10,
    )
    muon_momentum: float = Field(
        0.95, description="Muon's Nesterov momentum (Jordan: 0.95 is usually fine).", ge=0, lt=1
    )
    muon_weight_decay: float = Field(
        0.0,
        description="Muon's decoupled weight decay, times its learning rate (the Muon package's default: 0).",
        ge=0,
        le=10,
    )
    muon_ns_steps: int = Field(
        5, description="Newton-Schulz iterations that orthogonalise Muon's update (Jordan: 5).", ge=1, le=20
    )
    eval_interval: int = Field(
        250,
        description="Evaluate train and validation loss (fine-tuning: held-out) every this many steps.",
        ge=1,
        le=10_000_000,
    )
    eval_steps: int = Field(
        20,
        description="Batches per split in each evaluation (fine-tuning: held-out pairs beyond them are not scored).",
        ge=1,
        le=100_000,
    )
    checkpoint_interval: int = Field(
        250, description="Write a resumable checkpoint every this many steps.", ge=1, le=10_000_000
    )
    log_interval: int = Field(10, description="Write a metrics.jsonl line every this many steps.", ge=1, le=10_000_000)
    seed: int = Field(1337, description="Seed of the initial weights, batches and dropout.", ge=0, le=2**32 - 1)
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs; ~1x on this CPU).")
    device: Device = Field("auto", description="Where to train: auto = cuda if available, else mps, else cpu.")
    progress: bool = Field(False, description="Show a progress bar (loss, tokens/s) on the terminal.")
    cpu_threads: int = Field(
        CPU_THREADS,
        description="Intra-op threads the training loop computes on (CPU work). Part of the version id: the "
        "thread count changes how sums are split, so the same setting gives the same weights on any machine, "
        "busy or not. 1 is fastest for small models on a shared machine; raise it on a large idle CPU.",
        ge=1,
        le=1024,
    )

    # How a run executes, not what it computes: a checkpoint stays resumable when only these change.
    # `compile`, like the device, changes the kernels, not what the model learns.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"compile", "device", "progress"})

    @model_validator(mode="after")
    def _check_together(self) -> "TrainConfig":
        problems = schedule_problems(vars(self))
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        return self

    def identity(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUNTIME_FIELDS}


def schedule_problems(values: dict[str, Any]) -> list[str]:
    """The checks between fields of the learning-rate schedule (each field's own range is checked apart)."""
    problems = []
    if 1 <= values["max_steps"] <= values["warmup_steps"]:
        problems.append(f"warmup_steps ({values['warmup_steps']}) must be < max_steps ({values['max_steps']})")
    if values["min_lr"] > values["learning_rate"] > 0:
        problems.append(f"min_lr ({values['min_lr']}) must be <= learning_rate ({values['learning_rate']})")
    return problems


def uneven_split_problems(grad_accum_steps: int, processes: int, name: str = "the number of processes") -> list[str]:
    """Every process must run the same number of a step's micro-batches, so that DDP's mean over processes
    weighs every micro-batch alike. `name` says what sets the process count, for the message."""
    if grad_accum_steps % processes:
        return [
            f"grad_accum_steps ({grad_accum_steps}) must be divisible by {name} ({processes}): "
            "each process runs an equal share of a step's micro-batches"
        ]
    return []


# -- pieces of the loop --------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA if available, else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def precision(device: torch.device) -> str:
    """What the loop computes in on `device`: "bf16" (autocast) on CUDA GPUs that support it, else "fp32"
    (bf16 matmul on CPUs without native support runs ~100x slower than fp32, see ENV-NOTES)."""
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "fp32"


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast where `precision` says bf16; nothing elsewhere."""
    if precision(device) == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr at max_steps (nanoGPT's get_lr). Every
    parameter group follows it, at its `lr_scale` (Muon's: muon_lr / learning_rate; AdamW's: 1)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.max_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def step_seed(seed: int, step: int, micro: int) -> int:
    """The dropout seed of one micro-batch: a pure function of (seed, step, micro-step), so a resumed run
    replays it, and whichever process draws a micro-batch draws the same dropout masks."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def local_micro_steps(grad_accum_steps: int, rank: int, world: int) -> range:
    """The micro-steps of each optimizer step that process `rank` of `world` runs: rank, rank + world, ...

    Every process takes the same number (uneven_split_problems).
    """
    problems = uneven_split_problems(grad_accum_steps, world)
    if problems:
        raise ValueError(problems[0])
    return range(rank, grad_accum_steps, world)


def config_hash(model: GPT, cfg: TrainConfig, identity: Any = None) -> str:
    """What a checkpoint must match to be resumed: the model config, the training config, the data."""
    payload = {"model": model.config.to_dict(), "train": cfg.identity(), "identity": identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """cfg.optimizer's optimizer over the model's parameters. The learning rates are the schedule's, set by
    train_step before every step."""
    if cfg.optimizer == "muon":
        groups = muon.param_groups(
            model,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            muon_lr=cfg.muon_lr,
            muon_weight_decay=cfg.muon_weight_decay,
        )
        return muon.Muon(
            groups,
            lr=cfg.learning_rate,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
            betas=(cfg.beta1, cfg.beta2),
        )
    return torch.optim.AdamW(
        model.optimizer_groups(cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",  # one kernel for the whole update on GPUs
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    step: int,
    cfg: TrainConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One optimizer step over this process's share of the grad_accum_steps micro-batches: (mean loss of its
    micro-batches, gradient norm, tokens it saw). With world > 1, `model` is DDP-wrapped.

    Losses stay on the device: reading them forces a GPU sync, which only logging steps pay for.
    """
    micros = local_micro_steps(cfg.grad_accum_steps, rank, world)
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    total = torch.zeros((), device=device)
    tokens = 0
    for micro in micros:
        torch.manual_seed(step_seed(cfg.seed, step, micro))
        x, y = source.train_batch(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces gradients in backward; only the last local micro-batch needs it.
        last = micro == micros[-1]
        with model.no_sync() if world > 1 and not last else nullcontext():
            with autocast(device):
                _, loss = model(x, y)
            # Scaled so that the accumulated gradient is the mean over this process's micro-batches, and
            # DDP's mean over processes then the mean over all of them, as one big batch's.
            loss = loss / len(micros)
            loss.backward()
        total += loss.detach()
        tokens += x.numel()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm, tokens


@contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """Run the block on `count` intra-op threads, then give the caller back its own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    source: BatchSource,
    eval_steps: int,
    device: torch.device,
    ignore_index: int = -100,
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """Mean loss per target token on each split's fixed evaluation batches, with dropout off.

    With world > 1, every process must call it: process `rank` evaluates batches rank, rank + world, ...
    and the sums are added up over processes, so each gets the mean over all the batches.
    """
    was_training = model.training
    model.eval()
    losses = {}
    for split in source.eval_splits():
        total, count = 0.0, 0
        for index, (x, y) in enumerate(source.eval_batches(split, eval_steps)):
            if index % world != rank:
                continue
            n = int((y != ignore_index).sum())
            if n == 0:
                continue
            with autocast(device):
                _, loss = model(x.to(device), y.to(device), ignore_index=ignore_index)
            total += float(loss) * n  # token-weighted, so the batching does not change the mean
            count += n
        total, count = distributed.all_reduce_sum([total, count])
        if count:
            losses[split] = total / count
    model.train(was_training)
    return losses


# -- metrics files and plot ----------------------------------------------------------------------------


def write_metrics(records: list[dict[str, Any]], path: Path) -> None:
    """Rewrite metrics.jsonl atomically with `records`, one JSON object per line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataIntegrityError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
    return records


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "loss") -> None:
    """A small PNG of train and val loss against step (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = [("train_loss", "train (step)", 0.35), ("train_eval_loss", "train (eval)", 1.0), ("val_loss", "val", 1.0)]
    for key, label, alpha in series:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, alpha=alpha, marker="o" if key != "train_loss" else None, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# -- the loop ------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    seconds: float  # training wall time over every attempt, evaluation included
    step_seconds: float  # of which in the training steps themselves (no evaluation, checkpoint or log)
    tokens_per_s: float
    train_loss: float | None  # the last logged step's loss
    train_eval_loss: float | None  # the last evaluation on training batches
    val_loss: float | None  # the last evaluation on validation batches
    best_val_loss: float | None
    device: str
    cpu_threads: int  # the intra-op threads it trained on (cfg.cpu_threads)
    resumed_from: int  # the step a checkpoint let this call start at (0: from scratch)
    records: list[dict[str, Any]] = field(default_factory=list)


def _load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same here
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataIntegrityError(f"{path}: unreadable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataIntegrityError(f"{path}: not a gptflow training checkpoint (format {CHECKPOINT_FORMAT})")
    if state.get("config_hash") != expected_hash:
        raise ConfigError(
            f"{path}: checkpoint of a different model/training config (hash {state.get('config_hash')}, "
            f"this run {expected_hash}); delete it to start over"
        )
    return state


def train(
    model: GPT,
    source: BatchSource,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    *,
    metrics_path: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    identity: Any = None,
    ignore_index: int = -100,
) -> TrainResult:
    """Train `model` in place on `source` until cfg.max_steps, resuming from checkpoint_dir when it holds a
    checkpoint of the same model, config and `identity` (a description of the data); another config's
    checkpoint is refused. metrics.jsonl (default: in checkpoint_dir) ends with one record per logged step;
    `on_record` sees each record as it is logged (progress displays).

    Inside a torchrun launch (distributed.process_group), every process calls this alike: see the module's
    docstring. Only rank 0 writes files and calls `log` and `on_record`. The loop runs on `cfg.cpu_threads`
    intra-op threads; the caller's setting is back when it returns.
    """
    with fixed_threads(cfg.cpu_threads):
        return _train(model, source, cfg, Path(checkpoint_dir), metrics_path, log, on_record, identity, ignore_index)


def _train(
    model: GPT,
    source: BatchSource,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    metrics_path: Path | None,
    log: Callable[[str], None] | None,
    on_record: Callable[[dict[str, Any]], None] | None,
    identity: Any,
    ignore_index: int,
) -> TrainResult:
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    local_micro_steps(cfg.grad_accum_steps, rank, world)  # refuse an uneven split before any work
    log = (log or _logger.info) if main else _quiet
    on_record = on_record if main else None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = checkpoint_dir / CHECKPOINT
    metrics_path = Path(metrics_path) if metrics_path is not None else checkpoint_dir / METRICS
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if world > 1:  # each process on the GPU process_group gave it, whatever index cfg.device names
            device = torch.device("cuda", torch.cuda.current_device())
        # TF32 matmuls: ~fp32 accuracy at several times the speed on Ampere and later GPUs.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    expected_hash = config_hash(model, cfg, identity)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    step, tokens_seen, seconds_before, step_seconds, records = 0, 0, 0.0, 0.0, []
    if checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path, expected_hash)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, seconds_before = state["step"], state["tokens_seen"], state["seconds"]
        step_seconds = state.get("step_seconds", 0.0)
        records = list(state["records"])
        log(f"resuming from {checkpoint_path} at step {step}/{cfg.max_steps}")
    resumed_from = step
    if main:
        # Lines a killed attempt logged after its last checkpoint go: the steps are replayed identically.
        write_metrics(records, metrics_path)
    step_model = model
    if world > 1:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)

    started = time.monotonic()

    def save_checkpoint() -> None:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config_hash": expected_hash,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "records": records,
                "tokens_seen": tokens_seen,
                "seconds": seconds_before + time.monotonic() - started,
                "step_seconds": step_seconds,
            },
            checkpoint_path,
        )

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.monotonic(), 0
    # This process's tokens since the last sum over processes: summed only when a step is logged or
    # checkpointed, so that other steps need no collective (and no device sync).
    unsummed_tokens = 0
    with open(metrics_path, "a", encoding="utf-8") if main else nullcontext() as metrics_file:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            loss, norm, tokens = train_step(step_model, optimizer, source, step, cfg, device, rank=rank, world=world)
            step += 1  # steps are counted as completed optimizer steps: 1 .. max_steps
            unsummed_tokens += tokens
            bar.update(1)
            last = step == cfg.max_steps
            evaluate_now = step % cfg.eval_interval == 0 or last
            log_now = step % cfg.log_interval == 0 or evaluate_now
            checkpoint_now = step % cfg.checkpoint_interval == 0 or last
            if log_now or checkpoint_now:
                (summed,) = distributed.all_reduce_sum([unsummed_tokens])
                tokens_seen += int(summed)
                window_tokens += int(summed)
                unsummed_tokens = 0
            if log_now:
                # Every process's mean loss over its micro-batches; syncs the device, so the timing is honest.
                train_loss = distributed.all_reduce_mean(loss)
                if not math.isfinite(train_loss):
                    raise ConfigError(f"training diverged: loss is {train_loss} at step {step} (lower learning_rate)")
                elapsed = time.monotonic() - window_start
                step_seconds += elapsed
                record: dict[str, Any] = {
                    "step": step,
                    "train_loss": train_loss,
                    "lr": lr,
                    "tokens_per_s": window_tokens / elapsed if elapsed > 0 else 0.0,
                }
                # Per device: every process computes its share of the tokens on its own device.
                utilisation = flops.mfu(model.config, record["tokens_per_s"] / world, device)
                if utilisation is not None:
                    record["mfu"] = utilisation
                if norm is not None:
                    record["grad_norm"] = float(norm)  # the same on every process: gradients are all-reduced
                if evaluate_now:
                    losses = evaluate(model, source, cfg.eval_steps, device, ignore_index, rank=rank, world=world)
                    if "train" in losses:
                        record["train_eval_loss"] = losses["train"]
                    if "val" in losses:
                        record["val_loss"] = losses["val"]
                record["time_s"] = seconds_before + time.monotonic() - started  # wall time, every attempt
                records.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
                    metrics_file.flush()
                if on_record is not None:
                    on_record(record)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                line = f"step {step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {lr:.2e}"
                line += f" | {record['tokens_per_s']:.0f} tok/s"
                if "mfu" in record:
                    line += f" | mfu {record['mfu']:.1%}"
                if "val_loss" in record or "train_eval_loss" in record:
                    line += f" | eval train {record.get('train_eval_loss', float('nan')):.4f}"
                    line += f" val {record.get('val_loss', float('nan')):.4f}"
                if evaluate_now or not cfg.progress:  # with a progress bar, text lines at evaluations suffice
                    log(line)
            if checkpoint_now and main:
                save_checkpoint()
            if log_now:
                window_start, window_tokens = time.monotonic(), 0
    bar.close()

    seconds = seconds_before + time.monotonic() - started
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    return TrainResult(
        steps=step,
        tokens_seen=tokens_seen,
        seconds=seconds,
        step_seconds=step_seconds,
        tokens_per_s=tokens_seen / seconds if seconds > 0 else 0.0,
        train_loss=next((r["train_loss"] for r in reversed(records)), None),
        train_eval_loss=next((r["train_eval_loss"] for r in reversed(records) if "train_eval_loss" in r), None),
        val_loss=val_losses[-1] if val_losses else None,
        best_val_loss=min(val_losses) if val_losses else None,
        device=str(device),
        cpu_threads=torch.get_num_threads(),
        resumed_from=resumed_from,
        records=records,
    )


def _quiet(line: str) -> None:
    """The log of processes other than rank 0: one copy of each line is enough."""
