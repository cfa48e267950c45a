"""The pipeline's settings: one pydantic model holding every stage's config (a form in the Prefect UI),
the presets, and settings files laid over a preset.

Presets:
    tiny   a laptop CPU in minutes: the embedded default corpus, a 4-layer, 128-wide GPT, BPE 2k
    small  one GPU, hours: a 6-layer, 384-wide GPT on some OpenWebText subsets, BPE 16k
    gpt2   GPT-2 small (124M parameters) on all of OpenWebText, the nanoGPT recipe, on 8 GPUs (DDP)

Settings are always a preset with changes laid over it, however they arrive: a `--config` file, or the
`config` parameter of the flow (a form in the Prefect UI, or the API), which is `PipelineOverrides`, the
same fields as `PipelineConfig` with every one optional: the fields left empty keep the preset's value.
"""

import json
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from flows.checks import ChecksConfig
from storage.errors import ConfigError
from tasks.clean import CleanConfig
from tasks.dedup import DedupConfig
from tasks.download import DownloadConfig, Source, Sources
from tasks.evaluate import EvaluateConfig
from tasks.extract import ExtractConfig
from tasks.finetune import FinetuneConfig
from tasks.pretrain import PretrainConfig
from tasks.quantize import QuantizeConfig
from tasks.tokenizer import TokenizerConfig
from tasks.tokens import TokensConfig

Preset = Literal["tiny", "small", "gpt2"]

# The download settings other than the sources, which the pipeline takes separately (they default to the
# embedded corpus, and `--source` replaces them).
DownloadOptions = create_model(
    "DownloadOptions",
    __config__=ConfigDict(extra="forbid", strict=True),
    **{name: (field.annotation, field) for name, field in DownloadConfig.model_fields.items() if name != "sources"},
)


class PipelineConfig(BaseModel):
    """Every stage's settings. Unset fields keep each stage's documented default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sources: Sources = Field(
        default_factory=list,
        description="Archives to process (http, https, file:// or a path; a plain string is a URL). Empty: the "
        "embedded default corpus.",
    )
    download: DownloadOptions = Field(default_factory=DownloadOptions)  # type: ignore[valid-type]
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    checks: ChecksConfig = Field(
        default_factory=ChecksConfig,
        description="Bounds on the cleaned, deduplicated and tokenized corpus, checked before pretraining starts.",
    )

    def with_sources(self, sources: list[str]) -> "PipelineConfig":
        return self.model_copy(update={"sources": [Source(url=url) for url in sources]})

    def stage_config(self, stage: str) -> BaseModel:
        if stage == "download":
            return DownloadConfig(sources=self.sources, **self.download.model_dump())
        return getattr(self, stage)


# The published web-text thresholds (Gopher, C4, FineWeb): what the presets for real web text clean with.
WEB_CLEAN = CleanConfig.web().model_dump(mode="json", exclude_defaults=True)

# Each preset is a set of overrides on the stages' defaults, so that a default changed in a stage module is
# picked up by every preset that does not pin it.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        # Shards of 250 documents so that the default corpus (~1,700 documents) is cleaned in parallel.
        "extract": {"shard_docs": 250},
        "clean": {"workers": 2},
        "dedup": {"workers": 2},
        "tokens": {"workers": 2},
        # A tenth for validation: the default corpus is small, and 5% would be only ~75 documents.
        "tokenizer": {"kind": "bpe", "vocab_size": 2048, "split": {"val_fraction": 0.1}},
        "pretrain": {
            # The modern recipe reached the gpt2 recipe's final validation loss of 600 steps in 0.51x the wall
            # time on this CPU, and beat it in 0.64x (benchmarks/train_bench.py); 400 steps of it take less
            # time than those 600 and end lower.
            "recipe": "modern",
            "n_layer": 4,
            "n_head": 4,
            "n_embd": 128,
            "block_size": 128,
            "batch_size": 16,
            "max_steps": 400,
            "warmup_steps": 35,
            "learning_rate": 2e-3,
            "min_lr": 2e-4,
            "eval_interval": 100,
            "eval_steps": 10,
            "checkpoint_interval": 100,
            "progress": True,
        },
        # compare: a LoRA run beside the published full fine-tuning, so a run shows both held-out losses.
        "finetune": {
            "max_steps": 150,
            "eval_interval": 50,
            "checkpoint_interval": 50,
            "progress": True,
            "compare": True,
        },
        "quantize": {"eval_tokens": 32_768},
        "evaluate": {"eval_tokens": 65_536},
    },
    "small": {
        "extract": {"shard_docs": 20_000, "workers": 8},
        "clean": {**WEB_CLEAN, "workers": 8},
        "dedup": {"workers": 8},
        "tokens": {"workers": 8},
        "tokenizer": {"kind": "bpe", "vocab_size": 16_384, "max_train_docs": 500_000},
        "pretrain": {
            # The modern recipe: it won on the CPU at the tiny shape, and it is modded-nanogpt's GPU recipe
            # (its speedrun reaches GPT-2's loss in a fraction of the steps). Unmeasured on a GPU here.
            "recipe": "modern",
            "n_layer": 6,
            "n_head": 6,
            "n_embd": 384,
            "block_size": 256,
            "dropout": 0.0,
            "batch_size": 64,
            "grad_accum_steps": 4,
            "max_steps": 5_000,
            "learning_rate": 6e-4,
            "min_lr": 6e-5,
            "warmup_steps": 200,
            "beta2": 0.95,
            "eval_interval": 250,
            "eval_steps": 50,
            "checkpoint_interval": 250,
            "compile": True,
            "progress": True,
        },
        "finetune": {"max_steps": 1_000, "batch_size": 32, "progress": True},
        "quantize": {"eval_tokens": 262_144},
        "evaluate": {"eval_tokens": 1_048_576},
    },
    # nanoGPT's GPT-2 (124M) recipe on OpenWebText: ~0.5M tokens per step (12 x 1024 x 40), 600k steps.
    "gpt2": {
        "extract": {"shard_docs": 50_000, "workers": 16},
        "clean": {**WEB_CLEAN, "workers": 16},
        "dedup": {"workers": 16},
        "tokens": {"workers": 16},
        "tokenizer": {"kind": "bpe", "vocab_size": 50_257, "max_train_docs": 2_000_000},
        "pretrain": {
            # GPT-2 small itself (nanoGPT's reproduction): comparable with the published GPT-2 124M and exportable
            # as a Hugging Face GPT-2 model (`gptflow export`), which the modern recipe's parts are not.
            "recipe": "gpt2",
            "n_layer": 12,
            "n_head": 12,
            "n_embd": 768,
            "block_size": 1024,
            "dropout": 0.0,
            "bias": True,
            "batch_size": 12,
            "grad_accum_steps": 40,  # 5 micro-steps on each of 8 GPUs
            "nproc": 8,
            "max_steps": 600_000,
            "learning_rate": 6e-4,
            "min_lr": 6e-5,
            "warmup_steps": 2_000,
            "weight_decay": 0.1,
            "beta2": 0.95,
            "eval_interval": 1_000,
            "eval_steps": 200,
            "checkpoint_interval": 1_000,
            "compile": True,
            "progress": True,
        },
        "finetune": {"max_steps": 2_000, "batch_size": 32, "progress": True},
        "quantize": {"eval_tokens": 1_048_576},
        "evaluate": {"eval_tokens": 4_194_304},
    },
}


def _overrides_of(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional and defaulting to None, nested models likewise: a form whose empty
    fields mean "keep the preset's value". Descriptions and bounds stay, so the UI shows and enforces them."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        models = [arg for arg in members if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if models:  # a nested model, optional or not: its own fields become optional in turn
            annotation = _overrides_of(models[0], f"{models[0].__name__}Overrides")
        optional = FieldInfo.merge_field_infos(info, annotation=annotation | None, default=None)
        optional.default_factory = None
        fields[field_name] = (annotation | None, optional)
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), __doc__=model.__doc__, **fields)


PipelineOverrides = _overrides_of(PipelineConfig, "PipelineOverrides")


def overrides_dict(overrides: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    """The fields a user set, as a nested dict to lay over a preset (empty fields of the form left out)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, BaseModel):
        overrides = PipelineOverrides.model_validate(overrides)
    return _without_empty(overrides.model_dump(mode="json", exclude_none=True), type(overrides))


