"""Batches for the training loop, as pure functions of (seed, step, micro-step).

A resumed run must see exactly the batches an uninterrupted run would, so no batch source keeps a random
state that advances: the batch for optimizer step `s`, micro-step `m` comes from a generator seeded with
(seed, s, m), and the evaluation batches from one seeded with (seed, split) that never changes.
"""

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from storage.errors import DataIntegrityError

# The first number of every generator seed keeps the training and evaluation streams apart.
_TRAIN_STREAM = 0
_EVAL_STREAM = 1
_SPLIT_IDS = {"train": 0, "val": 1}

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T) and targets (B, T), int64 on the CPU


class BatchSource(Protocol):
    """What the training loop draws from: deterministic training and evaluation batches."""

    def train_batch(self, step: int, micro: int) -> Batch:
        """The batch of optimizer step `step`, micro-step `micro`: the same whenever it is asked for."""
        ...

    def eval_splits(self) -> tuple[str, ...]:
        """The splits evaluated at each evaluation: ("train", "val"), or ("train",) with no validation data."""
        ...

    def eval_batches(self, split: str, count: int) -> Iterator[Batch]:
        """At most `count` fixed batches of `split`: the same batches at every evaluation."""
        ...


def _split_id(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(_SPLIT_IDS)}")
    return _SPLIT_IDS[split]


def check_window_fits(tokens: np.ndarray, block_size: int, name: str) -> None:
    """A token array must hold at least one window of block_size + 1 tokens (inputs plus shifted targets)."""
    if len(tokens) < block_size + 1:
        raise DataIntegrityError(
            f"{name}: holds {len(tokens)} tokens, fewer than the {block_size + 1} "
            f"(block_size + 1) that one training window needs"
        )


class TokenBatches:
    """Random windows of block_size + 1 tokens from memory-mapped token arrays: x = w[:-1], y = w[1:]."""

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray | None,
        block_size: int,
        batch_size: int,
        seed: int,
        names: tuple[str, str] = ("train.bin", "val.bin"),
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
        for name, tokens in zip(names, (train, val), strict=True):
            if tokens is not None:
                check_window_fits(tokens, block_size, name)
        self.tokens = {"train": train} if val is None else {"train": train, "val": val}
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed

    def _windows(self, tokens: np.ndarray, rng: np.random.Generator) -> Batch:
        # Every start in [0, len - block_size - 1] leaves room for the shifted target window.
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        windows = np.stack([np.asarray(tokens[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
        windows = torch.from_numpy(windows)  # (B, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # 2 x (B, T)

    def train_batch(self, step: int, micro: int) -> Batch:
        return self._windows(self.tokens["train"], np.random.default_rng([self.seed, _TRAIN_STREAM, step, micro]))

    def eval_splits(self) -> tuple[str, ...]:
        return tuple(self.tokens)

    def eval_batches(self, split: str, count: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, _EVAL_STREAM, _split_id(split)])
        for _ in range(count):
            yield self._windows(self.tokens[split], rng)


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int, ignore_index: int = -100) -> Batch:
    """Stack (inputs, labels) pairs of different lengths, padding to the longest; padding is never a target."""
    length = max(len(x) for x, _ in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), ignore_index, dtype=torch.long)  # (B, T)
    for row, (x, y) in enumerate(examples):
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        labels[row, : len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, labels


class ExampleBatches:
    """Batches of whole examples (inputs, labels already shifted and masked), for supervised fine-tuning.

    Training batches sample examples without replacement within a batch; evaluation batches walk each
    split's examples in order, so a held-out split is covered whole when `count` allows.
    """

    def __init__(
        self,
        train: list[tuple[list[int], list[int]]],
        val: list[tuple[list[int], list[int]]],
        batch_size: int,
        seed: int,
        pad_id: int,
        ignore_index: int = -100,
    ) -> None:
        if not train:
            raise DataIntegrityError("no training examples to fine-tune on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = {"train": train, "val": val} if val else {"train": train}
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.ignore_index = ignore_index

    def train_batch(self, step: int, micro: int) -> Batch:
        train = self.examples["train"]
        rng = np.random.default_rng([self.seed, _TRAIN_STREAM, step, micro])
        rows = rng.choice(len(train), size=min(self.batch_size, len(train)), replace=False)
        return pad_examples([train[i] for i in rows], self.pad_id, self.ignore_index)

    def eval_splits(self) -> tuple[str, ...]:
        return tuple(self.examples)

    def eval_batches(self, split: str, count: int) -> Iterator[Batch]:
        _split_id(split)
        examples = self.examples[split]
        for start in range(0, min(len(examples), count * self.batch_size), self.batch_size):
            yield pad_examples(examples[start : start + self.batch_size], self.pad_id, self.ignore_index)
