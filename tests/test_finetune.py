"""Supervised fine-tuning: the response-only loss mask, the held-out split, bad data, and the stage."""

import hashlib
import json
import random
from pathlib import Path

import builders
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flows.config import PipelineOverrides
from flows.generate import find_tokenizer
from model.checkpoint import load_model
from model.data import ExampleBatches
from model.finetune import (
    IGNORE_INDEX,
    PROMPT_HEADER,
    PROMPT_TEMPLATE,
    RESPONSE_HEADER,
    encode_pair,
    encode_pairs,
    read_pairs,
    response_loss,
    split_pairs,
)
from model.gpt import GPT, GPTConfig
from model.tokenizer import EOT, FILENAME, Tokenizer, train_bpe, train_char
from model.train import TrainConfig, read_metrics
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store
from tasks.finetune import STAGE, FinetuneConfig, finetune_pairs
from tasks.pretrain import STAGE as PRETRAIN
from tasks.pretrain import PretrainConfig
from tasks.sample_data import default_corpus_documents

WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "fig", "jam", "owl", "ray", "tip", "van", "web"]


# Tiny models train faster on one thread than on two contending ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_pairs() -> list[dict[str, str]]:
    twice = [{"prompt": f"twice {w}", "response": f"{w} {w}"} for w in WORDS]
    return twice + [{"prompt": f"upper {w}", "response": w.upper()} for w in WORDS]


def char_tokenizer() -> Tokenizer:
    texts = [PROMPT_TEMPLATE.format(prompt=p["prompt"]) + p["response"] for p in make_pairs()]
    return train_char(texts)


def write_jsonl(path: Path, pairs: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


# -- the loss mask -------------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_response_tokens() -> None:
    tokenizer = char_tokenizer()
    inputs, labels = encode_pair(tokenizer, "twice cat", "cat cat", block_size=64).example
    prompt_text = PROMPT_TEMPLATE.format(prompt="twice cat")
    assert len(inputs) == len(labels) == len(prompt_text) + len("cat cat") + 1 - 1
    assert tokenizer.decode(inputs) == prompt_text + "cat cat"
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "cat cat" + EOT
    # Masked positions are exactly those whose next token is still the prompt's.
    assert labels[: len(prompt_text) - 1] == [IGNORE_INDEX] * (len(prompt_text) - 1)
    assert IGNORE_INDEX not in labels[len(prompt_text) - 1 :]


def test_a_long_prompt_is_cut_at_its_start_and_its_whole_response_trained_on() -> None:
    tokenizer = char_tokenizer()
    prompt = "upper dog " * 10 + "twice cat"  # 109 characters: the context of 48 cannot hold it
    encoded = encode_pair(tokenizer, prompt, "cat cat", block_size=48)
    frame = len(PROMPT_HEADER) + len(RESPONSE_HEADER)
    kept = 48 + 1 - frame - len("cat cat") - 1  # the prompt's text gets what the response and EOT leave
    assert len(encoded.inputs) == 48 and encoded.prompt_tokens_cut == len(prompt) - kept > 0
    # The header stays, the prompt's end (the question itself) stays, and every response token is a target.
    assert tokenizer.decode(encoded.inputs) == PROMPT_HEADER + prompt[-kept:] + RESPONSE_HEADER + "cat cat"
    assert tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]) == "cat cat" + EOT
    assert encoded.response_tokens_cut == 0

    examples, counts = encode_pairs(tokenizer, [{"prompt": prompt, "response": "cat cat"}, *make_pairs()[:2]], 48)
    assert len(examples) == 3  # kept, not left out
    assert counts == {"truncated_prompt": 1, "truncated_response": 0, "dropped": 0}


