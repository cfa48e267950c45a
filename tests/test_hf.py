"""Hugging Face GPT-2 folders and nanoGPT checkpoints: what transformers makes of an export, and what
load_init makes of their files. Everything offline: a test that reached for the network would fail."""

import hashlib
import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from builders import publish_tokens

from flows.cli import main
from model.checkpoint import load_model, save_model
from model.gpt import GPT, GPTConfig
from model.hf import export_hf, load_init
from model.quantize import load_quantized, save_quantized
from model.tokenizer import EOT, FILENAME, Tokenizer, train_bpe, train_char
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store

TEXT = (
    "The quick brown fox jumps over the lazy dog. A tokenizer learns merges from text like this one.\n"
    "Numbers 0123456789, caf\u00e9 \u00fcber na\u00efve \u2013 and an emoji \U0001f600 at the end.\n"
)
# What users feed in: unseen words, a literal "<|endoftext|>" (plain text, not a boundary), odd spacing.
SAMPLE = "Unseen words: zebra quokka!  The <|endoftext|> stays text.\n\tcaf\u00e9 \U0001f600 \u00e9t\u00e9 42"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    return train_bpe([TEXT] * 20, vocab_size=300).save(tmp_path_factory.mktemp("bpe") / FILENAME)


@pytest.fixture(scope="module")
def char_path(tmp_path_factory) -> Path:
    return train_char([TEXT]).save(tmp_path_factory.mktemp("char") / FILENAME)


@pytest.fixture
def transformers(monkeypatch):
    """transformers, imported and used with the hub switched off and every internet connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted: {address}")
        return real_connect(sock, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    import transformers

    return transformers


def scrambled_gpt(vocab_size: int, *, bias: bool = True, seed: int = 0, block_size: int = 16) -> GPT:
    """A small GPT whose every parameter (biases and LayerNorm gains too) is random and far from its
    initial value: a weight mapped to the wrong place, or a transpose missed, changes the logits a lot."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, bias=bias))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


def padded(tokenizer: Tokenizer) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 64, as the pretrain stage pads it."""
    return -(-tokenizer.vocab_size // 64) * 64


def our_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(idx, idx)  # with targets: the logits of every position
    return logits[0]  # (T, vocab)


def ids_of(tokenizer: Tokenizer, text: str, block_size: int) -> list[int]:
    ids = tokenizer.encode(text)[:block_size]
    assert len(ids) == block_size  # the whole context is compared, not only a few positions
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False])
def test_transformers_computes_the_same_logits_as_the_exported_model(tmp_path, transformers, bpe_path, bias):
    tokenizer = Tokenizer.load(bpe_path)
    model = scrambled_gpt(padded(tokenizer), bias=bias)
    export_hf(model, bpe_path, tmp_path / "hf")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    assert hf_model.config.vocab_size == model.config.vocab_size > tokenizer.vocab_size  # the padded vocabulary
    assert hf_model.config.eos_token_id == hf_model.config.bos_token_id == tokenizer.eot_id
    ids = ids_of(tokenizer, TEXT, model.config.block_size)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]  # (T, vocab)
    ours = our_logits(model, ids)
    assert ours.abs().max() > 1.0  # logits far from uniform: a misplaced weight cannot hide
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_autotokenizer_gives_our_ids_and_text(tmp_path, transformers, bpe_path, char_path, kind):
    path = bpe_path if kind == "bpe" else char_path
    tokenizer = Tokenizer.load(path)
    export_hf(scrambled_gpt(padded(tokenizer)), path, tmp_path / "hf")

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer.encode(SAMPLE)
    assert hf_tokenizer(SAMPLE)["input_ids"] == ids
    assert EOT in SAMPLE and tokenizer.eot_id not in ids  # the literal stays text on both sides
    assert kind == "bpe" or tokenizer.unk_id in ids  # characters the char vocabulary lacks: the unknown id
    assert hf_tokenizer.decode(ids + [tokenizer.eot_id]) == tokenizer.decode(ids + [tokenizer.eot_id])
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id


@pytest.mark.parametrize(("bias", "kind"), [(True, "bpe"), (False, "bpe"), (True, "char")])
def test_export_then_load_init_gives_back_the_same_model_and_tokenizer(tmp_path, bpe_path, char_path, bias, kind):
    path = bpe_path if kind == "bpe" else char_path
    tokenizer = Tokenizer.load(path)
    model = scrambled_gpt(padded(tokenizer), bias=bias)
    model.config.dropout = 0.1  # the config, all of it, comes back
    export_hf(model, path, tmp_path / "hf")

    init = load_init(tmp_path / "hf")
    assert init.kind == "hf"
    assert init.sha256 == hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert init.model.config == model.config
    assert init.model.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(init.model.state_dict()[name], tensor), name
    assert init.tokenizer.kind == kind
    assert init.tokenizer.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert init.tokenizer.decode(tokenizer.encode(SAMPLE)) == tokenizer.decode(tokenizer.encode(SAMPLE))


def hf_gpt2(transformers, vocab_size: int, **config) -> "torch.nn.Module":
    """A GPT-2 made by transformers itself, its parameters (zero-initialised biases included) randomised."""
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=2, **config)
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.slow
def test_a_gpt2_saved_by_transformers_loads_with_its_logits(tmp_path, transformers, bpe_path):
    tokenizer = Tokenizer.load(bpe_path)
    hf_model = hf_gpt2(transformers, padded(tokenizer), activation_function="gelu")
    hf_model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save(tmp_path / "gpt2" / FILENAME)

    init = load_init(tmp_path / "gpt2")
    assert init.kind == "hf" and init.model.config.bias  # transformers' biases, randomised, are kept
    ids = ids_of(tokenizer, TEXT, 16)
    torch.testing.assert_close(our_logits(init.model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_hub_layout_with_gpt2s_tanh_gelu_loads_close_to_its_logits(tmp_path, transformers, bpe_path, caplog):
    """GPT-2's checkpoints: GPT2Model key names (no "transformer." prefix), the causal-mask buffers, a
    pytorch_model.bin, and GPT-2's own tanh GELU, which our exact GELU replaces with a warning."""
    tokenizer = Tokenizer.load(bpe_path)
    hf_model = hf_gpt2(transformers, padded(tokenizer))  # activation_function: GPT2Config's "gelu_new"
    folder = tmp_path / "gpt2"
    folder.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    hf_model.config.to_json_file(folder / "config.json")
    tokenizer.save(folder / FILENAME)

    with caplog.at_level(logging.WARNING, logger="model.hf"):
        init = load_init(folder)
    assert "gelu_new" in caplog.text
    assert init.sha256 == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    ids = ids_of(tokenizer, TEXT, 16)
    ours, theirs = our_logits(init.model, ids), hf_logits(hf_model, ids)
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)  # measured 2.5e-4: GELUs up to 5e-4 apart


