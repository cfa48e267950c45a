"""Hugging Face GPT-2 folders and nanoGPT checkpoints: a gptflow GPT out to one, or in from either.

`export_hf(model, tokenizer_path, out_dir)` writes a folder that `transformers` loads offline with
`AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`:

    config.json               GPT2LMHeadModel, model_type gpt2, n_positions = block_size, the padded vocabulary
    model.safetensors         the weights (lm_head tied to transformer.wte, so stored once)
    tokenizer.json            the tokenizer, in the `tokenizers` library's format
    tokenizer_config.json     + special_tokens_map.json: <|endoftext|> is bos, eos (and, for BPE, unk)

`load_init(path)` reads a model to start fine-tuning from: a local Hugging Face GPT-2 folder (config.json +
model.safetensors or pytorch_model.bin + tokenizer.json) or a nanoGPT `ckpt.pt` (its `model_args` and
`model` state dict, with a tokenizer.json beside it). Nothing is unpickled: safetensors, or
`torch.load(weights_only=True)`.

What differs between the two layouts:
- HF's GPT-2 keeps c_attn, c_proj and c_fc as Conv1D, whose weight is (in, out); ours are nn.Linear,
  (out, in): those four matrices are transposed each way.
- HF's GPT-2 always has biases. A model trained with bias=False exports zero biases (the same function),
  and a folder whose biases are all zero imports as bias=False.
- Our MLP uses the exact (erf) GELU, HF's "gelu". GPT-2's own checkpoints use "gelu_new", the tanh
  approximation: they import all the same (as nanoGPT's from_pretrained does), the two functions being
  at most 5e-4 apart, and a warning says so.
- Our tokenizers end documents with <|endoftext|> and encode that string inside a text as plain text;
  the exported tokenizer_config.json sets `split_special_tokens` so that AutoTokenizer does the same.
"""

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from model.gpt import GPT, GPTConfig
from model.tokenizer import EOT, FILENAME, UNKNOWN_CHAR, CharTokenizer, Tokenizer
from storage.errors import ConfigError, DataIntegrityError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
NANOGPT_CKPT = "ckpt.pt"  # the file name nanoGPT's train.py writes into its out_dir

_logger = logging.getLogger(__name__)

