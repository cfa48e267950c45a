"""Stage "finetune": supervised fine-tuning of the pretrained model on prompt/response pairs, full or LoRA.

The pairs come from a JSONL file of {"prompt", "response"} objects, or from the embedded default set. For
a file, a seeded hash of each pair's content decides whether it is held out (heldout_fraction), so held-out
pairs are never trained on. The default pairs carry their side (`split`): those of the modules left out of
the default pretraining corpus are held out, so their answers are neither pretrained nor fine-tuned on.
Held-out pairs are published as heldout.jsonl for the evaluate stage. The version follows the data's
content (the `identity` hook), not its path. model/finetune.py describes the template, the packing and
how a pair longer than the context is cut.

`method` full trains every weight; lora trains low-rank adapters on a frozen model (model/lora.py) and
merges them in, so the published model.pt is a plain GPT either way. With `compare`, the other method is
trained too, from the same start on the same pairs for the same steps, and only its held-out loss is kept.

The start is the pretrain stage's model with the store's tokenizer, or, with `init_from`, a Hugging Face
GPT-2 folder or a nanoGPT ckpt.pt with the tokenizer beside it (model/hf.py's load_init): then that
tokenizer encodes the pairs, and the version follows the imported files' content (weights sha256, kind,
tokenizer, config). The stage still takes its pretrain and tokenizer inputs (their versions are part of
its id) but reads neither.

Output: model.pt, model_config.json, tokenizer.json (the tokenizer the model was trained with: the store's
copied, or the imported one), metrics.jsonl (val_loss = held-out response loss), heldout.jsonl, loss.png.
"""

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from model.checkpoint import load_model, save_model
from model.finetune import finetune, read_pairs, response_loss, split_pairs
from model.gpt import GPT
from model.hf import InitModel, load_init
from model.lora import TARGETS, LoRASettings
from model.tokenizer import FILENAME, Tokenizer
from model.train import METRICS, TrainConfig, plot_losses, resolve_device
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store, canonical_json
from tasks.pretrain import RUN_RECORDS, TrainingConfig, result_metrics, training_environment, training_fields
from tasks.sample_data import default_finetune_pairs
from tasks.stage import Stage, StageContext, stage_task