def _nested_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The settings model of `model`'s field `key` when that field is a nested group of settings (optional
    or not); None for a value, a list or a map (such as evaluate's promotion guards)."""
    info = model.model_fields.get(key) if model is not None else None
    if info is None:
        return None
    annotation = info.annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return next((arg for arg in members if isinstance(arg, type) and issubclass(arg, BaseModel)), None)


def _without_empty(values: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Nested settings none of whose fields is set are not set either (an empty sub-form changes nothing);
    a map set empty stays set: `guards: {}` means no guards."""
    kept = {}
    for key, value in values.items():
        nested = _nested_model(model, key)
        if isinstance(value, dict) and nested is not None:
            value = _without_empty(value, nested)
            if not value:
                continue
        kept[key] = value
    return kept


def deep_merge(base: dict[str, Any], overlay: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """`overlay` laid over `base`, group by group. With the settings `model` they follow, a map (such as
    evaluate's promotion guards) is replaced whole, as a list or a value is, so that a file can drop a
    default entry; without it, every dict is merged."""
    merged = dict(base)
    for key, value in overlay.items():
        nested = _nested_model(model, key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and (model is None or nested is not None):
            merged[key] = deep_merge(merged[key], value, nested)
        else:
            merged[key] = value
    return merged


def preset_config(preset: str, overrides: BaseModel | dict[str, Any] | None = None) -> PipelineConfig:
    """The preset's settings with `overrides` laid over them, validated together: the one way settings are
    made, for a settings file and for the flow's `config` parameter alike."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PipelineConfig.model_validate(deep_merge(PRESETS[preset], overrides_dict(overrides), PipelineConfig))


class _SettingsLoader(yaml.SafeLoader):
    """YAML as a settings file means it: `1e-3` is a number (YAML 1.1, PyYAML's dialect, reads it as text,
    and strict settings would then refuse it); everything else as safe_load reads it."""


_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_settings_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON file of settings (JSON is YAML, so one parser reads both)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SettingsLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such settings file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML or JSON ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage names to settings, got {type(data).__name__}")
    return data


def load_config(preset: str, path: Path | None = None) -> PipelineConfig:
    """The preset's settings with the file's laid over them, validated together."""
    return preset_config(preset, read_settings_file(path) if path else None)


def dump_config(config: PipelineConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2)
