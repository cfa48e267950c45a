"""Stage "pretrain": train a GPT from scratch on the tokens stage's train.bin, validating on val.bin.

Checkpoints go to the version's scratch folder (`ctx.work`), which survives a failed attempt: a Prefect
retry or a rerun of the same version resumes from the last checkpoint, with the same batches and the same
result as a run that was never interrupted. Output (contract): model.pt, model_config.json, metrics.jsonl,
and loss.png.

With nproc > 1 the training runs in that many processes (PyTorch DDP under torchrun, model/train_entry.py)
that this stage waits for, forwarding their log; the files published are the same. With nnodes > 1 this
machine leads a launch over several (model/train_entry.py says what the others run).

The training loop's settings are model/train.py's TrainConfig fields, declared there once; this module
makes them stage-config fields (`training_fields`), for this stage and for finetune.
"""

import dataclasses
import shutil
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, create_model, model_validator
from pydantic.fields import FieldInfo

from model import distributed
from model.checkpoint import CONFIG, WEIGHTS, save_model
from model.data import check_window_fits
from model.gpt import MLP_KINDS, GPTConfig, gpt_config_problems
from model.train import (
    METRICS,
    OptimizerName,
    TrainConfig,
    TrainResult,
    plot_losses,
    precision,
    resolve_device,
    schedule_problems,
    uneven_split_problems,
)
from model.train_entry import PretrainSettings, launch, pretrain
from storage.errors import ConfigError, DataIntegrityError
from storage.tokens import open_tokens, read_meta
from tasks.stage import Stage, StageConfig, StageContext, stage_task

# Matmul kernels work in tiles of 64 (and more) along the vocabulary; a padded vocabulary fills every
# tile (nanoGPT: GPT-2's 50,257 -> 50,304, ~25% faster). Padded ids never occur, so they only learn to
# be unlikely.
VOCAB_MULTIPLE = 64


class TrainingConfig(StageConfig):
    """What the pretrain and finetune configs share: the training loop's fields (TrainConfig's, given by
    `training_fields`) and their checks."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = TrainConfig.RUNTIME_FIELDS

    def problems(self) -> list[str]:
        """Cross-field problems; subclasses add theirs."""
        return schedule_problems(self.model_dump())

    @model_validator(mode="after")
    def _check_together(self) -> "TrainingConfig":
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))
        return self

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


def with_default(field: FieldInfo, default: Any) -> FieldInfo:
    """`field` with another default; its type, bounds and description stay as declared. The new default is
    checked against the bounds like a value given."""
    return FieldInfo.merge_field_infos(field, default=default, validate_default=True)


def training_fields(**defaults: Any) -> type[TrainingConfig]:
    """A TrainingConfig holding TrainConfig's fields as declared there, with `defaults` replacing some of
    their defaults: a stage that trains with other defaults names only those."""
    declared = TrainConfig.__pydantic_fields__
    unknown = sorted(set(defaults) - set(declared))
    if unknown:
        raise TypeError(f"training_fields: {', '.join(unknown)} are not TrainConfig fields")
    fields = {
        name: (info.annotation, with_default(info, defaults[name]) if name in defaults else info)
        for name, info in declared.items()
    }
    return create_model("TrainingFields", __base__=TrainingConfig, __module__=__name__, **fields)


TrainingFields = training_fields()

# A recipe is a whole set of choices at once; each stays its own field (None = the recipe's value).
Recipe = Literal["gpt2", "modern"]
MlpKind = Literal[MLP_KINDS]  # model/gpt.py's choices: ("gelu", "relu2")
RECIPES: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019) as nanoGPT trains it: learned positions, GELU, tied embeddings, AdamW.
    "gpt2": {"rope": False, "qk_norm": False, "mlp": "gelu", "tie_embeddings": True, "optimizer": "adamw"},
    # modded-nanogpt's (Jordan et al. 2024): rotary positions, QK-norm, ReLU², an untied head, Muon.
    "modern": {"rope": True, "qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "optimizer": "muon"},
}


def _recipe_values(name: str) -> str:
    return ", ".join(f"{recipe}: {values[name]}" for recipe, values in RECIPES.items())


def from_recipe(description: str, name: str) -> Any:
    """A field that defaults to the recipe's value: unset (None) takes it, a value given overrides it."""
    return Field(None, description=f"{description} Unset: the recipe's ({_recipe_values(name)}).")