HELDOUT = "heldout.jsonl"
METHODS = ("full", "lora")
Method = Literal[METHODS]
LoRATarget = Literal[TARGETS]  # model/lora.py's: q, k, v, attn_proj, mlp_fc, mlp_proj
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_learning_rate")


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
    """Fine-tuning data, held-out split, start, method and training loop. Loop defaults are the pretraining
    ones scaled down: fewer steps at a lower peak rate, as fine-tuning a pretrained model calls for
    (nanoGPT's finetune_shakespeare: a constant 3e-5 on GPT-2; a tiny model from scratch tolerates more)."""

    # Paths only say where the files are; the version follows their content through the identity hook.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = TrainingConfig.RUNTIME_FIELDS | {"data", "init_from"}

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
    init_from: str | None = Field(
        None,
        description="Start from this local Hugging Face GPT-2 folder or nanoGPT ckpt.pt (or the folder holding "
        "it), with the tokenizer.json beside it, instead of the pretrain stage's model; that tokenizer encodes "
        "the pairs and is published. Unset: the pretrain stage's model and the store's tokenizer.",
    )
    method: Method = Field(
        "full",
        description="full: every weight trains. lora: low-rank adapters on a frozen model (Hu et al. 2021), "
        "merged into the weights when published, so every later stage reads a plain model.",
    )
    lora_rank: int = Field(
        8,
        description="Rank r of each LoRA adapter (litgpt's default: 8; Hu et al. 2021 §7.2: even rank 1 does well).",
        ge=1,
        le=1024,
    )
    lora_alpha: float = Field(
        16.0,
        description="LoRA's scale numerator: updates are scaled alpha / rank (Hu et al. 2021 §4.1; litgpt: 16, "
        "so 2 at rank 8).",
        gt=0,
        le=1e4,
    )
    lora_dropout: float = Field(
        0.05, description="Dropout on the LoRA adapters' input (litgpt: 0.05; Hu et al.'s GPT-2 runs: 0.1).", ge=0, lt=1
    )
    # On the tiny preset's default run (150 steps, held-out loss 4.645 before), at lora_learning_rate 3e-3:
    # attention's four matrices 4.397 (32,768 adapter parameters), with the MLP's two as well 4.383 (73,728).
    lora_targets: list[LoRATarget] = Field(
        default_factory=lambda: ["q", "k", "v", "attn_proj"],
        description="The matrices of every block that get an adapter: q, k, v (each third of the fused c_attn "
        "its own), attn_proj, mlp_fc, mlp_proj. Default: all of attention (Hu et al. 2021 §7.1, Table 5: "
        "adapting W_q, W_k, W_v and W_o did best for a fixed parameter budget).",
        min_length=1,
    )
    # Measured on the tiny preset's default run (held-out loss 4.645 before; full fine-tuning at 3e-4: 4.354):
    # LoRA at 1.5e-3 4.407, 3e-3 4.397, 6e-3 4.395, 1e-2 4.409, 2e-2 4.466. A separate rate rather than one
    # learning_rate per method, so that `compare` trains each at its own.
    lora_learning_rate: float = Field(
        3e-3,
        description="Peak learning rate of a LoRA run, in place of learning_rate (min_lr scales with it): LoRA's "
        'best rate is about 10x full fine-tuning\'s (Schulman et al. 2025, "LoRA Without Regret"; Biderman et '
        "al. 2024): 10 x this stage's 3e-4, on the best plateau measured on the tiny preset (3e-3 to 6e-3).",
        gt=0,
        le=1,
    )
    compare: bool = Field(
        False,
        description="Also train the other method, from the same start on the same pairs for the same steps, to "
        "record both held-out losses (heldout_loss_after_full, heldout_loss_after_lora); only `method`'s "
        "weights are published.",
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if len(set(self.lora_targets)) != len(self.lora_targets):
            problems.append(f"lora_targets {self.lora_targets} names a matrix twice")
        if self.optimizer == "muon" and "lora" in self.methods():
            problems.append(
                "optimizer muon with LoRA (method lora, or compare): LoRA's adapters train with AdamW, as in "
                "Hu et al. 2021; Muon orthogonalises updates of whole matrices"
            )
        return problems

    def methods(self) -> tuple[str, ...]:
        """The methods this run trains: `method` first (the one published), then the other with `compare`."""
        return (self.method, *(m for m in METHODS if m != self.method)) if self.compare else (self.method,)

    def identity_params(self) -> dict[str, Any]:
        params = super().identity_params()
        if "lora" not in self.methods():  # unused settings must not make a new version
            params = {name: value for name, value in params.items() if name not in LORA_FIELDS}
        return params

    def lora_settings(self) -> LoRASettings:
        return LoRASettings(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def method_train_config(self, method: str) -> TrainConfig:
        """The loop's settings for `method`: LoRA's peak rate is lora_learning_rate, its floor scaled alike."""
        cfg = self.train_config()
        if method != "lora":
            return cfg
        rate = self.lora_learning_rate
        return dataclasses.replace(cfg, learning_rate=rate, min_lr=rate * (cfg.min_lr / cfg.learning_rate))


@cache
def _default_pairs() -> tuple[dict[str, str], ...]:
    # Computed in a fresh interpreter: worth doing once per process (identity and build both need it).
    return tuple(default_finetune_pairs())


def finetune_pairs(cfg: FinetuneConfig) -> list[dict[str, str]]:
    return read_pairs(Path(cfg.data)) if cfg.data else list(_default_pairs())


def read_init(cfg: FinetuneConfig) -> InitModel:
    """The model and tokenizer `init_from` names (model/hf.py's load_init)."""
    path = Path(cfg.init_from)
    if not path.exists():
        raise ConfigError(f"finetune.init_from {path} does not exist")
    return load_init(path)


def init_identity(init: InitModel) -> dict[str, Any]:
    """What of an imported start decides the result: its weights file (sha256), its kind, its tokenizer and
    its model config (a config.json can change the model without the weights changing)."""
    return {
        "init_kind": init.kind,
        "init_sha256": init.sha256,
        "init_tokenizer_sha256": hashlib.sha256(init.tokenizer.to_json().encode()).hexdigest(),
        "init_config": init.model.config.to_dict(),
    }


def finetune_identity(cfg: FinetuneConfig, store: Store | None = None) -> dict[str, Any]:
    """The sha256 of the data file's bytes (or of the default pairs' canonical JSON), and with init_from the
    imported model's identity: the version changes exactly when the data or the start does."""
    if cfg.data:
        path = Path(cfg.data)
        if not path.is_file():
            raise ConfigError(f"fine-tuning data {path} does not exist")
        found: dict[str, Any] = {"data_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        found = {"default_pairs_sha256": hashlib.sha256(canonical_json(list(_default_pairs())).encode()).hexdigest()}
    if cfg.init_from:
        found.update(init_identity(read_init(cfg)))
    return found


def check_tokenizer(ctx: StageContext, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer must be the one the pretrained model's tokens were made with."""
    tokenizer_path = ctx.input_path("tokenizer") / FILENAME
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"{tokenizer_path}: {tokenizer.vocab_size} ids, more than the pretrained model's vocabulary ({vocab_size})"
        )
    ctx.require_common_ancestor("pretrain", "tokenizer")


@dataclass
class Start:
    """The model fine-tuning starts from, the tokenizer it reads, and what the manifest says of them."""

    model: GPT
    tokenizer: Tokenizer
    publish_tokenizer: Callable[[Path], None]
    metrics: dict[str, Any]


def starting_point(ctx: StageContext, cfg: FinetuneConfig) -> Start:
    if cfg.init_from is None:
        tokenizer_path = ctx.input_path("tokenizer") / FILENAME
        tokenizer = Tokenizer.load(tokenizer_path)
        model = load_model(ctx.input_path("pretrain"))
        check_tokenizer(ctx, tokenizer, model.config.vocab_size)
        return Start(model, tokenizer, lambda path: shutil.copyfile(tokenizer_path, path), {"init": "pretrain"})
    init = read_init(cfg)
    found = init_identity(init)
    if any(ctx.identity.get(key) != value for key, value in found.items()):
        raise DataIntegrityError(f"{cfg.init_from}: changed after this version's id was computed from it; run again")
    ctx.log.info(
        "starting from the %s model %s (sha256 %s), with its tokenizer; the pretrain and tokenizer inputs are not read",
        init.kind,
        cfg.init_from,
        init.sha256[:12],
    )
    return Start(init.model, init.tokenizer, init.tokenizer.save, {"init": init.kind, "init_sha256": init.sha256})


def write_pairs(pairs: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)


def log_truncation(ctx: StageContext, counts: dict[str, int], block_size: int) -> None:
    if counts["truncated_prompt"]:
        ctx.log.info(
            "%d pairs longer than the context of %d tokens: their prompts were cut at the start",
            counts["truncated_prompt"],
            block_size,
        )
    if counts["truncated_response"]:
        ctx.log.warning(
            "%d responses longer than the context of %d tokens (less the template): cut at their end",
            counts["truncated_response"],
            block_size,
        )
    if counts["dropped"]:
        ctx.log.warning(
            "%d pairs left out: the context of %d tokens cannot hold the template", counts["dropped"], block_size
        )


def build(ctx: StageContext, cfg: FinetuneConfig) -> dict[str, Any]:
    pairs = finetune_pairs(cfg)
    train_pairs, heldout = split_pairs(pairs, cfg.heldout_fraction, cfg.seed)
    if not train_pairs:
        raise DataIntegrityError(f"all {len(pairs)} pairs were held out: none is left to train on")
    start = starting_point(ctx, cfg)
    model, tokenizer = start.model, start.tokenizer
    device = resolve_device(cfg.device)
    model.to(device)
    methods = cfg.methods()
    # The other method of a comparison starts from these very weights.
    initial = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    ctx.log.info("fine-tuning (%s) on %d pairs, %d held out", " then ".join(methods), len(train_pairs), len(heldout))

    def heldout_loss() -> float | None:
        if not heldout:
            return None
        return response_loss(model, tokenizer, heldout, model.config.block_size, cfg.batch_size, device)

    before = heldout_loss()
    after: dict[str, float | None] = {}
    for index, method in enumerate(methods):
        if index:
            model.load_state_dict(initial)
            ctx.log.info("comparison: the same pairs and steps with %s fine-tuning (not published)", method)
        work = ctx.work / method

        def on_record(record: dict[str, Any], index: int = index) -> None:
            ctx.progress((index + record["step"] / cfg.max_steps) / len(methods))

        result, counts = finetune(
            model,
            tokenizer,
            train_pairs,
            heldout,
            cfg.method_train_config(method),
            work,
            lora=cfg.lora_settings() if method == "lora" else None,
            metrics_path=work / METRICS,
            log=ctx.log.info if index == 0 else lambda line, method=method: ctx.log.info("[%s] %s", method, line),
            on_record=on_record,
        )
        after[method] = heldout_loss()
        if index == 0:
            published, published_counts = result, counts
            save_model(ctx.out, model)
            start.publish_tokenizer(ctx.out / FILENAME)
            shutil.copyfile(work / METRICS, ctx.out / METRICS)
            write_pairs(heldout, ctx.out / HELDOUT)
            title = f"fine-tuning loss, {method} (val = held-out responses)"
            plot_losses(result.records, ctx.out / "loss.png", title=title)
    log_truncation(ctx, published_counts, model.config.block_size)
    return {
        "method": cfg.method,
        **start.metrics,
        "pairs": len(pairs),
        "pairs_train": len(train_pairs),
        "pairs_heldout": len(heldout),
        "pairs_truncated_prompt": published_counts["truncated_prompt"],
        "pairs_truncated_response": published_counts["truncated_response"],
        "pairs_dropped_truncated": published_counts["dropped"],
        "trainable_params": published_counts["trainable_params"],
        "heldout_loss_before": before,
        "heldout_loss_after": after[cfg.method],
        "heldout_loss_after_full": after.get("full"),
        "heldout_loss_after_lora": after.get("lora"),
        **result_metrics(published),
    }


STAGE = Stage(
    name="finetune",
    module=__name__,
    config=FinetuneConfig,
    build=build,
    inputs=("pretrain", "tokenizer"),
    identity=finetune_identity,
    libraries=("torch", "numpy"),
    environment=training_environment,
    records=RUN_RECORDS,
)
finetune_task = stage_task(STAGE, retries=2, backoff_seconds=10)