def nanogpt_checkpoint(model: GPT) -> dict:
    """What nanoGPT's train.py saves: a torch.compile'd model's keys, its causal-mask buffers, the
    optimizer state and run settings beside the model."""
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    size = model.config.block_size
    for i in range(model.config.n_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(size, size)).view(1, 1, size, size)
    # AdamW's state_dict layout (int keys, tuples, tensors), written out: building a real optimizer costs
    # seconds of torch._dynamo imports.
    params = list(model.parameters())
    optimizer = {
        "state": {i: {"step": torch.tensor(5000.0), "exp_avg": torch.zeros_like(p)} for i, p in enumerate(params)},
        "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": list(range(len(params)))}],
    }
    args = {k: v for k, v in model.config.to_dict().items() if k in ("n_layer", "n_head", "n_embd", "block_size")}
    return {
        "model": state,
        "optimizer": optimizer,
        "model_args": {**args, "bias": model.config.bias, "vocab_size": model.config.vocab_size, "dropout": 0.0},
        "iter_num": 5000,
        "best_val_loss": torch.tensor(1.47),
        "config": {"dataset": "shakespeare_char", "compile": True, "learning_rate": 1e-3},
    }


@pytest.mark.parametrize("bias", [True, False])
def test_a_nanogpt_checkpoint_loads_with_its_weights_and_tokenizer(tmp_path, char_path, bias):
    tokenizer = Tokenizer.load(char_path)
    model = scrambled_gpt(padded(tokenizer), bias=bias)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "out-shakespeare-char"
    out.mkdir()
    torch.save(nanogpt_checkpoint(model), out / "ckpt.pt")
    tokenizer.save(out / FILENAME)

    for path in (out, out / "ckpt.pt"):  # nanoGPT's out_dir, or the file itself
        init = load_init(path)
        assert init.kind == "nanogpt"
        assert init.sha256 == hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest()
        assert init.model.config.bias == bias
        assert init.model.state_dict().keys() == expected.keys()
        assert all(torch.equal(init.model.state_dict()[k], v) for k, v in expected.items())
        assert init.tokenizer.encode(SAMPLE) == tokenizer.encode(SAMPLE)