class PretrainConfig(TrainingFields):
    """Model shape, recipe and training loop of the pretraining stage."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = TrainingFields.RUNTIME_FIELDS | {"nproc", "nnodes", "rdzv_endpoint"}

    recipe: Recipe = Field(
        "gpt2",
        description="The architecture and optimizer as a whole: gpt2 (GPT-2 as nanoGPT trains it: learned "
        "positions, GELU, tied embeddings, AdamW) or modern (modded-nanogpt's: rotary positions, QK-norm, "
        "ReLU², untied head, Muon). Sets rope, qk_norm, mlp, tie_embeddings and optimizer where they are unset.",
    )
    n_layer: int = Field(4, description="Transformer blocks (nanoGPT CPU recipe: 4).", ge=1, le=256)
    n_head: int = Field(4, description="Attention heads per block (nanoGPT CPU recipe: 4).", ge=1, le=256)
    n_embd: int = Field(128, description="Embedding width (nanoGPT CPU recipe: 128).", ge=1, le=32768)
    block_size: int = Field(64, description="Context length in tokens (nanoGPT CPU recipe: 64).", ge=2, le=131072)
    dropout: float = Field(0.0, description="Dropout rate (nanoGPT: 0 for pretraining, 0.1+ to fine-tune).", ge=0, lt=1)
    bias: bool = Field(False, description="Biases in Linear and LayerNorm (GPT-2: True; False trains a bit better).")
    rope: bool | None = from_recipe(
        "Rotary position embeddings (Su et al. 2021, RoFormer; modded-nanogpt) instead of a learned position "
        "table (GPT-2).",
        "rope",
    )
    rope_base: float = Field(
        10000.0, description="Base of the rotary frequencies (RoFormer: 10,000). Only with rope.", gt=1, le=1e9
    )
    qk_norm: bool | None = from_recipe(
        "RMS-normalise queries and keys per head before attention (Dehghani et al. 2023; modded-nanogpt).",
        "qk_norm",
    )
    mlp: MlpKind | None = from_recipe(
        "The MLP's activation: gelu (GPT-2) or relu2, ReLU squared (So et al. 2021, Primer; modded-nanogpt).",
        "mlp",
    )
    tie_embeddings: bool | None = from_recipe(
        "Share the token embedding with the output head (Press & Wolf 2017; GPT-2); false: a separate head "
        "(modded-nanogpt).",
        "tie_embeddings",
    )
    optimizer: OptimizerName | None = from_recipe(TrainConfig.__pydantic_fields__["optimizer"].description, "optimizer")
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
    nnodes: int = Field(
        1,
        description="Machines training together, nproc processes each (torchrun's c10d rendezvous at "
        "rdzv_endpoint); this one leads and logs the command the others run. Not part of the version id.",
        ge=1,
        le=1024,
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="HOST:PORT of the c10d rendezvous with nnodes > 1: an address of this machine that every "
        "node reaches (torchrun's --rdzv-endpoint, e.g. 10.0.0.1:29500).",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_recipe(cls, data: Any) -> Any:
        """Unset options take the recipe's values before anything reads them: the model, the version id and
        the manifest see concrete values only. An unknown recipe is left for its field to refuse."""
        if isinstance(data, dict):
            recipe = RECIPES.get(data.get("recipe", cls.model_fields["recipe"].default))
            if recipe is not None:
                data = {**data, **{name: value for name, value in recipe.items() if data.get(name) is None}}
        return data

    def identity_params(self) -> dict[str, Any]:
        # The recipe only names the options it set, and they are resolved by now: `recipe: modern` and its
        # options spelled out under another recipe are the same training, so the same version.
        return self.model_dump(mode="json", exclude=set(self.RUNTIME_FIELDS) | {"recipe"})

    def model_options(self) -> dict[str, Any]:
        """The GPTConfig fields this config sets (all but the vocabulary size, which the tokens decide)."""
        names = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
        return {name: getattr(self, name) for name in names}

    def problems(self) -> list[str]:
        problems = super().problems() + gpt_config_problems(self.model_options())
        processes = "nproc" if self.nnodes == 1 else "nproc x nnodes"
        problems += uneven_split_problems(self.grad_accum_steps, self.nproc * self.nnodes, processes)
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            problems.append(f"nnodes ({self.nnodes}) > 1 needs rdzv_endpoint, HOST:PORT of this node's rendezvous")
        if self.rdzv_endpoint is not None:
            if self.nnodes == 1:
                problems.append(f"rdzv_endpoint ({self.rdzv_endpoint!r}) is set but nnodes is 1: it would be unused")
            try:
                distributed.parse_endpoint(self.rdzv_endpoint)
            except ConfigError as exc:
                problems.append(str(exc))
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
        "step_seconds": round(result.step_seconds, 3),
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

    model_config = GPTConfig(vocab_size=padded_vocab_size(meta["vocab_size"]), **cfg.model_options())
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
    processes = cfg.nproc * cfg.nnodes
    if processes == 1:
        model, result = pretrain(settings, log=ctx.log.info, on_record=on_record)
        params = model.num_params()
        save_model(ctx.out, model)
    else:
        nodes = {"nnodes": cfg.nnodes, "rdzv_endpoint": cfg.rdzv_endpoint} if cfg.nnodes > 1 else {}
        result, params = launch(
            settings, cfg.nproc, **nodes, log=ctx.log.info, warn=ctx.log.warning, on_record=on_record
        )
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(ctx.work / "final" / name, ctx.out / name)

    shutil.copyfile(ctx.work / METRICS, ctx.out / METRICS)
    plot_losses(result.records, ctx.out / "loss.png", title="pretrain loss")
    return {
        "params": params,
        "vocab_size": meta["vocab_size"],
        "padded_vocab_size": model_config.vocab_size,
        "processes": processes,
        **result_metrics(result),
    }


def training_environment(cfg: TrainingConfig) -> dict[str, Any]:
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