def test_a_response_longer_than_the_context_is_cut_at_its_end_and_counted() -> None:
    tokenizer = char_tokenizer()
    response = "cat dog " * 10  # 80 characters
    encoded = encode_pair(tokenizer, "twice cat", response, block_size=48)
    fits = 48 + 1 - len(PROMPT_HEADER) - len(RESPONSE_HEADER)
    assert tokenizer.decode(encoded.inputs) == PROMPT_HEADER + RESPONSE_HEADER + response[: fits - 1]
    assert tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]) == response[:fits]
    assert encoded.prompt_tokens_cut == len("twice cat") and encoded.response_tokens_cut == len(response) + 1 - fits
    _, counts = encode_pairs(tokenizer, [{"prompt": "twice cat", "response": response}], 48)
    assert counts == {"truncated_prompt": 1, "truncated_response": 1, "dropped": 0}
    # A context too short for the template's own lines leaves nothing to train on: left out, and counted.
    examples, counts = encode_pairs(tokenizer, make_pairs()[:1], 20)
    assert examples == [] and counts["dropped"] == 1


def test_padding_is_never_a_target() -> None:
    examples = [([1, 2, 3], [IGNORE_INDEX, 3, 4]), ([5], [6])]
    source = ExampleBatches(examples, [], batch_size=2, seed=0, pad_id=0)
    x, y = next(source.eval_batches("train", 1))
    assert x.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert y.tolist() == [[IGNORE_INDEX, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert source.eval_splits() == ("train",)


def test_response_loss_is_per_token_whatever_the_batch_size() -> None:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32))
    pairs = make_pairs()[:7]
    one = response_loss(model, tokenizer, pairs, 48, 1, "cpu")
    three = response_loss(model, tokenizer, pairs, 48, 3, "cpu")
    assert one == pytest.approx(three, rel=1e-5)
    assert 3.0 < one < 5.0  # an untrained model: about ln(64)
    with pytest.raises(DataIntegrityError, match="none of the 1 pairs"):
        response_loss(model, tokenizer, [{"prompt": "x", "response": "y"}], 20, 1, "cpu")


# -- the held-out split --------------------------------------------------------------------------------


def test_heldout_split_is_deterministic_disjoint_and_order_free() -> None:
    pairs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(1000)]
    train, heldout = split_pairs(pairs, 0.2, seed=1)
    assert len(train) + len(heldout) == 1000
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert 150 < len(heldout) < 250
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(p["prompt"] for p in split_pairs(shuffled, 0.2, seed=1)[1]) == sorted(p["prompt"] for p in heldout)
    assert split_pairs(pairs, 0.2, seed=2)[1] != heldout
    # A pair given twice lands on one side only.
    doubled_train, doubled_heldout = split_pairs(pairs + pairs, 0.2, seed=1)
    assert not {p["prompt"] for p in doubled_train} & {p["prompt"] for p in doubled_heldout}


def test_pairs_that_carry_a_split_go_where_it_says_and_lose_the_field() -> None:
    pairs = [{"prompt": f"p{i}", "response": f"r{i}", "split": "heldout" if i % 3 else "train"} for i in range(30)]
    train, heldout = split_pairs(pairs, 0.0, seed=1)
    assert [p["prompt"] for p in heldout] == [f"p{i}" for i in range(30) if i % 3]
    assert [p["prompt"] for p in train] == [f"p{i}" for i in range(0, 30, 3)]
    assert train[0] == {"prompt": "p0", "response": "r0"}  # heldout.jsonl keeps its two fields
    # The fraction and the seed apply to pairs without a side of their own only.
    assert split_pairs(pairs, 0.5, seed=7) == (train, heldout)
    with pytest.raises(DataIntegrityError, match=r"'p0': split must be 'train' or 'heldout', got 'test'"):
        split_pairs([{"prompt": "p0", "response": "r0", "split": "test"}], 0.1, seed=1)


