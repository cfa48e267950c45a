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

Two ways to run a stored model. `load_quantized`: the dequantized float model, the quality of the stored
weights on any device (what evaluation scores). `load_for_cpu`: the stored integers themselves on CPU
kernels, every Linear layer and the output head included:
- int8 on PyTorch's dynamic int8 Linear (fbgemm: the x86 engine packs Linear weights for fbgemm; oneDNN,
  its other kernel, was 1.3-1.8x slower at decoding), which quantizes the activations per call to 7 bits
  (reduce_range, safe on CPUs without VNNI);
- int4 on `_weight_int4pack_mm_for_cpu` (torchao's and gpt-fast's CPU kernel), which takes bf16
  activations and scales: its fp32 path was 2.5-3.5x slower than a fp32 matmul here.
Decoding one token multiplies a vector by every weight matrix once, so its matmuls go as the weights' bytes:
68 MB in fp32, 17 MB in int8 for the small preset's model (6 layers x 384, vocab 16k), whose output head is
a third of them. Greedy decoding with the KV cache, one stream, on 2 shared AMD EPYC cores (AVX-512 VNNI),
interleaved medians (benchmarks/quantize_bench.py): small, one thread: int8 1.95-2.6x fp32's tokens/s (1.4-1.5x
with the head left in fp32), int4 2.6-3.6x; two threads: int8 3.0-3.2x, int4 4.3-4.7x. The tiny preset's
model (4 x 128, vocab 2k; its weights sit in cache): int8 0.74-1.27x, int4 0.84-1.64x, as each int8 call's
activation quantization costs about what reading fewer bytes saves. A full-context forward (prompt
processing, evaluation): int8 1.2-2.8x, int4 0.76-1.17x (the int4 kernel is made for matrix-vector products).
int8 weight-only (`_weight_int8pack_mm`) decoded no faster than the dynamic kernel and ran a full context at
0.5-0.9x fp32 (on bf16 activations; its fp32 path is 0.5x fp32 even at decoding), so it is not used.
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
import torch.ao.nn.quantized.dynamic as nnqd
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


def read_quantized(folder: Path) -> tuple[Path, dict]:
    """(path, weights dict) of the one quantized weights file in `folder` (weights only: no pickled code runs)."""
    path = quantized_file(folder)
    try:
        qstate = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise DataIntegrityError(f"{path}: cannot be read as quantized weights ({exc})") from exc
    return path, qstate


def _dequantized_model(folder: Path, path: Path, qstate: dict) -> GPT:
    model = GPT(load_config(folder))
    try:
        model.load_state_dict(dequantize_state_dict(qstate))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataIntegrityError(f"{path}: does not match {folder / CONFIG}: {first}") from exc
    return model.eval()


def load_quantized(folder: Path, device: str | torch.device = "cpu") -> GPT:
    """The dequantized float GPT stored in `folder`."""
    path, qstate = read_quantized(folder)
    return _dequantized_model(folder, path, qstate).to(device)


def load_for_cpu(folder: Path) -> GPT:
    """The GPT stored in `folder` on CPU, its Linear layers running the stored integers (`with_cpu_kernels`)."""
    path, qstate = read_quantized(folder)
    return with_cpu_kernels(_dequantized_model(folder, path, qstate), qstate)


_INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
_INT4_KERNEL_ROWS = 16  # it packs output channels in blocks of 16


class Int4Linear(nn.Module):
    """A Linear layer stored as int4 groups, run by PyTorch's `_weight_int4pack_mm_for_cpu`: the weights stay
    two per byte and are expanded inside the matmul.

    The kernel computes (nibble - 8) * scale + zero per group, which is the stored q * s with zero 0. It takes
    bf16 activations and scales (its fp32 path is a slow reference), so x and the scales are rounded to bf16
    (8 significant bits, against int4's 3) and the product comes back to fp32 before the bias.
    """

    def __init__(
        self, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.group_size = self.in_features // scales.shape[1]
        p = packed.to(torch.int32)
        nibbles = torch.stack((p & 0xF, p >> 4), dim=2).view(self.out_features, -1)  # (out, in): q + 8
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
        scales_t = scales.t().float()  # (n_groups, out)
        self.register_buffer(
            "scales_and_zeros", torch.stack((scales_t, torch.zeros_like(scales_t)), dim=2).bfloat16()
        )  # (n_groups, out, 2)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @staticmethod
    def fits(entry: dict) -> bool:
        """Whether the kernel takes this stored weight: rows in blocks of 16, cut into whole groups of a size it
        knows, with no padding (padded rows would need their activations padded too)."""
        out_features, in_features = entry["shape"]
        padded_in = 2 * entry["qweight"].shape[1]
        group = padded_in // entry["scales"].shape[1]
        return padded_in == in_features and group in _INT4_KERNEL_GROUPS and out_features % _INT4_KERNEL_ROWS == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).bfloat16(), self.weight, self.group_size, self.scales_and_zeros
        )  # (B*T, out), bf16
        y = y.float().view(*x.shape[:-1], self.out_features)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _int8_linear(entry: dict, bias: torch.Tensor | None) -> nn.Module:
    """PyTorch's dynamic int8 Linear holding exactly the stored int8 weights and scales."""
    out_features, in_features = entry["shape"]
    scales = entry["scales"].double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "quantized tensor creation functions are deprecated"
        # q * s re-quantized with the same s is q again: the packed weights are the stored ones.
        weight = torch.quantize_per_channel(
            dequantize_int8(entry["qweight"], entry["scales"]),
            scales,
            torch.zeros_like(scales, dtype=torch.long),
            0,
            torch.qint8,
        )
        layer = nnqd.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(weight, None if bias is None else bias.detach().float())
    return layer


def with_cpu_kernels(model: GPT, qstate: dict) -> GPT:
    """A CPU copy of `model` whose Linear layers (lm_head included) run the integers of `qstate` on CPU
    kernels: int8 on PyTorch's dynamic int8 Linear, int4 on `Int4Linear` where the kernel takes the shape
    (the others stay in float, dequantized). The embeddings stay float: a lookup gains nothing from integers.
    """
    model = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().eval()
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear):
            continue
        # Every matrix is stored quantized (a tied head under its embedding's name), and `model` was loaded
        # from this very dict, so the names and shapes match.
        entry = qstate["quantized"][qstate["aliases"].get(f"{name}.weight", f"{name}.weight")]
        if qstate["bits"] == 8:
            fast = _int8_linear(entry, layer.bias)
        elif Int4Linear.fits(entry):
            fast = Int4Linear(entry["qweight"], entry["scales"], tuple(entry["shape"]), layer.bias)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fast)
    return model


def to_dynamic_int8(model: GPT) -> GPT:
    """A CPU copy of `model` with int8 weights per output channel on PyTorch's dynamic int8 Linear kernels."""
    return with_cpu_kernels(model, quantize_state_dict(model.state_dict(), bits=8))


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
