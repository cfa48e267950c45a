"""Weight quantization of a GPT: int8 per output channel, int4 per group, stored as plain tensors.

The file is a dict of tensors, strings and ints, loadable with `torch.load(..., weights_only=True)` (no
pickled modules):

    {"format": FORMAT, "bits": 8 | 4, "group_size": int (int4 only, else 0),
     "quantized": {name: {"qweight": int8 | uint8, "scales": float32, "shape": [out, in]}},
     "float": {name: tensor},          # 1-D tensors (biases, LayerNorm gains) as they are
     "aliases": {name: stored_name}}   # tied weights (lm_head = token embedding) are stored once

int8: symmetric, one fp32 scale per output row (rows of an embedding are token vectors, rows of a Linear
weight are output channels), q = round(w / s) in [-127, 127], s = max|row| / 127, so |w - q*s| <= s/2.
int4: symmetric, one fp32 scale per group of `group_size` consecutive inputs of a row, q in [-7, 7]
(s = max|group| / 7), stored as q + 8 in a nibble, two per byte (even index in the low nibble).

Evaluation uses the dequantized float model (`load_quantized`): the quality of the stored weights, on any
device. Fast CPU inference uses `to_dynamic_int8`, PyTorch's dynamic int8 Linear kernels (x86 engine):
1.5-1.8x fp32 for a 6-layer, 384-wide GPT on 2 cores, no gain at 4 layers x 128 wide, where the matmuls
are too small to dominate (benchmarks/quantize_bench.py).
No int4 CPU kernel is used: torchao's int4 paths need CUDA.
"""

import copy
import json
import pickle
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from model.checkpoint import CONFIG, atomic_torch_save, load_config
from model.gpt import GPT
from storage.errors import DataIntegrityError

FORMAT = "gptflow-quantized-v1"
QUANTIZED_FILES = {8: "model_int8.pt", 4: "model_int4.pt"}
INT4_GROUP_SIZES = (32, 64, 128)  # llama.cpp's Q4_0 uses 32; GPTQ and AWQ default to 128
_INT8_MAX = 127
_INT4_MAX = 7
_INT4_OFFSET = 8  # a nibble holds 0..15: q in [-7, 7] is stored as q + 8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (qweight int8 (out, in), scales fp32 (out,))."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (out,)
    # An all-zero row would give scale 0 and 0/0; any positive scale stores it exactly as zeros.
    scales = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)  # (out, in)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]  # (out, in)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4: (packed uint8 (out, padded_in / 2), scales fp32 (out, padded_in / group))."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    w = weight.detach().float()
    out_features, in_features = w.shape
    # A row narrower than a group is one group (rounded up to even, for packing) rather than mostly padding.
    group_size = min(group_size, in_features + in_features % 2)
    pad = -in_features % group_size  # zero-pad each row to whole groups; zeros quantize exactly
    w = nn.functional.pad(w, (0, pad))  # (out, padded_in)
    groups = w.view(out_features, -1, group_size)  # (out, n_groups, group)
    amax = groups.abs().amax(dim=2)  # (out, n_groups)
    scales = torch.where(amax > 0, amax / _INT4_MAX, torch.ones_like(amax))
    q = torch.round(groups / scales[:, :, None]).clamp(-_INT4_MAX, _INT4_MAX).to(torch.int16) + _INT4_OFFSET
    q = q.view(out_features, -1, 2)  # (out, padded_in / 2, 2): neighbours share a byte
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).to(torch.uint8)  # (out, padded_in / 2)
    return packed, scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out_features, in_features = shape
    p = packed.to(torch.int16)
    q = torch.stack((p & 0xF, p >> 4), dim=2).view(out_features, -1) - _INT4_OFFSET  # (out, padded_in)
    group_size = q.shape[1] // scales.shape[1]
    w = q.view(out_features, -1, group_size).float() * scales.float()[:, :, None]  # (out, n_groups, group)
    return w.view(out_features, -1)[:, :in_features]  # (out, in): padding dropped


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Tied weights share storage in a live model; after a copy to CPU they are still equal value for value."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def quantize_state_dict(state: dict[str, torch.Tensor], bits: int = 8, group_size: int = 64) -> dict:
    """Quantize every 2-D floating-point tensor of a state dict; other tensors are kept as they are."""
    if bits not in QUANTIZED_FILES:
        raise ValueError(f"bits must be one of {sorted(QUANTIZED_FILES)}, got {bits}")
    quantized: dict[str, dict] = {}
    floats: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: list[tuple[str, torch.Tensor]] = []  # 2-D tensors already quantized, to find ties
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.dim() != 2 or not tensor.is_floating_point():
            floats[name] = tensor.clone()
            continue
        tied_to = next((other for other, seen in stored if _same_tensor(tensor, seen)), None)
        if tied_to is not None:
            aliases[name] = tied_to
            continue
        stored.append((name, tensor))
        if bits == 8:
            qweight, scales = quantize_int8(tensor)
        else:
            qweight, scales = quantize_int4(tensor, group_size)
        quantized[name] = {"qweight": qweight, "scales": scales, "shape": list(tensor.shape)}
    return {
        "format": FORMAT,
        "bits": bits,
        "group_size": group_size if bits == 4 else 0,
        "quantized": quantized,
        "float": floats,
        "aliases": aliases,
    }


