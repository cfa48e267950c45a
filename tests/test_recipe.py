"""Recipes: `pretrain.recipe` picks an architecture and optimizer as a whole, each part still its own field."""

import pytest
from pydantic import ValidationError
from test_pretrain import cycle, publish_tokens, tiny_config

from flows.config import PRESETS, load_config, preset_config
from model.checkpoint import load_model
from model.train import CHECKPOINT
from storage.store import Store
from tasks.pretrain import RECIPES, STAGE, PretrainConfig

MODERN = {"rope": True, "qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "optimizer": "muon"}
GPT2 = {"rope": False, "qk_norm": False, "mlp": "gelu", "tie_embeddings": True, "optimizer": "adamw"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def options(cfg: PretrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in MODERN}


def test_a_recipe_sets_every_option_left_unset() -> None:
    assert RECIPES == {"gpt2": GPT2, "modern": MODERN}
    assert options(PretrainConfig()) == GPT2  # today's model and optimizer by default
    assert options(PretrainConfig(recipe="modern")) == MODERN
    # An option given overrides its recipe; the others still follow it.
    mixed = PretrainConfig(recipe="modern", optimizer="adamw", tie_embeddings=True)
    assert options(mixed) == {**MODERN, "optimizer": "adamw", "tie_embeddings": True}
    assert options(PretrainConfig(rope=True)) == {**GPT2, "rope": True}
    assert mixed.train_config().optimizer == "adamw"
    assert PretrainConfig(recipe="modern").train_config().optimizer == "muon"


def test_a_recipe_and_its_options_spelled_out_are_one_version() -> None:
    inputs = {"tokens": "t"}
    modern = STAGE.version(tiny_config(recipe="modern"), inputs)
    assert STAGE.version(tiny_config(recipe="gpt2", **MODERN), inputs) == modern
    assert STAGE.version(tiny_config(recipe="modern", **MODERN), inputs) == modern
    assert STAGE.version(tiny_config(), inputs) == STAGE.version(tiny_config(recipe="modern", **GPT2), inputs)
    assert STAGE.version(tiny_config(), inputs) != modern
    # Each part counts on its own.
    assert STAGE.version(tiny_config(recipe="modern", qk_norm=False), inputs) != modern
    # The manifest's parameters show the values trained with, not "from the recipe".
    assert tiny_config(recipe="modern").model_dump(mode="json")["rope"] is True


def test_the_modern_recipe_trains_through_the_stage(tmp_path) -> None:
    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, cycle(3000), cycle(500))
    ref = STAGE.run(store.root, tiny_config(recipe="modern"), {"tokens": tokens})
    folder = store.path("pretrain", ref.version)
    model = load_model(folder)
    assert {name: getattr(model.config, name) for name in MODERN if name != "optimizer"} == {
        name: value for name, value in MODERN.items() if name != "optimizer"
    }
    assert "transformer.wpe.weight" not in model.state_dict()  # rotary positions: no position table
    metrics = store.manifest("pretrain", ref.version)["metrics"]
    assert metrics["val_loss"] < 2.0  # ln(40) = 3.7 untrained: the 7-token cycle is being learned
    assert store.manifest("pretrain", ref.version)["params"]["optimizer"] == "muon"
    assert not (store.stage_dir("pretrain") / ".work" / ref.version / CHECKPOINT).exists()


def test_model_options_are_checked_by_the_model_config() -> None:
    # Heads 5 wide: fine for learned positions, but rotary embeddings turn dimensions in pairs.
    tiny_config(n_embd=30, n_head=6)
    with pytest.raises(ValidationError) as err:
        tiny_config(recipe="modern", n_embd=30, n_head=6)
    (error,) = err.value.errors()
    assert "rope needs an even head size" in error["msg"] and "\n" not in error["msg"]
    with pytest.raises(ValidationError, match="recipe"):
        tiny_config(recipe="llama")
    with pytest.raises(ValidationError, match="mlp"):
        tiny_config(mlp="swiglu")


def test_presets_name_their_recipe_and_settings_can_change_it(tmp_path) -> None:
    # tiny and small train the modern recipe (benchmarks/train_bench.py); gpt2 stays GPT-2, exportable.
    expected = {"tiny": MODERN, "small": MODERN, "gpt2": GPT2}
    for preset in PRESETS:
        assert options(preset_config(preset).pretrain) == expected[preset], preset
    path = tmp_path / "settings.yaml"
    path.write_text("pretrain:\n  recipe: gpt2\n  tie_embeddings: false\n")
    cfg = load_config("tiny", path).pretrain
    assert options(cfg) == {**GPT2, "tie_embeddings": False}
    assert cfg.n_embd == PRESETS["tiny"]["pretrain"]["n_embd"]  # the preset's other settings stay
