"""Presets and settings files: every preset is valid, files are laid over presets, mistakes are named."""

import json

import pytest
import torch
from pydantic import ValidationError

from flows.config import PRESETS, PipelineConfig, PipelineOverrides, deep_merge, load_config, preset_config
from model.gpt import GPT, GPTConfig
from storage.errors import ConfigError
from tasks.clean import CleanConfig
from tasks.pretrain import padded_vocab_size


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_and_names_every_stage(preset):
    cfg = preset_config(preset)
    for stage in ("extract", "clean", "dedup", "tokenizer", "tokens", "pretrain", "finetune", "quantize", "evaluate"):
        assert cfg.stage_config(stage) is getattr(cfg, stage)
    assert cfg.sources == []  # the embedded default unless sources are given


def test_gpt2_preset_is_gpt2_small():
    cfg = preset_config("gpt2")
    p = cfg.pretrain
    model_cfg = GPTConfig(
        vocab_size=padded_vocab_size(cfg.tokenizer.vocab_size),
        block_size=p.block_size,
        n_layer=p.n_layer,
        n_head=p.n_head,
        n_embd=p.n_embd,
        bias=p.bias,
    )
    with torch.device("meta"):  # counts parameters without allocating them
        params = GPT(model_cfg).num_params()
    assert 123e6 < params < 125e6
    # nanoGPT's ~0.5M tokens per optimizer step.
    assert p.batch_size * p.block_size * p.grad_accum_steps == 491_520


@pytest.mark.parametrize("preset", ["small", "gpt2"])
def test_presets_for_web_text_clean_with_the_published_web_thresholds(preset):
    clean = preset_config(preset).clean
    assert clean.identity_params() == CleanConfig.web().identity_params()
    assert clean.min_words == 50 and clean.min_stop_words == 2  # Gopher's, not the embedded corpus's defaults


def test_tiny_preset_is_sized_for_a_cpu():
    cfg = preset_config("tiny")
    assert cfg.pretrain.n_layer * cfg.pretrain.n_embd <= 1024 and not cfg.pretrain.compile


def test_settings_file_is_laid_over_the_preset(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("pretrain:\n  max_steps: 70\ntokenizer:\n  kind: char\nsources:\n  - /data/a.tar\n")
    cfg = load_config("tiny", path)
    assert cfg.pretrain.max_steps == 70
    assert cfg.pretrain.n_embd == PRESETS["tiny"]["pretrain"]["n_embd"]  # the rest of the preset stays
    assert cfg.tokenizer.kind == "char"
    assert cfg.stage_config("download").sources[0].url == "/data/a.tar"
    json_path = tmp_path / "settings.json"
    json_path.write_text(json.dumps({"clean": {"min_words": 3}}))
    assert load_config("small", json_path).clean.min_words == 3


def test_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="no such settings file"):
        load_config("tiny", tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML or JSON"):
        load_config("tiny", broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("pretrain:\n  n_layers: 3\n")
    with pytest.raises(ValidationError, match="n_layers"):
        load_config("tiny", typo)
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"pretrain": {"n_embd": 100, "n_head": 3}})


def test_sources_replace_but_do_not_leak_between_configs():
    base = preset_config("tiny")
    with_source = base.with_sources(["https://example.org/a.tar.xz"])
    assert base.sources == [] and with_source.stage_config("download").sources[0].url.startswith("https://")


def test_types_are_strict_and_settings_files_read_numbers_as_numbers(tmp_path):
    for wrong in ({"pretrain": {"max_steps": True}}, {"pretrain": {"max_steps": "70"}}, {"tokenizer": {"kind": 1}}):
        with pytest.raises(ValidationError):
            PipelineConfig.model_validate(deep_merge(PRESETS["tiny"], wrong))
    path = tmp_path / "settings.yaml"
    path.write_text("pretrain:\n  learning_rate: 1e-3\n  min_lr: 3E-5\n  max_steps: 70\n")
    cfg = load_config("tiny", path)
    assert (cfg.pretrain.learning_rate, cfg.pretrain.min_lr, cfg.pretrain.max_steps) == (1e-3, 3e-5, 70)


def test_overrides_keep_the_preset_where_they_are_empty():
    form = PipelineOverrides.model_validate({"pretrain": {"max_steps": 700, "n_embd": None}, "tokenizer": None})
    cfg = preset_config("small", form)
    assert cfg.pretrain.max_steps == 700
    assert cfg.pretrain.n_embd == PRESETS["small"]["pretrain"]["n_embd"]
    assert cfg.tokenizer.vocab_size == PRESETS["small"]["tokenizer"]["vocab_size"]
    assert preset_config("small", {"pretrain": {"max_steps": 700}}) == cfg  # a dict, as a settings file gives
    # An optional sub-form left empty changes nothing (tokens.split unset: the tokenizer's split is used).
    assert preset_config("tiny", {"tokens": {"split": {"seed": None, "val_fraction": None}}}).tokens.split is None
    # The form keeps each field's description and bounds.
    field = PipelineOverrides.model_json_schema()["$defs"]["PretrainConfigOverrides"]["properties"]["max_steps"]
    assert field["description"] and field["anyOf"][0]["minimum"] == 1
    with pytest.raises(ValidationError):
        PipelineOverrides.model_validate({"pretrain": {"max_steps": 0}})


def test_a_map_in_a_settings_file_replaces_the_presets_whole(tmp_path):
    default = preset_config("tiny").evaluate.promotion.guards
    assert default  # the preset guards the gate, so that clearing it is visible
    path = tmp_path / "settings.yaml"
    path.write_text("evaluate:\n  promotion:\n    guards: {}\n")
    assert load_config("tiny", path).evaluate.promotion.guards == {}
    path.write_text("evaluate:\n  promotion:\n    guards:\n      heldout_loss: 0.1\n")
    assert load_config("tiny", path).evaluate.promotion.guards == {"heldout_loss": 0.1}
    # Through the UI's form too; a promotion sub-form left empty keeps the preset's guards.
    assert preset_config("tiny", {"evaluate": {"promotion": {"guards": {}}}}).evaluate.promotion.guards == {}
    assert preset_config("tiny", {"evaluate": {"promotion": {"metric": None}}}).evaluate.promotion.guards == default
