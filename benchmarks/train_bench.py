"""The training recipes against each other, and the trainer against a plain PyTorch loop, on this CPU.

    .venv/bin/python benchmarks/train_bench.py [--storage DIR] [--threads 1]

On the embedded default corpus (its tokens built once into --storage by the pipeline, `--until tokens`), with
the tiny preset's model shape and batches:

1. **Recipes, same wall-clock budget.** The pretrain stage trains the gpt2 recipe for 600 steps (`BASELINE`:
   the preset before the modern recipe became its default; its wall time is the budget B) and the modern
   recipe with as many steps as fit in B (measured step times), each with its whole schedule; the validation
   loss is printed against wall time. Then the modern recipe trains again with the steps that fit in 0.7 B:
   its final validation loss against the gpt2 recipe's final one is the target (modern reaches it in at most
   0.7x the time).
2. **Trainer overhead.** The same model, batches and optimizer in a minimal loop (forward, backward, clip,
   step; nothing else) against model/train.py's loop: tokens/s of the training steps (target: ours >= 0.95x),
   and the whole pretrain stage's wall time against the time of its training steps (evaluations,
   checkpoints, plots, logs and the store included; target <= 1.15x).
3. **Decoding.** Tokens/s of greedy decoding with and without the KV cache, for both recipes' models.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.cli import main as gptflow  # noqa: E402
from flows.config import PRESETS  # noqa: E402
from model.data import TokenBatches  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.train import lr_at, make_optimizer, train  # noqa: E402
from storage.store import Store  # noqa: E402
from storage.tokens import open_tokens, read_meta  # noqa: E402
from tasks import pretrain as pretrain_stage  # noqa: E402

# The gpt2 recipe's run that sets the budget: the tiny preset's shape and batches, trained as the preset
# trained it before the modern recipe became its default.
BASELINE = {"recipe": "gpt2", "max_steps": 600, "warmup_steps": 50}
CALIBRATION_STEPS = 40
OVERHEAD_STEPS = 100
OVERHEAD_ROUNDS = 2  # the two loops take turns, so that a change in the machine's load falls on both
TARGET_TIME_RATIO = 0.7


def tokens_folder(storage: Path) -> Path:
    store = Store(storage)
    if store.latest("tokens") is None:
        print(f"building the embedded default's tokens in {storage} (pipeline --until tokens) ...", flush=True)
        code = gptflow(["run", "--storage", str(storage), "--until", "tokens"])
        if code:
            raise SystemExit(f"the pipeline failed (exit {code})")
    return store.path("tokens", store.require_latest("tokens"))


def pretrain_config(recipe: str, threads: int, **overrides: Any) -> pretrain_stage.PretrainConfig:
    values = {**PRESETS["tiny"]["pretrain"], **BASELINE, "recipe": recipe, "progress": False, "cpu_threads": threads}
    return pretrain_stage.PretrainConfig(**{**values, **overrides})


def build_model(cfg: pretrain_stage.PretrainConfig, vocab_size: int) -> GPT:
    torch.manual_seed(cfg.seed)
    config = GPTConfig(vocab_size=pretrain_stage.padded_vocab_size(vocab_size), **cfg.model_options())
    return GPT(config)


def batches(folder: Path, cfg: pretrain_stage.PretrainConfig) -> TokenBatches:
    return TokenBatches(
        open_tokens(folder, "train"),
        open_tokens(folder, "val"),
        cfg.block_size,
        cfg.batch_size,
        cfg.seed,
    )


def step_seconds(folder: Path, cfg: pretrain_stage.PretrainConfig, vocab_size: int) -> float:
    """Median seconds per optimizer step of model/train.py's loop (logging windows of log_interval steps)."""
    model = build_model(cfg, vocab_size)
    probe = cfg.model_copy(
        update={"max_steps": CALIBRATION_STEPS, "warmup_steps": 5, "eval_interval": 10**6, "log_interval": 10}
    )
    with tempfile.TemporaryDirectory() as work:
        result = train(model, batches(folder, probe), probe.train_config(), Path(work), log=lambda line: None)
    window = [r["tokens_per_s"] for r in result.records[1:]]  # the first window pays for warm-up
    return cfg.batch_size * cfg.grad_accum_steps * cfg.block_size / statistics.median(window)