# Conv1D in HF's GPT-2: weight stored (in, out), the transpose of nn.Linear's (out, in).
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Every module of a block that has a bias in GPT-2 (LayerNorms and Linears alike).
_BLOCK_BIASED = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
# The causal-mask buffers of nanoGPT (without flash attention) and of older HF GPT-2 files: not weights.
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
# Options GPTConfig may carry that GPT-2 does not have, with the value that is GPT-2 (read with getattr, so
# a config without the field is GPT-2 there).
_GPT2_VALUES = {"rope": False, "qk_norm": False, "mlp": "gelu", "tie_embeddings": True}
# transformers' GPT2Config defaults, for keys a config.json leaves out (the hub's gpt2 file omits several).
_HF_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
_EXACT_GELU = ("gelu", "gelu_python")  # erf GELU, as nn.GELU()
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's tanh approximation, within 5e-4 of it
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our blocks use (GPT-2's value too)
# Encoded by our tokenizer and the exported one to check they agree (a char tokenizer adds its alphabet).
_PROBE_TEXT = "The quick brown fox, 1234 \u00fcber caf\u00e9 \u2013 \U0001f600!\n\t<|endoftext|>  end"


@dataclass(frozen=True)
class InitModel:
    """A model to start fine-tuning from (`load_init`): the GPT on the CPU in eval mode, the tokenizer it
    was trained with, the sha256 of the weights file it was read from, and where it came from: "hf" (a
    Hugging Face GPT-2 folder) or "nanogpt" (a nanoGPT ckpt.pt)."""

    model: GPT
    tokenizer: Tokenizer
    sha256: str
    kind: str


# -- export ------------------------------------------------------------------------------------------


def export_hf(model: GPT, tokenizer_path: Path, out_dir: Path) -> None:
    """Write `out_dir` as a Hugging Face GPT-2 folder of `model` and its tokenizer (file, or folder holding
    tokenizer.json). The folder is built beside `out_dir` and renamed into place: a failed export leaves
    nothing. Refused with a ConfigError: a model with an option GPT-2 lacks, an `out_dir` that is not empty."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    config = model.config
    for name, gpt2_value in _GPT2_VALUES.items():
        value = getattr(config, name, gpt2_value)
        if value != gpt2_value:
            raise ConfigError(f"cannot export to GPT-2: the model has {name}={value!r} (GPT-2: {gpt2_value!r})")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: exists and is not an empty folder; export into a new one")
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / FILENAME
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"{tokenizer_path}: {tokenizer.vocab_size} ids, more than the model's vocab_size {config.vocab_size}"
        )
    tensors = _hf_state_dict(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        dtype = str(tensors["transformer.wte.weight"].dtype).removeprefix("torch.")
        _write_json(tmp / CONFIG, _hf_config(config, tokenizer.eot_id, dtype))
        _write_tokenizer(tokenizer, tokenizer_path, tmp, config.block_size)
        try:
            os.replace(tmp, out_dir)  # replaces an empty folder; fails if one appeared non-empty meanwhile
        except OSError as exc:
            raise ConfigError(f"{out_dir}: could not be replaced by the export ({exc.strerror})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under HF GPT-2's names: Conv1D matrices transposed, absent biases as zeros."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise ConfigError("cannot export to GPT-2: lm_head.weight is not tied to transformer.wte.weight")
    expected = set(_our_names(model.config.n_layer, bias=model.config.bias)) | {"lm_head.weight"}
    extra = sorted(set(state) - expected)
    if extra:
        raise ConfigError(f"cannot export to GPT-2: parameter {extra[0]} has no GPT-2 counterpart")
    out: dict[str, torch.Tensor] = {}
    for name in _our_names(model.config.n_layer, bias=True):
        if name in state:
            tensor = state[name]
            if _is_conv1d(name):
                tensor = tensor.t()  # (out, in) -> Conv1D's (in, out)
        else:  # a bias of a bias=False model: zeros give the same function
            weight = state[name.removesuffix(".bias") + ".weight"]
            length = weight.shape[0]  # a Linear's out features, or a LayerNorm's width
            tensor = torch.zeros(length, dtype=weight.dtype)
        out[name] = tensor.contiguous()  # safetensors stores contiguous tensors only
    return out


def _hf_config(config: GPTConfig, eot_id: int, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,  # the padded size: the embedding's rows, not the tokenizer's ids
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as our MLP
        "activation_function": "gelu",  # transformers' "gelu" is the exact erf GELU of nn.GELU()
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": _LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": dtype,
    }


def _write_tokenizer(tokenizer: Tokenizer, source: Path, folder: Path, block_size: int) -> None:
    """tokenizer.json in the `tokenizers` format (a BPE file as it is; a char vocabulary as a WordLevel
    model over single characters), checked to encode as ours does, plus the transformers configs."""
    if isinstance(tokenizer, CharTokenizer):
        content, unk = _char_as_word_level(tokenizer)
    else:
        content, unk = source.read_text(encoding="utf-8"), EOT  # GPT-2's unk is <|endoftext|> too
    backend = HFTokenizer.from_str(content)
    backend.encode_special_tokens = True  # as split_special_tokens below
    probe = _PROBE_TEXT + "".join(getattr(tokenizer, "chars", []))
    if backend.encode(probe, add_special_tokens=False).ids != tokenizer.encode(probe):
        raise DataIntegrityError(f"{source}: the exported tokenizer.json does not encode as this tokenizer does")
    (folder / FILENAME).write_text(content, encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": unk}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            # The generic class loads tokenizer.json as it is; GPT2Tokenizer would rebuild a BPE pipeline.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": block_size,
            "split_special_tokens": True,  # "<|endoftext|>" inside a text is text, as in our token files
            "clean_up_tokenization_spaces": False,  # decode returns the text, spaces as they were
        },
    )


def _char_as_word_level(tokenizer: CharTokenizer) -> tuple[str, str]:
    """(tokenizer.json, unk token) of a char tokenizer: each character is a pre-token looked up in a
    WordLevel vocabulary with our ids; an unknown character gets the unknown id."""
    # The unknown id decodes as U+FFFD, unless that character is in the vocabulary with an id of its own.
    unk = "<|unk|>" if UNKNOWN_CHAR in tokenizer.chars else UNKNOWN_CHAR
    vocab = {ch: i for i, ch in enumerate(tokenizer.chars)} | {EOT: tokenizer.eot_id, unk: tokenizer.unk_id}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per code point
    backend.decoder = decoders.Fuse()  # characters joined with nothing between them
    backend.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return backend.to_str(pretty=False), unk


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- import ------------------------------------------------------------------------------------------


def load_init(path: Path) -> InitModel:
    """The GPT and tokenizer stored at `path`, to start fine-tuning from.

    `path` is a Hugging Face GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, and
    tokenizer.json), or a nanoGPT checkpoint: a ckpt.pt file, or the folder holding one, with the
    tokenizer.json it was trained with beside it. Errors are one line naming the file at fault: a
    DataIntegrityError for a missing, truncated or inconsistent file, a ConfigError for a model that is
    not GPT-2 (another model_type, options our GPT lacks).
    """
    path = Path(path)
    if path.is_dir() and (path / CONFIG).is_file():
        return _load_hf_folder(path)
    if path.is_dir() and (path / NANOGPT_CKPT).is_file():
        return _load_nanogpt(path / NANOGPT_CKPT)
    if path.is_file():
        return _load_nanogpt(path)
    if path.is_dir():
        raise DataIntegrityError(f"{path}: neither a Hugging Face folder ({CONFIG}) nor a nanoGPT {NANOGPT_CKPT}")
    raise DataIntegrityError(f"{path}: does not exist")


def _load_hf_folder(folder: Path) -> InitModel:
    config_path = folder / CONFIG
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataIntegrityError(f"{config_path}: not a JSON config ({exc})") from exc
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        found = hf.get("model_type") if isinstance(hf, dict) else None
        raise ConfigError(f"{config_path}: model_type {found!r} is not 'gpt2' (only GPT-2 models load)")
    hf = _HF_GPT2_DEFAULTS | hf
    weights = next((folder / n for n in (SAFETENSORS, PYTORCH_BIN) if (folder / n).is_file()), None)
    if weights is None:
        raise DataIntegrityError(f"{folder}: no {SAFETENSORS} or {PYTORCH_BIN} beside {CONFIG}")
    state = _read_hf_weights(weights)
    # GPT2LMHeadModel files name keys "transformer.*", GPT2Model ones (the hub's gpt2) leave the prefix out.
    state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _MASK_BUFFER.match(k)}
    head = state.pop("lm_head.weight", None)
    n_layer = _int_field(hf, "n_layer", config_path)
    names = _our_names(n_layer, bias=True)
    missing = [name for name in names if name not in state]
    if missing:
        raise DataIntegrityError(f"{weights}: no tensor {missing[0]} ({len(missing)} of GPT-2's missing)")
    extra = sorted(set(state) - set(names))
    if extra:
        raise DataIntegrityError(f"{weights}: tensor {extra[0]} is not part of a GPT-2 model")
    ours = {name: state[name].t() if _is_conv1d(name) else state[name] for name in names}
    # All-zero biases are a model trained without them (our bias=False export): the same function.
    bias = any(bool(t.any()) for name, t in ours.items() if name.endswith(".bias"))
    if not bias:
        ours = {name: t for name, t in ours.items() if not name.endswith(".bias")}
    config = _gpt_config(_config_values_from_hf(hf, config_path) | {"bias": bias}, config_path)
    model = _build(config, ours if head is None else {**ours, "lm_head.weight": head}, weights, config_path)
    return InitModel(model, _read_tokenizer(folder / FILENAME, config), _sha256(weights), "hf")


def _config_values_from_hf(hf: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """GPTConfig values of a GPT-2 config.json; a ConfigError listing whatever our GPT cannot represent."""
    n_embd = _int_field(hf, "n_embd", config_path)
    activation = hf["activation_function"]
    problems = []
    if activation not in _EXACT_GELU + _TANH_GELU:
        problems.append(f"activation_function {activation!r} (ours: exact GELU)")
    if hf["n_inner"] not in (None, 4 * n_embd):
        problems.append(f"n_inner {hf['n_inner']} (ours: 4 * n_embd = {4 * n_embd})")
    if not isinstance(hf["layer_norm_epsilon"], int | float) or abs(hf["layer_norm_epsilon"] - _LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']} (ours: {_LAYER_NORM_EPS})")
    for key, ours in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if hf[key] != ours:
            problems.append(f"{key}={hf[key]!r} (ours: {ours!r})")
    if problems:
        raise ConfigError(f"{config_path}: not representable as a gptflow GPT: {'; '.join(problems)}")
    if activation in _TANH_GELU:
        _logger.warning(
            "%s: activation %s is the tanh approximation of GELU; the imported GPT computes the exact GELU "
            "(at most 5e-4 apart per activation)",
            config_path,
            activation,
        )
    return {
        "vocab_size": _int_field(hf, "vocab_size", config_path),
        "block_size": _int_field(hf, "n_positions", config_path),
        "n_layer": _int_field(hf, "n_layer", config_path),
        "n_head": _int_field(hf, "n_head", config_path),
        "n_embd": n_embd,
        # One rate for embeddings, attention and residuals in our GPT: the residual one stands for all.
        "dropout": float(hf["resid_pdrop"]),
    }


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name == SAFETENSORS:
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise DataIntegrityError(f"{path}: cannot be read as weights ({_first_line(exc)})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataIntegrityError(f"{path}: not a state dict of tensors")
    return state


def _load_nanogpt(path: Path) -> InitModel:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise DataIntegrityError(f"{path}: cannot be read as a nanoGPT checkpoint ({_first_line(exc)})") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict) or "model" not in ckpt:
        raise DataIntegrityError(f"{path}: not a nanoGPT checkpoint (no model_args and model)")
    args = ckpt["model_args"]
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"{path}: model_args {unknown[0]!r} is not an option of gptflow's GPT")
    config = _gpt_config(args, path)
    raw = ckpt["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DataIntegrityError(f"{path}: its model entry is not a state dict of tensors")
    # torch.compile'd models save keys prefixed "_orig_mod." (nanoGPT's train.py strips them; forks may not).
    state = {k.removeprefix("_orig_mod."): v for k, v in raw.items()}
    state = {k: v for k, v in state.items() if not _MASK_BUFFER.match(k)}
    model = _build(config, state, path, path)
    return InitModel(model, _read_tokenizer(path.parent / FILENAME, config), _sha256(path), "nanogpt")


# -- shared ------------------------------------------------------------------------------------------


def _our_names(n_layer: int, *, bias: bool) -> list[str]:
    """Our parameter names in GPT-2's order, lm_head left out (it is the token embedding)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for module in _BLOCK_BIASED:
            names.append(f"transformer.h.{i}.{module}.weight")
            if bias:
                names.append(f"transformer.h.{i}.{module}.bias")
    names += ["transformer.ln_f.weight"] + (["transformer.ln_f.bias"] if bias else [])
    return names


