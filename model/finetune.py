"""Supervised fine-tuning on prompt/response pairs, with the loss on response tokens only.

Each pair becomes `PROMPT_TEMPLATE.format(prompt=...)` + response + end-of-text, truncated to block_size.
The prompt and the response are encoded separately, so the boundary between them is exact whatever the
tokenizer merges; labels are -100 (ignored) on prompt positions and on padding. Training reuses the loop
of model/train.py (schedule, clipping, checkpoints, exact resume) with a batch source of whole examples.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from model.data import ExampleBatches, pad_examples
from model.gpt import GPT
from model.train import TrainConfig, TrainResult, autocast, resolve_device, train
from storage.errors import DataIntegrityError

PROMPT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"
IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]  # inputs and their shifted, masked labels


class TextTokenizer(Protocol):
    eot_id: int

    def encode(self, text: str) -> list[int]: ...


def read_pairs(path: Path, allow_empty: bool = False) -> list[dict[str, str]]:
    """Prompt/response pairs of a JSONL file; a bad line is a DataIntegrityError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataIntegrityError(f"fine-tuning data {path} does not exist")
    pairs = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataIntegrityError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataIntegrityError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(item, dict):
            raise DataIntegrityError(
                f'{where}: expected an object with "prompt" and "response", got {type(item).__name__}'
            )
        for key in ("prompt", "response"):
            if key not in item:
                raise DataIntegrityError(f'{where}: missing "{key}"')
            if not isinstance(item[key], str):
                raise DataIntegrityError(f'{where}: "{key}" must be a string, got {type(item[key]).__name__}')
        pairs.append({"prompt": item["prompt"], "response": item["response"]})
    if not pairs and not allow_empty:
        raise DataIntegrityError(f"{path}: no prompt/response pairs")
    return pairs


def encode_pair(tokenizer: TextTokenizer, prompt: str, response: str, block_size: int) -> Example:
    """(inputs, labels) of one pair: labels[i] is the token after inputs[i] where that token belongs to the
    response (or is the closing end-of-text), and IGNORE_INDEX where it belongs to the prompt."""
    prompt_ids = tokenizer.encode(PROMPT_TEMPLATE.format(prompt=prompt))
    response_ids = [*tokenizer.encode(response), tokenizer.eot_id]
    sequence = (prompt_ids + response_ids)[: block_size + 1]  # one extra: the last input's target
    inputs = sequence[:-1]
    # Target i is sequence[i + 1]; it is a response token when i + 1 reaches past the prompt.
    labels = [tok if i + 1 >= len(prompt_ids) else IGNORE_INDEX for i, tok in enumerate(sequence[1:])]
    return inputs, labels


def encode_pairs(
    tokenizer: TextTokenizer, pairs: Sequence[dict[str, str]], block_size: int
) -> tuple[list[Example], int]:
    """Encoded examples, and how many pairs were left out because their prompt fills the whole block."""
    examples, dropped = [], 0
    for pair in pairs:
        inputs, labels = encode_pair(tokenizer, pair["prompt"], pair["response"], block_size)
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1  # no response token within block_size: nothing to learn or score
        else:
            examples.append((inputs, labels))
    return examples, dropped


def pair_key(pair: dict[str, str], seed: int) -> float:
    """A pair's position in [0, 1) for the held-out split: a seeded hash of its content, not of its index."""
    text = json.dumps({"prompt": pair["prompt"], "response": pair["response"]}, sort_keys=True)
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(
    pairs: Sequence[dict[str, str]], heldout_fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, heldout), each a list of {"prompt", "response"} pairs.

    A pair that carries a `split` ("train" or "heldout") goes where it says: the embedded default pairs
    do, because their held-out side must match the modules left out of the default pretraining corpus.
    Any other pair is held out when its seeded content hash (`pair_key`) falls below `heldout_fraction`,
    so the split depends on each pair's content and the seed only: reordering the data keeps it, and a
    pair that occurs twice lands on one side, so held-out pairs are never trained on."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train_pairs, heldout = [], []
    for pair in pairs:
        side = pair.get("split")
        if side is None:
            held = pair_key(pair, seed) < heldout_fraction
        elif side in ("train", "heldout"):
            held = side == "heldout"
        else:
            raise DataIntegrityError(
                f"fine-tuning pair {pair['prompt']!r}: split must be 'train' or 'heldout', got {side!r}"
            )
        (heldout if held else train_pairs).append({"prompt": pair["prompt"], "response": pair["response"]})
    return train_pairs, heldout


def _padding_id(tokenizer: TextTokenizer) -> int:
    return tokenizer.eot_id  # any valid id: padded positions come last, so causal attention never reads them


@torch.no_grad()
def response_loss(
    model: GPT,
    tokenizer: TextTokenizer,
    pairs: Sequence[dict[str, str]],
    block_size: int,
    batch_size: int,
    device: str | torch.device,
) -> float:
    """Mean loss per response token (nats) of `model` on `pairs`, dropout off."""
    examples, _ = encode_pairs(tokenizer, pairs, block_size)
    if not examples:
        raise DataIntegrityError(f"none of the {len(pairs)} pairs has a response token within block_size")
    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        x, y = pad_examples(examples[start : start + batch_size], _padding_id(tokenizer), IGNORE_INDEX)
        n = int((y != IGNORE_INDEX).sum())
        with autocast(device):
            _, loss = model(x.to(device), y.to(device), ignore_index=IGNORE_INDEX)
        total += float(loss) * n  # token-weighted: every response token counts once, whatever the batch
        count += n
    model.train(was_training)
    return total / count


def finetune(
    model: GPT,
    tokenizer: TextTokenizer,
    train_pairs: Sequence[dict[str, str]],
    heldout_pairs: Sequence[dict[str, str]],
    cfg: TrainConfig,
    checkpoint_dir: Path,
    *,
    metrics_path: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    identity: Any = None,
) -> tuple[TrainResult, dict[str, int]]:
    """Fine-tune `model` in place; the loop's val_loss is the held-out response loss.

    Returns the training result and counts: examples trained on / held out, pairs dropped by truncation.
    """
    block_size = model.config.block_size
    train_examples, train_dropped = encode_pairs(tokenizer, train_pairs, block_size)
    heldout_examples, heldout_dropped = encode_pairs(tokenizer, heldout_pairs, block_size)
    if not train_examples:
        raise DataIntegrityError(
            f"none of the {len(train_pairs)} training pairs has a response token within block_size {block_size}"
        )
    source = ExampleBatches(
        train_examples, heldout_examples, cfg.batch_size, cfg.seed, _padding_id(tokenizer), IGNORE_INDEX
    )
    result = train(
        model,
        source,
        cfg,
        checkpoint_dir,
        metrics_path=metrics_path,
        log=log,
        on_record=on_record,
        identity=identity,
        ignore_index=IGNORE_INDEX,
    )
    counts = {
        "train_examples": len(train_examples),
        "heldout_examples": len(heldout_examples),
        "dropped_truncated": train_dropped + heldout_dropped,
    }
    return result, counts