def run_stage(storage: Path, cfg: pretrain_stage.PretrainConfig) -> dict[str, Any]:
    """The pretrain stage, forced, timed from the outside: its manifest metrics and curve, and its wall time."""
    started = time.monotonic()
    store = Store(storage)
    ref = pretrain_stage.STAGE.run(str(storage), cfg, {"tokens": store.require_latest("tokens")}, force=True)
    wall = time.monotonic() - started
    metrics = store.manifest("pretrain", ref.version)["metrics"]
    curve = [
        json.loads(line) for line in (store.path("pretrain", ref.version) / "metrics.jsonl").read_text().splitlines()
    ]
    return {"wall": wall, "metrics": metrics, "curve": curve, "version": ref.version}


def print_curve(name: str, run: dict[str, Any]) -> None:
    points = [(r["time_s"], r["step"], r["val_loss"]) for r in run["curve"] if "val_loss" in r]
    print(f"  {name}: " + "  ".join(f"{t:6.1f}s/{step}:{loss:.3f}" for t, step, loss in points))


def first_time_at(run: dict[str, Any], loss: float) -> float | None:
    return next((r["time_s"] for r in run["curve"] if r.get("val_loss", float("inf")) <= loss), None)


def plain_loop_tokens_per_s(folder: Path, cfg: pretrain_stage.PretrainConfig, vocab_size: int) -> float:
    """tokens/s of a minimal loop over the same model, batches, optimizer and schedule: median over windows of
    log_interval steps, as model/train.py's records measure them."""
    model = build_model(cfg, vocab_size)
    train_cfg = cfg.train_config()
    source = batches(folder, cfg)
    optimizer = make_optimizer(model, train_cfg, torch.device("cpu"))
    model.train()
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads)
    windows, window_start, tokens = [], time.monotonic(), 0
    try:
        for step in range(OVERHEAD_STEPS):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, train_cfg) * group.get("lr_scale", 1.0)
            for micro in range(cfg.grad_accum_steps):
                x, y = source.train_batch(step, micro)
                _, loss = model(x, y)
                (loss / cfg.grad_accum_steps).backward()
                tokens += x.numel()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % cfg.log_interval == 0:
                float(loss.detach())  # what a logging step reads: a device sync
                windows.append(tokens / (time.monotonic() - window_start))
                window_start, tokens = time.monotonic(), 0
    finally:
        torch.set_num_threads(before)
    return statistics.median(windows[1:])


def our_loop_tokens_per_s(folder: Path, cfg: pretrain_stage.PretrainConfig, vocab_size: int) -> float:
    model = build_model(cfg, vocab_size)
    same = cfg.model_copy(update={"max_steps": OVERHEAD_STEPS, "eval_interval": 10**6})
    with tempfile.TemporaryDirectory() as work:
        result = train(model, batches(folder, same), same.train_config(), Path(work), log=lambda line: None)
    return statistics.median(r["tokens_per_s"] for r in result.records[1:])