class _Payload:
    """A pickled object that would leave a file behind if anything unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_checkpoint_with_pickled_objects_is_refused_without_running_them(tmp_path, char_path):
    model = scrambled_gpt(padded(Tokenizer.load(char_path)))
    marker = tmp_path / "code-ran"
    torch.save({**nanogpt_checkpoint(model), "config": _Payload(str(marker))}, tmp_path / "ckpt.pt")
    Tokenizer.load(char_path).save(tmp_path / FILENAME)

    with pytest.raises(DataIntegrityError, match="ckpt.pt: cannot be read as a nanoGPT checkpoint"):
        load_init(tmp_path / "ckpt.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("option", "value"), [("rope", True), ("qk_norm", True), ("mlp", "relu2"), ("tie_embeddings", False)]
)
def test_export_refuses_options_gpt2_does_not_have(tmp_path, bpe_path, option, value):
    model = scrambled_gpt(padded(Tokenizer.load(bpe_path)))
    # Set on the config object, so that the check is exercised whether or not GPTConfig has the field yet.
    setattr(model.config, option, value)
    with pytest.raises(ConfigError, match=f"has {option}={value!r}"):
        export_hf(model, bpe_path, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def test_export_refuses_a_folder_that_is_not_empty_and_leaves_it_alone(tmp_path, bpe_path):
    model = scrambled_gpt(padded(Tokenizer.load(bpe_path)))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"hf: exists and is not an empty folder"):
        export_hf(model, bpe_path, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    (tmp_path / "empty").mkdir()  # an empty folder is filled
    export_hf(model, bpe_path, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_export_refuses_a_tokenizer_with_more_ids_than_the_model_leaving_nothing(tmp_path, bpe_path):
    model = scrambled_gpt(Tokenizer.load(bpe_path).vocab_size - 1)
    with pytest.raises(ConfigError, match="more than the model's vocab_size"):
        export_hf(model, bpe_path, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def exported(tmp_path, bpe_path) -> Path:
    export_hf(scrambled_gpt(padded(Tokenizer.load(bpe_path))), bpe_path, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not 'gpt2'"),
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"n_inner": 64}, "n_inner 64 (ours: 4 * n_embd = 128)"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ],
)
def test_load_init_refuses_models_that_are_not_our_gpt2(exported, changes, message):
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ConfigError, match="config.json: ") as info:
        load_init(exported)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_load_init_names_the_missing_tokenizer(exported, tmp_path, char_path):
    (exported / FILENAME).unlink()
    with pytest.raises(DataIntegrityError, match=f"{exported / FILENAME}: no tokenizer file"):
        load_init(exported)

    out = tmp_path / "out"
    out.mkdir()
    torch.save(nanogpt_checkpoint(scrambled_gpt(padded(Tokenizer.load(char_path)))), out / "ckpt.pt")
    with pytest.raises(DataIntegrityError, match=f"{out / FILENAME}: no tokenizer file"):
        load_init(out / "ckpt.pt")


def test_load_init_names_a_truncated_weights_file(exported):
    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DataIntegrityError, match="model.safetensors: cannot be read as weights"):
        load_init(exported)


def test_load_init_names_weights_that_do_not_match_the_config(exported):
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "n_positions": 32}))  # the file has 16 rows
    with pytest.raises(DataIntegrityError, match="model.safetensors: does not match .*config.json: size mismatch"):
        load_init(exported)


def publish_model_store(root: Path, tokenizer_path: Path) -> tuple[str, GPT]:
    """A store with a tokenizer, tokens built with it and a pretrain version on them; returns the
    pretrain version and its model."""
    store = Store(root)
    tokenizer = Tokenizer.load(tokenizer_path)

    def save_tokenizer(out: Path) -> None:
        tokenizer.save(out / FILENAME)

    store.publish("tokenizer", "tk1", save_tokenizer, params={}, inputs={}, code_version="t")
    ids = tokenizer.encode(TEXT)
    tokens = publish_tokens(
        root, ids, ids, vocab_size=tokenizer.vocab_size, eot_token=tokenizer.eot_id, inputs={"tokenizer": "tk1"}
    )
    model = scrambled_gpt(padded(tokenizer))
    store.publish(
        "pretrain",
        "pre0123abc",
        lambda out: save_model(out, model),
        params={},
        inputs={"tokens": tokens},
        code_version="t",
    )
    return "pre0123abc", model


def test_cli_export_writes_a_stored_model_and_its_tokenizer(tmp_path, bpe_path, capsys):
    root = tmp_path / "store"
    version, model = publish_model_store(root, bpe_path)

    assert main(["export", "--storage", str(root), version[:6], str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == f"exported pretrain/{version} to {tmp_path / 'hf'}"
    init = load_init(tmp_path / "hf")
    stored = load_model(Store(root).path("pretrain", version))
    assert all(torch.equal(init.model.state_dict()[k], v) for k, v in stored.state_dict().items())
    assert init.tokenizer.to_json() == Tokenizer.load(bpe_path).to_json()  # found through the lineage


def test_cli_exports_a_quantized_model_dequantized_and_refuses_a_non_model(tmp_path, bpe_path, capsys):
    root = tmp_path / "store"
    version, model = publish_model_store(root, bpe_path)
    store = Store(root)

    def quantize(out: Path) -> None:
        save_quantized(out, model, bits=8)

    store.publish("quantize", "q8", quantize, params={}, inputs={"pretrain": version}, code_version="t")

    assert main(["export", "--storage", str(root), "q8", str(tmp_path / "hf")]) == 0
    assert "dequantized" in capsys.readouterr().out
    dequantized = load_quantized(store.path("quantize", "q8"))
    init = load_init(tmp_path / "hf")
    assert all(torch.equal(init.model.state_dict()[k], v) for k, v in dequantized.state_dict().items())
    assert not torch.equal(init.model.transformer.wte.weight, model.transformer.wte.weight)  # int8, not the float

    assert main(["export", "--storage", str(root), "tk1", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["gptflow: error: tokenizer/tk1 is not a model (pick a version of pretrain, finetune, quantize)"]
    assert not (tmp_path / "other").exists()
