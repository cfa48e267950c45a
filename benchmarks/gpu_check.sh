#!/usr/bin/env bash
# GPU check: the `small` preset's pretraining (flows/config.py: 6 layers, 384 wide, context 256, batches of
# 64 x 4, torch.compile, bf16 autocast) for a few hundred steps on every GPU of this machine, data-parallel
# (DDP, one process per GPU) when there are several; prints tokens/s and MFU (model/flops.py).
#
#   benchmarks/gpu_check.sh [STEPS]      (default 300: about 2 minutes on one H200, compilation included)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#
# Needs no download: the tokens are a random 65,536-token text (the preset's 16,384-id vocabulary) repeated,
# written to a temporary folder, so the loss falls as the model learns it. Without CUDA it says so and
# exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
if ! command -v "$python" >/dev/null; then
    echo "gpu_check: no Python interpreter at $python (set PYTHON)" >&2
    exit 1
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine: nothing to check"
    exit 0
fi
exec "$python" - "${1:-300}" <<'PY'
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from flows.config import PRESETS
from model.flops import flops_per_token, mfu, peak_flops
from model.gpt import GPTConfig
from model.train import precision
from model.train_entry import PretrainSettings, launch, pretrain
from tasks.pretrain import PretrainConfig, padded_vocab_size

steps = int(sys.argv[1])
if steps < 30:  # the throughput is read from logging windows of 10 steps after the first third
    sys.exit(f"gpu_check: STEPS must be at least 30, got {steps}")
gpus = torch.cuda.device_count()
small = PRESETS["small"]
vocab = small["tokenizer"]["vocab_size"]
preset = small["pretrain"]
# Each GPU runs an equal share of a step's micro-batches: the preset's, rounded up to a multiple of the GPUs.
accum = -(-preset["grad_accum_steps"] // gpus) * gpus
cfg = PretrainConfig(
    **{
        **preset,
        "max_steps": steps,
        "warmup_steps": min(preset["warmup_steps"], steps // 2),
        "grad_accum_steps": accum,
        "nproc": gpus,
        "eval_interval": steps,  # one evaluation and one checkpoint, at the end
        "checkpoint_interval": steps,
        "log_interval": 10,
        "device": "cuda",
        "progress": False,
    }
)
model = GPTConfig(
    vocab_size=padded_vocab_size(vocab),
    block_size=cfg.block_size,
    n_layer=cfg.n_layer,
    n_head=cfg.n_head,
    n_embd=cfg.n_embd,
    dropout=cfg.dropout,
    bias=cfg.bias,
)
device = torch.device("cuda", 0)
name = torch.cuda.get_device_name(device)

with tempfile.TemporaryDirectory(prefix="gptflow-gpu-check-") as tmp:
    tokens = Path(tmp) / "tokens"
    tokens.mkdir()
    text = np.random.default_rng(0).integers(0, vocab, 1 << 16).astype(np.uint16)
    train, val = np.tile(text, 128), np.tile(text, 8)  # 8.4M and 0.5M tokens
    train.tofile(tokens / "train.bin")
    val.tofile(tokens / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab, "eot_token": 0, "train_tokens": len(train), "val_tokens": len(val)}
    (tokens / "meta.json").write_text(json.dumps(meta))
    settings = PretrainSettings(
        tokens=str(tokens),
        model=model.to_dict(),
        train=asdict(cfg.train_config()),
        work=str(Path(tmp) / "work"),
        out=str(Path(tmp) / "work" / "final"),
    )
    started = time.monotonic()
    if gpus == 1:
        _, result = pretrain(settings, log=lambda line: None)
    else:
        result, _ = launch(settings, gpus, log=lambda line: None, warn=lambda line: None)
    wall = time.monotonic() - started

# Steady state: the logging windows after the first third of the run (compilation happens in the first).
steady = [r for r in result.records if r["step"] > steps // 3]
total = statistics.median(r["tokens_per_s"] for r in steady)
per_gpu = total / gpus
tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
compute = "bf16 autocast" if precision(device) == "bf16" else "fp32 (this GPU has no bf16)"
print(
    f"gpu_check: {gpus} x {name}{' (DDP)' if gpus > 1 else ''}: the small preset's model ({cfg.n_layer} layers, "
    f"{cfg.n_embd} wide, context {cfg.block_size}, vocab {model.vocab_size:,}), {compute}"
    + (", torch.compile" if cfg.compile else "")
)
print(f"  {steps} steps of {tokens_per_step:,} tokens in {wall:.0f} s (compilation and evaluation included)")
print(f"  tokens/s: {total:,.0f} ({per_gpu:,.0f} per GPU), median of the logging windows after step {steps // 3}")
utilisation, peak = mfu(model, per_gpu, device), peak_flops(device)
if utilisation is None:
    print(f"  MFU: unknown, {name} is not in model/flops.py's table of peaks")
else:
    print(
        f"  MFU: {utilisation:.1%} per GPU ({flops_per_token(model):.3g} FLOPs/token against a "
        f"{peak / 1e12:,.0f} TFLOP/s dense bf16 peak)"
    )
first = result.records[0]
print(
    f"  loss: {first['train_loss']:.2f} at step {first['step']} -> {result.train_loss:.2f} at step {result.steps} "
    f"(val {result.val_loss:.2f})"
)
PY
