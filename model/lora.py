"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tune a frozen GPT
through small trainable updates of some of its matrices, then merge them into plain weights.

A target nn.Linear y = W x + b becomes y = W x + b + (alpha / rank) * B (A dropout(x)), with W and b frozen,
A (rank, in) drawn as nn.Linear draws its weights and B (out, rank) zero, so that training starts from the
pretrained model's exact function (Hu et al. §4.1; Microsoft's loralib and litgpt initialise the same way).
Only the adapters A and B train: embeddings, the head, LayerNorm gains and every bias stay frozen (litgpt's
default `bias="none"`; Hu et al. freeze all of the pretrained model).

Targets name the matrices of every block that get an adapter:

    q, k, v     the query, key and value thirds of attention's fused `c_attn` (its output is q | k | v)
    attn_proj   attention's output projection `c_proj`
    mlp_fc      the MLP's up projection `c_fc`
    mlp_proj    the MLP's down projection `c_proj`

Each of q, k and v gets an adapter of its own, as if they were three matrices (the paper's W_q, W_k, W_v;
litgpt's LoRAQKVLinear does the same on its fused qkv): one adapter over the whole fused matrix would share
one A, and so one rank-r input subspace, between the three. Their updates are zero on the thirds not
targeted, so `q, v` (the paper's §7.1 pick on a small budget) leaves the keys exactly as pretrained.

`merge_lora` folds every adapter into its matrix (W += alpha / rank * B A, per adapted third) and puts the
plain nn.Linear back: the model is then a GPT like any other, its state dict has no adapter keys, and every
later stage (quantize, evaluate, export) reads it unchanged.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gpt import GPT
from storage.errors import ConfigError

# target -> (module inside each block, which part of its output, how many equal parts the output has)
TARGET_SLOTS: dict[str, tuple[str, int, int]] = {
    "q": ("attn.c_attn", 0, 3),
    "k": ("attn.c_attn", 1, 3),
    "v": ("attn.c_attn", 2, 3),
    "attn_proj": ("attn.c_proj", 0, 1),
    "mlp_fc": ("mlp.c_fc", 0, 1),
    "mlp_proj": ("mlp.c_proj", 0, 1),
}
TARGETS = tuple(TARGET_SLOTS)
ADAPTER_PREFIX = "lora_"  # the names of adapter parameters start so (lora_A, lora_B), as litgpt's and PEFT's


@dataclass(frozen=True)
class LoRASettings:
    """Rank, scale numerator, adapter dropout and target matrices (see the module's docstring)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"lora rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGET_SLOTS]
        if unknown:
            problems.append(f"unknown lora targets {unknown} (choose from {', '.join(TARGETS)})")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append(f"lora targets must be a non-empty list without repeats, got {list(self.targets)}")
        if problems:
            raise ConfigError("invalid LoRA settings: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        # alpha / rank (Hu et al. §4.1): a change of rank then needs no new learning rate.
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update on some of its output's equal parts."""

    def __init__(
        self, base: nn.Linear, parts: int, adapted: Sequence[int], settings: LoRASettings, generator: torch.Generator
    ) -> None:
        super().__init__()
        if base.out_features % parts:
            raise ValueError(f"{base.out_features} outputs do not split into {parts} equal parts")
        self.base = base.requires_grad_(False)
        self.parts = parts
        self.adapted = tuple(sorted(adapted))
        self.width = base.out_features // parts
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout)
        weight = base.weight
        a_list, b_list = [], []
        for _ in self.adapted:
            a = torch.empty(settings.rank, base.in_features)  # (r, in)
            # nn.Linear's own init (kaiming uniform, a = sqrt(5)), as loralib and litgpt draw A; drawn on the
            # CPU from a seeded generator, so the same seed gives the same adapters on any device.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            a_list.append(nn.Parameter(a.to(device=weight.device, dtype=weight.dtype)))
            b_list.append(nn.Parameter(weight.new_zeros(self.width, settings.rank)))  # (part, r): starts at zero
        self.lora_A = nn.ParameterList(a_list)
        self.lora_B = nn.ParameterList(b_list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = self.dropout(x)  # (..., in)
        updates = {
            part: F.linear(F.linear(h, a), b) * self.scale  # (..., r) then (..., part)
            for part, a, b in zip(self.adapted, self.lora_A, self.lora_B, strict=True)
        }
        if len(updates) < self.parts:
            zeros = y.new_zeros(*y.shape[:-1], self.width)  # (..., part): the parts left as pretrained
            pieces = [updates.get(part, zeros) for part in range(self.parts)]
        else:
            pieces = [updates[part] for part in range(self.parts)]
        return y + torch.cat(pieces, dim=-1)  # (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with the update folded in: W[part] += scale * B A for each adapted part."""
        weight = self.base.weight
        for part, a, b in zip(self.adapted, self.lora_A, self.lora_B, strict=True):
            rows = slice(part * self.width, (part + 1) * self.width)
            weight[rows] += (self.scale * (b.float() @ a.float())).to(weight.dtype)  # (part, in)
        return self.base


def _blocks(model: GPT) -> nn.ModuleList:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model.transformer.h


def _get(block: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        block = getattr(block, name)
    return block


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(block, parent) if parent else block, name, module)


def add_lora(model: GPT, settings: LoRASettings, seed: int) -> int:
    """Freeze every parameter of `model` and wrap its target Linears in adapters, in place; returns the
    number of trainable (adapter) parameters. A draws from `seed`, so the same seed gives the same start."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge them first")
    config = getattr(model, "_orig_mod", model).config
    if settings.rank > config.n_embd:
        raise ConfigError(
            f"lora rank {settings.rank} exceeds the model's width n_embd={config.n_embd}: "
            "a rank-r update of a matrix is full-rank from r = its smaller dimension on"
        )
    model.requires_grad_(False)
    modules: dict[str, list[tuple[int, int]]] = {}
    for target in settings.targets:
        path, part, parts = TARGET_SLOTS[target]
        modules.setdefault(path, []).append((part, parts))
    generator = torch.Generator().manual_seed(seed)
    for block in _blocks(model):
        for path in sorted(modules):  # a fixed order of draws: the same adapters whatever the targets' order
            slots = modules[path]
            base = _get(block, path)
            _set(block, path, LoRALinear(base, slots[0][1], [part for part, _ in slots], settings, generator))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its matrix and put the plain Linears back, in place; every parameter is
    trainable again, as in a GPT that never had adapters. Returns `model`."""
    for block in _blocks(model):
        for path in {slot[0] for slot in TARGET_SLOTS.values()}:
            module = _get(block, path)
            if isinstance(module, LoRALinear):
                _set(block, path, module.merged())
    model.requires_grad_(True)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapter parameters of `model` (none once merged)."""
    return [name for name, _ in model.named_parameters() if f".{ADAPTER_PREFIX}" in name]
