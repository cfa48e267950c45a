"""Stage "quantize": the fine-tuned model's weights in int8 (or int4), with what that costs and saves.

Output: `model_int8.pt` (or `model_int4.pt`, see model/quantize.py for the layout), `model_config.json`,
and `quantize_report.json`: file sizes; the validation loss of the float model, of the stored weights
(dequantized) and of the CPU kernels (`load_for_cpu`), on the same windows; CPU forward latency and greedy
decoding speed (KV cache, one stream) of the float model and the CPU kernels, measured in the same run.

Quality gate: when the stored weights or the CPU kernels raise the validation loss by more than
`max_loss_increase` nats per token, the version is still published, for the record, but marked
`rejected: true` with a `rejected_reason` (in the report and in the manifest's metrics), and a warning says
so; the CPU kernels and timings of weights already past the bound are not measured. Its consumers refuse
it (`rejected_reason`): `gptflow generate` and `gptflow export` name the version and the reason, and the
evaluation scores it but never chooses it.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from model.checkpoint import WEIGHTS, load_model
from model.evaluate import eval_loss, scored_targets, tokens_read
from model.quantize import (
    decode_tokens_per_s,
    forward_latencies_ms,
    load_for_cpu,
    load_quantized,
    quantized_file,
    save_quantized,
)
from model.train import CPU_THREADS, fixed_threads
from storage.errors import DataIntegrityError
from storage.store import atomic_write_json
from storage.tokens import open_tokens, read_meta
from tasks.stage import Stage, StageConfig, StageContext, stage_task

REPORT = "quantize_report.json"
# The bound on the loss increase when max_loss_increase is unset, per bit width (nats per token). Measured
# on the tiny preset's fine-tuned model (4 layers, 128 wide, BPE 2k, val loss 4.70 on 32K validation
# tokens; benchmarks/quantize_bench.py --store): int8 +0.0000, int4 in groups of 32/64/128 +0.008/+0.007/
# +0.007, zeroed weights +2.92. Another build (val loss 4.73): stored int8 -0.0001, int4 +0.0003/+0.0020/
# +0.0093; its CPU kernels, which also round the activations, int8 +0.0011 (7 bits per call), int4 +0.0006/
# +0.0023/+0.0087 (bf16); zeroed +2.90. The bounds leave room for larger models and other data (int4's error
# grows with the weights' outliers) and stay far below what a broken quantization costs.
DEFAULT_MAX_LOSS_INCREASE = {8: 0.05, 4: 0.15}


class QuantizeConfig(StageConfig):
    """How the fine-tuned model is quantized and how the result is measured."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"latency_runs"})

    bits: Literal[8, 4] = Field(
        8,
        description="Weight precision: 8 = int8 per output channel (PyTorch's dynamic int8 CPU kernels), 4 = int4 "
        "per group (smaller files; PyTorch's int4 CPU kernel on bf16 activations).",
    )
    group_size: Literal[32, 64, 128] = Field(
        64,
        description="int4 only: weights sharing one scale. Smaller is more accurate and larger on disk "
        "(llama.cpp's Q4_0 uses 32, GPTQ/AWQ default to 128; 64 sits between).",
    )
    eval_tokens: int = Field(
        65_536,
        ge=2,
        le=1_000_000_000,
        description="Validation tokens read to measure the loss change (the first ones, in fixed windows; each "
        "but the first is a scored target); 64K is 512 windows of the tiny preset's 128-token context, seconds "
        "on 2 CPU cores.",
    )
    max_loss_increase: float | None = Field(
        None,
        ge=0.0,
        description="Reject the version (published, marked rejected, never served) when the stored weights' or "
        "the CPU kernels' validation loss exceeds the float model's by more than this (nats per token). None: "
        "0.05 for int8, 0.15 for int4, far above what the tiny preset's model loses (int8 +0.0000, int4 +0.008) "
        "and far below what zeroed weights cost it (+2.9).",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Windows per forward pass while measuring the loss.")
    latency_runs: int = Field(
        7,
        ge=1,
        le=1000,
        description="Timed forward passes, and timed decoding runs, per model; the medians are reported.",
    )

    def loss_bound(self) -> float:
        """The largest loss increase (nats per token) the stage accepts: max_loss_increase or its default."""
        return DEFAULT_MAX_LOSS_INCREASE[self.bits] if self.max_loss_increase is None else self.max_loss_increase


def loss_problems(cfg: QuantizeConfig, loss_fp32: float, losses: Mapping[str, float]) -> list[str]:
    """What raises the validation loss past the bound, one phrase per model in `losses` (named by its key)."""
    bound = cfg.loss_bound()
    return [
        f"{what} raise the validation loss from {loss_fp32:.4f} to {loss:.4f} nats/token ({loss - loss_fp32:+.4f}), "
        f"more than max_loss_increase {bound}"
        for what, loss in losses.items()
        if not loss - loss_fp32 <= bound  # written so that a NaN loss is a problem too
    ]


def rejected_reason(manifest: Mapping[str, Any]) -> str | None:
    """Why a quantize version was rejected by its quality gate, from its manifest; None when it was not."""
    metrics = manifest.get("metrics") or {}
    return str(metrics.get("rejected_reason") or "no reason recorded") if metrics.get("rejected") else None


def quantize_model(ctx: StageContext, cfg: QuantizeConfig, source: Path) -> dict[str, Any]:
    """Quantize the model in `source` into ctx.out and measure it against the float model."""
    model = load_model(source, "cpu")
    tokens_dir = ctx.input_path("tokens")
    meta = read_meta(tokens_dir)
    if meta["vocab_size"] > model.config.vocab_size:
        raise DataIntegrityError(
            f"{tokens_dir / 'meta.json'}: vocab_size {meta['vocab_size']} exceeds the model's "
            f"{model.config.vocab_size} ({source / 'model_config.json'})"
        )
    val = open_tokens(tokens_dir, "val")
    save_quantized(ctx.out, model, bits=cfg.bits, group_size=cfg.group_size)
    weights = quantized_file(ctx.out)
    quantized = load_quantized(ctx.out, "cpu")  # exactly what a reader of the file gets

    block = model.config.block_size
    ctx.log.info("measuring the validation loss on %d tokens", tokens_read(val, cfg.eval_tokens))
    loss_fp32 = eval_loss(model, val, block, cfg.batch_size, cfg.eval_tokens, "cpu")
    loss_quantized = eval_loss(quantized, val, block, cfg.batch_size, cfg.eval_tokens, "cpu")
    problems = loss_problems(cfg, loss_fp32, {f"the stored int{cfg.bits} weights": loss_quantized})
    report: dict[str, Any] = {
        "bits": cfg.bits,
        "group_size": cfg.group_size if cfg.bits == 4 else None,
        "source_version": ctx.inputs["finetune"],
        "fp32_file_bytes": (source / WEIGHTS).stat().st_size,
        "quantized_file": weights.name,
        "quantized_file_bytes": weights.stat().st_size,
        "eval_tokens": tokens_read(val, cfg.eval_tokens),
        "scored_tokens": len(scored_targets(val, cfg.eval_tokens)),
        "val_loss_fp32": loss_fp32,
        "val_loss_quantized": loss_quantized,
        "val_loss_delta": loss_quantized - loss_fp32,
        "max_loss_increase": cfg.loss_bound(),
    }
    report["size_ratio"] = report["fp32_file_bytes"] / report["quantized_file_bytes"]
    if cfg.bits == 8:
        report["method"] = (
            "int8 weights per output channel; CPU inference on PyTorch's dynamic int8 Linear kernels (fbgemm), "
            "output head included"
        )
    else:
        report["method"] = (
            f"int4 weights in groups of {cfg.group_size}; CPU inference on PyTorch's int4 kernel "
            "(_weight_int4pack_mm_for_cpu) with bf16 activations"
        )
    if problems:
        # Never served, so measured no further: the CPU kernels would run the same broken weights (and the int8
        # one refuses NaN activations outright).
        return {**report, "rejected": True, "rejected_reason": "; ".join(problems)}

    fast = load_for_cpu(ctx.out)  # what a reader of the file runs on CPU
    # The CPU kernels also round the activations (int8: to 7 bits per call; int4: to bf16).
    loss_kernel = eval_loss(fast, val, block, cfg.batch_size, cfg.eval_tokens, "cpu")
    problems = loss_problems(cfg, loss_fp32, {f"the int{cfg.bits} CPU kernels": loss_kernel})
    report.update(
        val_loss_cpu_kernel=loss_kernel,
        val_loss_cpu_kernel_delta=loss_kernel - loss_fp32,
        rejected=bool(problems),
        rejected_reason="; ".join(problems) if problems else None,
    )
    idx = torch.as_tensor(val[: min(len(val), block)].astype("int64"))[None, :]  # (1, T): one full context
    report["cpu_threads"] = torch.get_num_threads()
    latency = forward_latencies_ms({"fp32": model, "quantized": fast}, idx, runs=cfg.latency_runs)
    report["latency_fp32_ms"], report["latency_quantized_ms"] = latency["fp32"], latency["quantized"]
    report["latency_speedup"] = report["latency_fp32_ms"] / report["latency_quantized_ms"]
    # Decoding: one stream, a quarter-context prompt, then greedy tokens up to the full context, every step a
    # cache hit.
    prompt_len = max(1, min(len(val), block) // 4)
    report["decode_prompt_tokens"], report["decode_new_tokens"] = prompt_len, block - prompt_len
    decode = decode_tokens_per_s(
        {"fp32": model, "quantized": fast}, idx[:, :prompt_len], block - prompt_len, runs=cfg.latency_runs
    )
    report["decode_tokens_per_s_fp32"], report["decode_tokens_per_s_quantized"] = decode["fp32"], decode["quantized"]
    report["decode_speedup"] = report["decode_tokens_per_s_quantized"] / report["decode_tokens_per_s_fp32"]
    return report


def build(ctx: StageContext, cfg: QuantizeConfig) -> dict[str, Any]:
    ctx.require_common_ancestor("finetune", "tokens")  # the loss change is measured on the model's own data
    with fixed_threads(CPU_THREADS):  # as training: the thread count decides the losses' last digits
        report = quantize_model(ctx, cfg, ctx.input_path("finetune"))
    atomic_write_json(ctx.out / REPORT, report)
    if report["rejected"]:
        ctx.log.warning(
            "quantize/%s of finetune/%s is rejected and will not be served: %s",
            ctx.version,
            ctx.inputs["finetune"],
            report["rejected_reason"],
        )
    if "decode_speedup" in report:
        ctx.log.info(
            "int%d: %.2fx smaller, val loss %.4f -> %.4f (%+.4f; CPU kernels %+.4f), CPU forward %.2f -> %.2f ms, "
            "decoding %.0f -> %.0f tokens/s",
            cfg.bits,
            report["size_ratio"],
            report["val_loss_fp32"],
            report["val_loss_quantized"],
            report["val_loss_delta"],
            report["val_loss_cpu_kernel_delta"],
            report["latency_fp32_ms"],
            report["latency_quantized_ms"],
            report["decode_tokens_per_s_fp32"],
            report["decode_tokens_per_s_quantized"],
        )
    return report


STAGE = Stage(
    name="quantize",
    module=__name__,
    config=QuantizeConfig,
    build=build,
    inputs=("finetune", "tokens"),
    libraries=("torch", "numpy"),
    records=(REPORT,),  # holds CPU timings besides the losses; the weights are what the stage makes
)
quantize_task = stage_task(STAGE)
