"""Sampling text from a model in the store (`gptflow generate`)."""

from pathlib import Path

import torch

from model.checkpoint import load_model
from model.finetune import PROMPT_TEMPLATE
from model.gpt import GPT
from model.tokenizer import FILENAME, Tokenizer
from storage.errors import QualityError, StoreError
from storage.store import Store
from tasks.quantize import rejected_reason

MODEL_STAGES = ("pretrain", "finetune", "quantize")


def find_tokenizer(store: Store, stage: str, version: str) -> Path:
    """The tokenizer a model was trained with: the tokenizer.json its own version holds, else the one of the
    nearest model version it was built from (a fine-tuned model publishes its own, which for a model
    imported with finetune.init_from is the imported one), else its lineage's tokenizer stage's."""
    lineage = store.lineage(stage, version)
    nearest_first = [(stage, version)] + [(s, lineage[s]) for s in reversed(MODEL_STAGES) if s in lineage]
    for model_stage, model_version in nearest_first:
        path = store.path(model_stage, model_version) / FILENAME
        if path.is_file():
            return path
    tokenizer = lineage.get("tokenizer")
    if tokenizer is None:
        raise StoreError(f"no tokenizer in the lineage of {stage}/{version}")
    return store.path("tokenizer", tokenizer) / FILENAME


def load_store_model(store: Store, which: str, device: str = "cpu") -> tuple[GPT, Tokenizer, str]:
    """`which` is a model stage (its latest version) or a version id; returns (model, tokenizer, stage/version)."""
    if which in MODEL_STAGES:
        stage, version = which, store.require_latest(which)
    else:
        stage, version = store.find(which)
        if stage not in MODEL_STAGES:
            raise StoreError(f"{stage}/{version} is not a model (pick a version of {', '.join(MODEL_STAGES)})")
    if stage == "quantize" and (reason := rejected_reason(store.manifest(stage, version))) is not None:
        raise QualityError(f"quantize/{version} was rejected by its quality gate and is not served: {reason}")
    folder = store.path(stage, version)
    if stage == "quantize":
        from model.quantize import load_quantized

        model = load_quantized(folder, device)
    else:
        model = load_model(folder, device)
    return model, Tokenizer.load(find_tokenizer(store, stage, version)), f"{stage}/{version}"


def generate_text(
    storage: str | Path,
    which: str,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    device: str = "cpu",
    instruction: bool = False,
) -> list[str]:
    """Samples continuing `prompt` (top_k, then top_p nucleus sampling; see GPT.generate); with
    `instruction`, the prompt is wrapped in the fine-tuning template and only the response is returned."""
    model, tokenizer, _ = load_store_model(Store(storage), which, device)
    text = PROMPT_TEMPLATE.format(prompt=prompt) if instruction else prompt
    ids = tokenizer.encode(text) or [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        stop_token=tokenizer.eot_id,
    )
    texts = []
    for row in out.tolist():
        if tokenizer.eot_id in row[len(ids) :]:
            row = row[: len(ids) + row[len(ids) :].index(tokenizer.eot_id)]
        texts.append(tokenizer.decode(row[len(ids) :]) if instruction else tokenizer.decode(row))
    return texts