def decode_rates(model: GPT, threads: int) -> dict[bool, float]:
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, model.config.block_size // 4))
    new_tokens = model.config.block_size - prompt.size(1)
    rates = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for use_cache in (False, True):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
                times.append(time.perf_counter() - started)
            rates[use_cache] = new_tokens / statistics.median(times)
    finally:
        torch.set_num_threads(before)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=Path(tempfile.gettempdir()) / "gptflow-train-bench")
    parser.add_argument("--threads", type=int, default=1, help="the training loop's cpu_threads")
    parser.add_argument("--skip-recipes", action="store_true", help="only the overhead and decoding figures")
    args = parser.parse_args()

    folder = tokens_folder(args.storage)
    vocab_size = read_meta(folder)["vocab_size"]
    gpt2 = pretrain_config("gpt2", args.threads)
    print(f"tokens: {folder}; tiny preset shape, {args.threads} thread(s), torch {torch.__version__}")

    print("\n== trainer overhead (gpt2 recipe) ==")
    plain, ours = [], []
    for _ in range(OVERHEAD_ROUNDS):
        plain.append(plain_loop_tokens_per_s(folder, gpt2, vocab_size))
        ours.append(our_loop_tokens_per_s(folder, gpt2, vocab_size))
    plain, ours = max(plain), max(ours)  # the best round of each: the least disturbed
    print(f"plain loop {plain:,.0f} tok/s; model/train.py {ours:,.0f} tok/s; ratio {ours / plain:.3f} (target >= 0.95)")

    if not args.skip_recipes:
        print("\n== recipes, same wall-clock budget ==")
        base = run_stage(args.storage, gpt2)
        budget = base["wall"]
        train_s = base["metrics"]["step_seconds"]
        print(
            f"pretrain stage (gpt2): {budget:.1f} s wall, {train_s:.1f} s in training steps; "
            f"ratio {budget / train_s:.3f} (target <= 1.15)"
        )
        per_step = {name: step_seconds(folder, pretrain_config(name, args.threads), vocab_size) for name in RECIPES}
        print("seconds per step: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in per_step.items()))
        overhead = budget - base["metrics"]["step_seconds"]  # evaluations, checkpoints, store: alike for both
        modern_steps = int((budget - overhead) / per_step["modern"])
        modern = run_stage(args.storage, pretrain_config("modern", args.threads, **scaled(modern_steps)))
        target = base["metrics"]["val_loss"]
        print_curve(f"gpt2   ({gpt2.max_steps} steps)", base)
        print_curve(f"modern ({modern_steps} steps)", modern)
        reached = first_time_at(modern, target)
        print(
            f"gpt2 final val loss {target:.4f} at {base['curve'][-1]['time_s']:.1f} s; modern final "
            f"{modern['metrics']['val_loss']:.4f}; modern first at or below gpt2's final: "
            + (f"{reached:.1f} s" if reached is not None else "never")
        )
        short_steps = int((TARGET_TIME_RATIO * budget - overhead) / per_step["modern"])
        short = run_stage(args.storage, pretrain_config("modern", args.threads, **scaled(short_steps)))
        ratio = short["wall"] / budget
        verdict = "met" if short["metrics"]["val_loss"] <= target else "NOT met"
        print(
            f"modern in {TARGET_TIME_RATIO}x the budget ({short_steps} steps, {short['wall']:.1f} s = {ratio:.2f}x): "
            f"final val loss {short['metrics']['val_loss']:.4f} vs gpt2's {target:.4f}: target {verdict}"
        )

    print("\n== decoding, batch 1, greedy, tokens/s ==")
    for name in RECIPES:
        rates = decode_rates(build_model(pretrain_config(name, args.threads), vocab_size), args.threads)
        gain = rates[True] / rates[False]
        print(f"{name}: without cache {rates[False]:.0f}, with cache {rates[True]:.0f}, x{gain:.2f}")


RECIPES = ("gpt2", "modern")


def scaled(steps: int) -> dict[str, int]:
    """The baseline's schedule stretched to `steps`: warmup, evaluations and checkpoints keep their share."""
    preset = {**PRESETS["tiny"]["pretrain"], **BASELINE}
    share = steps / preset["max_steps"]
    every = max(1, round(preset["eval_interval"] * share))
    return {
        "max_steps": steps,
        "warmup_steps": max(1, round(preset["warmup_steps"] * share)),
        "eval_interval": every,
        "checkpoint_interval": every,
    }


if __name__ == "__main__":
    main()