def test_default_heldout_pairs_never_occur_in_the_default_pretraining_corpus() -> None:
    """Held-out answers found in the pretraining text would score memory, not what fine-tuning taught."""
    cfg = FinetuneConfig()
    train, heldout = split_pairs(finetune_pairs(cfg), cfg.heldout_fraction, cfg.seed)
    documents = [text for _, text in default_corpus_documents()]  # all of it: train and val alike
    corpus = "\0".join(documents)
    collapsed = "\0".join(" ".join(text.split()) for text in documents)  # a response is one collapsed paragraph
    leaked = [pair["prompt"] for pair in heldout if pair["response"] in corpus or pair["prompt"] in corpus]
    assert leaked == []
    assert [pair["prompt"] for pair in heldout if pair["response"] in collapsed] == []
    assert not {pair["response"] for pair in heldout} & {pair["response"] for pair in train}
    assert len(heldout) >= 200 and len(train) >= 10 * len(heldout)
    # The check can see a leak: most training answers are in the corpus, as their docstrings are.
    assert sum(pair["response"] in collapsed for pair in train) > len(train) / 2


# -- bad data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', r":2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n', r':3: missing "response"'),
        ('["a", "b"]\n', r":1: expected an object"),
        ('{"prompt": 1, "response": "b"}\n', r':1: "prompt" must be a string'),
        ("\n\n", r"pairs.jsonl: no prompt/response pairs"),
    ],
)
def test_bad_jsonl_is_a_one_line_error_naming_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataIntegrityError, match=message) as err:
        read_pairs(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_data_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        STAGE.run(
            tmp_path / "store", FinetuneConfig(data=str(tmp_path / "nope.jsonl")), {"pretrain": "a", "tokenizer": "b"}
        )


# -- the stage -----------------------------------------------------------------------------------------


def publish_tokenizer(store: Store, tokenizer: Tokenizer, version: str = "tok1") -> str:
    def build(out: Path) -> dict:
        tokenizer.save(out)
        return {}

    store.publish("tokenizer", version, build, params={}, inputs={}, code_version="t")
    return version


def publish_tokens(store: Store, tokenizer: Tokenizer, tokenizer_version: str) -> str:
    pairs = make_pairs()
    text_ids = []
    for _ in range(8):
        for pair in pairs:
            text_ids += tokenizer.encode(PROMPT_TEMPLATE.format(prompt=pair["prompt"]) + pair["response"])
            text_ids.append(tokenizer.eot_id)
    ids = np.array(text_ids, dtype=np.uint16)
    split = len(ids) * 9 // 10

    return builders.publish_tokens(
        store.root,
        ids[:split],
        ids[split:],
        vocab_size=tokenizer.vocab_size,
        eot_token=tokenizer.eot_id,
        version="tokens1",
        tokenizer_version=tokenizer_version,
        inputs={"tokenizer": tokenizer_version},
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A store with a char tokenizer, tokens made with it, and a tiny model pretrained on them."""
    store = Store(tmp_path_factory.mktemp("finetune") / "store")
    tokenizer_version = publish_tokenizer(store, char_tokenizer())
    tokens = publish_tokens(store, char_tokenizer(), tokenizer_version)
    cfg = PretrainConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=48, batch_size=8, max_steps=60, warmup_steps=5,
        learning_rate=1e-2, eval_interval=30, eval_steps=2, checkpoint_interval=100, device="cpu",
    )  # fmt: skip
    ref = PRETRAIN.run(store.root, cfg, {"tokens": tokens})
    return store.root, ref.version, tokenizer_version


def tiny_finetune_config(data: Path, **overrides) -> FinetuneConfig:
    values = dict(
        data=str(data),
        heldout_fraction=0.2,
        max_steps=40,
        warmup_steps=4,
        learning_rate=3e-3,
        batch_size=8,
        eval_interval=20,
        checkpoint_interval=20,
        log_interval=5,
        device="cpu",
    )
    return FinetuneConfig(**{**values, **overrides})


def test_finetune_stage_publishes_its_files(pretrained: tuple[Path, str, str], tmp_path: Path) -> None:
    root, pretrain_version, tokenizer_version = pretrained
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    inputs = {"pretrain": pretrain_version, "tokenizer": tokenizer_version}
    ref = STAGE.run(root, tiny_finetune_config(data), inputs)
    store = Store(root)
    folder = store.path("finetune", ref.version)
    for name in ("model.pt", "model_config.json", "tokenizer.json", "metrics.jsonl", "heldout.jsonl", "loss.png"):
        assert (folder / name).is_file(), name
    # The tokenizer the model was trained with, which generate finds first.
    tokenizer_file = store.path("tokenizer", tokenizer_version) / "tokenizer.json"
    assert (folder / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert find_tokenizer(store, "finetune", ref.version) == folder / "tokenizer.json"

    heldout = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    expected_train, expected_heldout = split_pairs(make_pairs(), 0.2, FinetuneConfig().seed)
    assert heldout == expected_heldout and heldout

    metrics = store.manifest("finetune", ref.version)["metrics"]
    assert metrics["pairs_train"] == len(expected_train) and metrics["pairs_heldout"] == len(heldout)
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"]
    assert metrics["method"] == "full" and metrics["heldout_loss_after_full"] == metrics["heldout_loss_after"]
    assert metrics["heldout_loss_after_lora"] is None  # compare is off: only one method trained
    assert metrics["pairs_truncated_prompt"] == metrics["pairs_truncated_response"] == 0
    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert records[-1]["val_loss"] == pytest.approx(metrics["heldout_loss_after"], rel=1e-5)

    # The version follows the data's content, not its path.
    moved = write_jsonl(tmp_path / "elsewhere.jsonl", make_pairs())
    assert STAGE.run(root, tiny_finetune_config(moved), inputs).reused
    write_jsonl(moved, make_pairs()[:-1])
    assert (
        STAGE.version(tiny_finetune_config(moved), inputs, STAGE.identity(tiny_finetune_config(moved))) != ref.version
    )


def test_lora_with_compare_publishes_a_plain_model_and_both_heldout_losses(
    pretrained: tuple[Path, str, str], tmp_path: Path
) -> None:
    root, pretrain_version, tokenizer_version = pretrained
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    inputs = {"pretrain": pretrain_version, "tokenizer": tokenizer_version}
    cfg = tiny_finetune_config(data, method="lora", compare=True, lora_rank=4, lora_learning_rate=1e-2)
    ref = STAGE.run(root, cfg, inputs)
    store = Store(root)
    folder = store.path("finetune", ref.version)
    metrics = store.manifest("finetune", ref.version)["metrics"]
    before = metrics["heldout_loss_before"]
    # Each method lowers the held-out loss by a clear margin; the published one is LoRA's.
    assert metrics["heldout_loss_after_full"] < before - 0.1 and metrics["heldout_loss_after_lora"] < before - 0.1
    assert metrics["heldout_loss_after"] == metrics["heldout_loss_after_lora"] and metrics["method"] == "lora"
    assert metrics["trainable_params"] == 2 * 4 * (4 * 32 + 32 * 4)  # 2 blocks, q k v and attn_proj, rank 4

    # model.pt is a plain GPT: every later stage loads it as it loads any other.
    model = load_model(folder)
    pretrained_model = load_model(store.path("pretrain", pretrain_version))
    assert list(model.state_dict()) == list(pretrained_model.state_dict())
    assert not [name for name in model.state_dict() if "lora" in name]
    # The adapters' matrices changed; what LoRA leaves frozen did not.
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, pretrained_model.state_dict()[n])}
    assert changed == {f"transformer.h.{i}.attn.{m}.weight" for i in range(2) for m in ("c_attn", "c_proj")}
    # The published metrics are LoRA's run, at LoRA's own learning rate.
    records = read_metrics(folder / "metrics.jsonl")
    assert max(r["lr"] for r in records) == pytest.approx(1e-2, rel=0.05)
    assert records[-1]["val_loss"] == pytest.approx(metrics["heldout_loss_after_lora"], rel=1e-4)


def test_lora_settings_are_part_of_the_version_only_when_lora_trains(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    inputs = {"pretrain": "p", "tokenizer": "t"}

    def version(**changes) -> str:
        cfg = tiny_finetune_config(data, **changes)
        return STAGE.version(cfg, inputs, STAGE.identity(cfg))

    full = version()
    assert version(lora_rank=4, lora_targets=["q"]) == full  # unused by full fine-tuning
    assert version(compare=True) != full
    assert version(method="lora") != version(method="lora", lora_rank=4) != full
    with pytest.raises(ValidationError, match=r"lora_targets \['q', 'q'\] names a matrix twice"):
        tiny_finetune_config(data, lora_targets=["q", "q"])
    with pytest.raises(ValidationError, match="optimizer muon with LoRA"):
        tiny_finetune_config(data, method="lora", optimizer="muon")
    with pytest.raises(ValidationError, match="lora_targets"):
        tiny_finetune_config(data, lora_targets=["wq"])


# -- starting from an imported model ---------------------------------------------------------------


def bpe_tokenizer() -> Tokenizer:
    texts = [PROMPT_TEMPLATE.format(prompt=p["prompt"]) + p["response"] for p in make_pairs()]
    return train_bpe(texts * 4, vocab_size=300)


def save_hf_gpt2(folder: Path, tokenizer: Tokenizer, seed: int = 1) -> None:
    """A GPT-2 made and saved by transformers itself, with our BPE tokenizer beside it."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=2, activation_function="gelu",
        bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save(folder / FILENAME)


@pytest.mark.slow
def test_finetune_starts_from_a_hugging_face_gpt2_folder_with_its_tokenizer(
    pretrained: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, pretrain_version, tokenizer_version = pretrained
    tokenizer = bpe_tokenizer()  # not the store's char tokenizer
    folder = tmp_path / "gpt2"
    save_hf_gpt2(folder, tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    inputs = {"pretrain": pretrain_version, "tokenizer": tokenizer_version}
    cfg = tiny_finetune_config(data, init_from=str(folder), max_steps=20, eval_interval=10, warmup_steps=2)
    ref = STAGE.run(root, cfg, inputs)
    store = Store(root)
    out = store.path("finetune", ref.version)
    metrics = store.manifest("finetune", ref.version)["metrics"]
    assert metrics["init"] == "hf"
    assert metrics["init_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"]
    # The imported model's shape, not the pretrain stage's, and its tokenizer, published for generate.
    model = load_model(out)
    assert (model.config.vocab_size, model.config.block_size) == (320, 64)
    assert Tokenizer.load(out / FILENAME).to_json() == tokenizer.to_json()
    assert find_tokenizer(store, "finetune", ref.version) == out / FILENAME
    # The version follows the weights' content: another file at the same path is another version.
    assert STAGE.version(cfg, inputs, STAGE.identity(cfg)) == ref.version
    save_hf_gpt2(folder, tokenizer, seed=2)
    assert STAGE.version(cfg, inputs, STAGE.identity(cfg)) != ref.version


def test_finetune_starts_from_a_nanogpt_checkpoint(pretrained: tuple[Path, str, str], tmp_path: Path) -> None:
    root, pretrain_version, tokenizer_version = pretrained
    tokenizer = bpe_tokenizer()
    torch.manual_seed(3)
    start = GPT(GPTConfig(vocab_size=320, block_size=56, n_layer=2, n_head=2, n_embd=32, bias=False))
    out_dir = tmp_path / "out-nanogpt"
    out_dir.mkdir()
    args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 56, "bias": False, "vocab_size": 320, "dropout": 0.0}
    # What nanoGPT's train.py saves: a compiled model's keys, model_args, and the run's other state.
    state = {f"_orig_mod.{k}": v for k, v in start.state_dict().items()}
    torch.save({"model": state, "model_args": args, "iter_num": 100, "config": {"dataset": "x"}}, out_dir / "ckpt.pt")
    tokenizer.save(out_dir / FILENAME)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    inputs = {"pretrain": pretrain_version, "tokenizer": tokenizer_version}
    cfg = tiny_finetune_config(data, init_from=str(out_dir / "ckpt.pt"), max_steps=10, eval_interval=10, warmup_steps=2)
    ref = STAGE.run(root, cfg, inputs)
    store = Store(root)
    metrics = store.manifest("finetune", ref.version)["metrics"]
    assert metrics["init"] == "nanogpt"
    assert metrics["init_sha256"] == hashlib.sha256((out_dir / "ckpt.pt").read_bytes()).hexdigest()
    assert load_model(store.path("finetune", ref.version)).config.block_size == 56
    assert find_tokenizer(store, "finetune", ref.version) == store.path("finetune", ref.version) / FILENAME
    # A model built from it (quantize) reads the imported tokenizer too, not the store's in its lineage.
    store.publish("quantize", "q1", lambda out: {}, params={}, inputs={"finetune": ref.version}, code_version="q")
    assert find_tokenizer(store, "quantize", "q1") == store.path("finetune", ref.version) / FILENAME
    with pytest.raises(ConfigError, match=r"finetune.init_from .*missing.pt does not exist"):
        STAGE.run(root, tiny_finetune_config(data, init_from=str(tmp_path / "missing.pt")), inputs)


def test_tokenizer_other_than_the_pretrained_one_is_refused(pretrained: tuple[Path, str, str], tmp_path: Path) -> None:
    root, pretrain_version, _ = pretrained
    other = publish_tokenizer(Store(root), char_tokenizer(), version="tok2")
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    with pytest.raises(
        ConfigError, match=f"pretrain/{pretrain_version} was built from tokenizer/tok1, not from the tokenizer/tok2"
    ):
        STAGE.run(root, tiny_finetune_config(data), {"pretrain": pretrain_version, "tokenizer": other})


# -- settings ------------------------------------------------------------------------------------------


def test_training_settings_are_declared_once_for_both_stages() -> None:
    pretrain = PretrainConfig.model_json_schema()["properties"]
    finetune = FinetuneConfig.model_json_schema()["properties"]
    bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "type")
    for name in ("batch_size", "max_steps", "learning_rate", "min_lr", "warmup_steps", "eval_steps", "beta2"):
        # One description and one set of bounds, whatever default each stage gives the field.
        assert finetune[name]["description"] == pretrain[name]["description"], name
        assert {k: finetune[name].get(k) for k in bounds} == {k: pretrain[name].get(k) for k in bounds}, name
        assert finetune[name]["description"] == TrainConfig.__pydantic_fields__[name].description
    assert pretrain["learning_rate"]["maximum"] == 1 and pretrain["learning_rate"]["exclusiveMinimum"] == 0
    # Fine-tuning's own defaults, within the same bounds, which its values are held to.
    defaults = {"max_steps": 300, "learning_rate": 3e-4, "min_lr": 3e-5, "warmup_steps": 20, "batch_size": 8}
    assert {name: finetune[name]["default"] for name in defaults} == defaults
    assert {name: pretrain[name]["default"] for name in defaults} == {
        "max_steps": 2000, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "batch_size": 12,
    }  # fmt: skip
    for name, value in (("max_steps", 0), ("learning_rate", 2.0), ("batch_size", 5000)):
        with pytest.raises(ValidationError, match=name):
            FinetuneConfig(**{name: value})
    expected = TrainConfig(**defaults, eval_interval=50, eval_steps=50, checkpoint_interval=50)
    assert FinetuneConfig().train_config() == expected
    # The UI form (every field optional) shows the same description and enforces the same bounds.
    form = PipelineOverrides.model_json_schema()["$defs"]["FinetuneConfigOverrides"]["properties"]["learning_rate"]
    assert form["description"] == pretrain["learning_rate"]["description"] and form["anyOf"][0]["maximum"] == 1