def _is_conv1d(name: str) -> bool:
    return name.endswith(".weight") and name.removesuffix(".weight").split(".", 3)[-1] in _CONV1D


def _gpt_config(values: dict[str, Any], source: Path) -> GPTConfig:
    try:
        return GPTConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {_first_line(exc)}") from exc


def _build(config: GPTConfig, state: dict[str, torch.Tensor], weights: Path, config_source: Path) -> GPT:
    state = dict(state)
    wte, head = state.get("transformer.wte.weight"), state.get("lm_head.weight")
    if getattr(config, "tie_embeddings", True) and wte is not None:
        if head is not None and not torch.equal(wte, head):
            raise ConfigError(f"{weights}: lm_head.weight differs from transformer.wte.weight (an untied head)")
        state["lm_head.weight"] = wte  # tied: one matrix, stored once or twice
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # load_state_dict's first line only says that there are errors; the next one says which.
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise DataIntegrityError(f"{weights}: does not match {config_source}: {detail[:300]}") from exc
    return model.eval()


def _read_tokenizer(path: Path, config: GPTConfig) -> Tokenizer:
    """Our tokenizer from a tokenizer.json: a BPE or char file of ours, or a char vocabulary that
    export_hf wrote as a WordLevel model."""
    if not path.is_file():
        raise DataIntegrityError(f"{path}: no tokenizer file (the model's own tokenizer belongs there)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataIntegrityError(f"{path}: not a tokenizer file ({exc})") from exc
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("type") == "WordLevel":
        tokenizer: Tokenizer = _char_from_word_level(model, path)
    else:
        tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise DataIntegrityError(
            f"{path}: {tokenizer.vocab_size} ids, more than the model's vocab_size {config.vocab_size}"
        )
    return tokenizer


def _char_from_word_level(model: dict[str, Any], path: Path) -> CharTokenizer:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise DataIntegrityError(f"{path}: WordLevel model without a vocabulary")
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    tokens = [token for token, _ in by_id]
    chars = tokens[:-2]
    layout = [i for _, i in by_id] == list(range(len(by_id))) and tokens[-2:] == [EOT, model.get("unk_token")]
    if not layout or not all(len(ch) == 1 for ch in chars) or sorted(set(chars)) != chars:
        raise DataIntegrityError(f"{path}: a WordLevel vocabulary that is not a gptflow char tokenizer")
    return CharTokenizer(chars)


def _int_field(hf: dict[str, Any], key: str, config_path: Path) -> int:
    value = hf[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{config_path}: {key} must be an integer, got {value!r}")
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
