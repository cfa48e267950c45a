"""Supervised fine-tuning on prompt/response pairs, with the loss on response tokens only; full, or LoRA.

The template. A pair becomes one row of tokens:

    ### Prompt:\n{prompt}\n### Response:\n{response}<|endoftext|>

`PROMPT_TEMPLATE.format(prompt=...)` is encoded as one text (as `gptflow generate --instruction` encodes
it), the response and its closing end-of-text apart, so the boundary between them is exact whatever the
tokenizer merges. Labels are the next tokens, -100 (ignored) wherever the next token is still the prompt's:
the loss covers the response tokens and the end-of-text that closes them, which teaches where an answer
stops.

The packing. One pair per row, never two: rows of a batch are right-padded to the longest, and padding is
never a target (causal attention never lets a real position see the padding after it).

Truncation. A row holds at most block_size inputs (block_size + 1 tokens with the last target). A pair
longer than that is cut on the prompt side: the header `### Prompt:\n` stays, the prompt loses tokens from
its start, so its end (usually the question itself) and the `\n### Response:\n` line stay, and the whole
response is trained on. Only a response that does not fit even after the header and that line alone is cut
at its end (the prompt's text is then gone entirely). encode_pairs counts both kinds; a pair keeps no
target only when block_size cannot hold the template's own lines (then it is dropped and counted).

Training reuses the loop of model/train.py (schedule, clipping, checkpoints, exact resume) with a batch
source of whole examples. With LoRA (model/lora.py) the adapters are added before the loop, so its
checkpoints hold them, and merged into plain weights after it.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from model.data import ExampleBatches, pad_examples
from model.gpt import GPT
from model.lora import LoRASettings, add_lora, merge_lora
from model.train import TrainConfig, TrainResult, autocast, resolve_device, train
from storage.errors import DataIntegrityError

PROMPT_HEADER = "### Prompt:\n"
RESPONSE_HEADER = "\n### Response:\n"
PROMPT_TEMPLATE = PROMPT_HEADER + "{prompt}" + RESPONSE_HEADER
IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]  # inputs and their shifted, masked labels


@dataclass(frozen=True)
class EncodedPair:
    """One pair's row (`inputs`, `labels`) and what truncation cut to fit it: tokens from the prompt's start,
    tokens (the end-of-text included) from the response's end."""

    inputs: list[int]
    labels: list[int]
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0

    @property
    def example(self) -> Example:
        return self.inputs, self.labels

    @property
    def trained(self) -> bool:
        """Whether any target is left: a response token or the closing end-of-text."""
        return any(label != IGNORE_INDEX for label in self.labels)


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


def encode_pair(tokenizer: TextTokenizer, prompt: str, response: str, block_size: int) -> EncodedPair:
    """The row of one pair: labels[i] is the token after inputs[i] where that token belongs to the response
    (or is the closing end-of-text), IGNORE_INDEX where it belongs to the prompt. A pair longer than the
    row is cut as the module's docstring says."""
    prompt_ids = tokenizer.encode(PROMPT_TEMPLATE.format(prompt=prompt))
    response_ids = [*tokenizer.encode(response), tokenizer.eot_id]
    room = block_size + 1  # one extra: the last input's target
    prompt_cut = response_cut = 0
    if len(prompt_ids) + len(response_ids) > room:
        # Encoded in pieces, so that the cut falls between tokens of the prompt's own text.
        header, body, footer = (tokenizer.encode(text) for text in (PROMPT_HEADER, prompt, RESPONSE_HEADER))
        kept = min(len(body), max(0, room - len(header) - len(footer) - len(response_ids)))
        prompt_ids = header + body[len(body) - kept :] + footer
        prompt_cut = len(body) - kept
        fits = max(0, room - len(prompt_ids))
        response_cut = max(0, len(response_ids) - fits)
        response_ids = response_ids[:fits]
    sequence = (prompt_ids + response_ids)[:room]  # shorter than prompt_ids only if the template cannot fit
    inputs = sequence[:-1]
    # Target i is sequence[i + 1]; it is a response token when i + 1 reaches past the prompt.
    labels = [tok if i + 1 >= len(prompt_ids) else IGNORE_INDEX for i, tok in enumerate(sequence[1:])]
    return EncodedPair(inputs, labels, prompt_cut, response_cut)


def encode_pairs(
    tokenizer: TextTokenizer, pairs: Sequence[dict[str, str]], block_size: int
) -> tuple[list[Example], dict[str, int]]:
    """Encoded examples, and counts of pairs: `truncated_prompt` (prompt cut at its start),
    `truncated_response` (response cut at its end; a pair may be counted in both), `dropped` (no target
    left: block_size cannot hold the template's lines)."""
    examples: list[Example] = []
    counts = {"truncated_prompt": 0, "truncated_response": 0, "dropped": 0}
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair["prompt"], pair["response"], block_size)
        if not encoded.trained:
            counts["dropped"] += 1  # nothing to learn or score
            continue
        examples.append(encoded.example)
        counts["truncated_prompt"] += encoded.prompt_tokens_cut > 0
        counts["truncated_response"] += encoded.response_tokens_cut > 0
    return examples, counts


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
    lora: LoRASettings | None = None,
    metrics_path: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    identity: Any = None,
) -> tuple[TrainResult, dict[str, int]]:
    """Fine-tune `model` in place; the loop's val_loss is the held-out response loss.

    With `lora`, only adapters train (A drawn from cfg.seed), and they are merged into the weights before
    this returns: `model` is a plain GPT either way. A checkpoint in `checkpoint_dir` resumes only a run of
    the same method and LoRA settings (and `identity`, the caller's description of the data).

    Returns the training result and counts: examples trained on / held out, trainable parameters, and the
    pairs (train and held-out together) truncated or dropped (encode_pairs).
    """
    block_size = model.config.block_size
    train_examples, train_counts = encode_pairs(tokenizer, train_pairs, block_size)
    heldout_examples, heldout_counts = encode_pairs(tokenizer, heldout_pairs, block_size)
    if not train_examples:
        raise DataIntegrityError(
            f"none of the {len(train_pairs)} training pairs has a response token within block_size {block_size}"
        )
    source = ExampleBatches(
        train_examples, heldout_examples, cfg.batch_size, cfg.seed, _padding_id(tokenizer), IGNORE_INDEX
    )
    trainable = add_lora(model, lora, cfg.seed) if lora else sum(p.numel() for p in model.parameters())
    result = train(
        model,
        source,
        cfg,
        checkpoint_dir,
        metrics_path=metrics_path,
        log=log,
        on_record=on_record,
        identity={"data": identity, "lora": lora.to_dict() if lora else None},
        ignore_index=IGNORE_INDEX,
    )
    if lora:
        merge_lora(model)
    counts = {
        "train_examples": len(train_examples),
        "heldout_examples": len(heldout_examples),
        "trainable_params": trainable,
        **{name: train_counts[name] + heldout_counts[name] for name in train_counts},
    }
    return result, counts