def dequantize_state_dict(qstate: dict) -> dict[str, torch.Tensor]:
    """The float32 state dict a quantized dict stands for (tied names get the same tensor)."""
    if not isinstance(qstate, dict) or qstate.get("format") != FORMAT:
        found = qstate.get("format") if isinstance(qstate, dict) else type(qstate).__name__
        raise DataIntegrityError(f"not a {FORMAT} weights dict (format {found!r})")
    state: dict[str, torch.Tensor] = dict(qstate["float"])
    for name, entry in qstate["quantized"].items():
        if qstate["bits"] == 8:
            state[name] = dequantize_int8(entry["qweight"], entry["scales"])
        else:
            state[name] = dequantize_int4(entry["qweight"], entry["scales"], tuple(entry["shape"]))
    for name, target in qstate["aliases"].items():
        if target not in state:
            raise DataIntegrityError(f"quantized weights: {name} is tied to {target}, which is missing")
        state[name] = state[target]
    return state


def quantized_bytes(qstate: dict) -> int:
    """Bytes of tensor data in a quantized dict (the file adds a small container overhead)."""
    total = sum(t.numel() * t.element_size() for t in qstate["float"].values())
    for entry in qstate["quantized"].values():
        total += sum(entry[k].numel() * entry[k].element_size() for k in ("qweight", "scales"))
    return total


def save_quantized(folder: Path, model: GPT, bits: int = 8, group_size: int = 64) -> Path:
    """Write `model_int8.pt` (or `model_int4.pt`) and `model_config.json` into `folder`; returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes keys; store plain ones
    qstate = quantize_state_dict(model.state_dict(), bits=bits, group_size=group_size)
    path = folder / QUANTIZED_FILES[bits]
    atomic_torch_save(qstate, path)
    (folder / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def quantized_file(folder: Path) -> Path:
    """The one quantized weights file in `folder`."""
    found = [Path(folder) / name for name in QUANTIZED_FILES.values() if (Path(folder) / name).is_file()]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataIntegrityError(f"{folder}: {what} quantized weights file ({', '.join(QUANTIZED_FILES.values())})")
    return found[0]


def load_quantized(folder: Path, device: str | torch.device = "cpu") -> GPT:
    """The dequantized float GPT stored in `folder` (weights only: no pickled code runs)."""
    path = quantized_file(folder)
    model = GPT(load_config(folder))
    try:
        qstate = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise DataIntegrityError(f"{path}: cannot be read as quantized weights ({exc})") from exc
    try:
        model.load_state_dict(dequantize_state_dict(qstate))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataIntegrityError(f"{path}: does not match {folder / CONFIG}: {first}") from exc
    return model.to(device).eval()


def to_dynamic_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` whose Linear layers (lm_head included) run PyTorch's dynamic int8 kernels.

    Weights are int8 per output channel; activations are quantized per batch on the fly. The embeddings
    stay float: a lookup gains nothing from int8. torch.ao.quantization is deprecated but still ships, and
    its kernels were the only int8 path faster than fp32 on a CPU without AVX-512 (ENV-NOTES.md).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # "quantized tensor creation functions are deprecated"
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


@torch.inference_mode()
def forward_latencies_ms(
    models: Mapping[str, nn.Module], idx: torch.Tensor, runs: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median wall time (ms) of one forward pass over `idx` (B, T) for each model, after `warmup` untimed passes.

    The models take turns pass by pass, so a slow spell of a shared CPU falls on all of them alike rather
    than on whichever was being timed; the median ignores the odd pass that another process slowed down.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(idx)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model(idx)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000.0 for name, t in times.items()}


@torch.inference_mode()
def decode_tokens_per_s(
    models: Mapping[str, nn.Module], prompt: torch.Tensor, new_tokens: int, runs: int = 5
) -> dict[str, float]:
    """Median greedy-decoding speed (new tokens per second, all rows together) of each model's `generate`
    with its KV cache: `new_tokens` tokens after `prompt` (B, T), the prompt's own forward pass included.

    As forward_latencies_ms, the models take turns run by run after one untimed warm-up run each. Keep
    T + new_tokens within block_size to time the cache itself: past the context every step re-reads the
    whole window (GPT.generate).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    for model in models.values():
        model.eval()
        model.generate(prompt, new_tokens, temperature=0.0)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0.0)
            times[name].append(time.perf_counter() - start)
    return {name: prompt.size(0) * new_tokens / statistics.median(t) for name, t in times.items()}
