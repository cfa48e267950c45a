"""Measure what quantization buys and costs on this machine: greedy decoding speed with the KV cache, the
matmuls of one decoding step, CPU forward latency and file size, fp32 vs int8 vs int4 on every CPU path
tried, and, on a trained model from a store, the validation loss each one adds.

    python benchmarks/quantize_bench.py                     # tiny and small presets' shapes, 1 thread
    python benchmarks/quantize_bench.py --preset small --runs 9 --threads 1,2
    python benchmarks/quantize_bench.py --store storage     # + loss increase of the store's latest finetune

Shapes: the tiny and small presets' models (flows/config.py: 4 layers x 128 wide, context 128, vocab 2,048;
6 x 384, context 256, vocab 16,384). Speed and size depend on the shapes, not on what was learned, so they
are measured on randomly initialised models. Decoding is one stream (batch 1), a prompt a quarter of the
context long, then greedy tokens up to the full context, so that every step is a cache hit.

CPU paths (the first two of each width are what `model.quantize.load_for_cpu` runs):
- int8 dynamic: PyTorch's dynamic int8 Linear, weights per output channel, activations quantized per call;
  the x86 engine packs Linear weights for fbgemm. Also shown with the output head left in fp32 (what the
  head's share of the weights is worth) and packed for oneDNN (the engine's other kernel).
- int8 weight-only: `_weight_int8pack_mm` (torchao's and gpt-fast's), on bf16 or fp32 activations.
- int4 kernel: `_weight_int4pack_mm_for_cpu` in groups of 64 on bf16 activations (its fp32 path as well,
  in the matmul table only: it is too slow to decode with).

The loss increase needs a trained model (an untrained one predicts nearly uniformly, so even zeroed
weights lose nothing): with --store, the latest fine-tuned model there is scored on the first
--eval-tokens validation tokens of its tokens version, as the quantize stage does, for each stored format
(dequantized) and each CPU path, beside a model whose weight matrices are zeroed, to show what a broken
quantization costs. This is the measurement behind QuantizeConfig.max_loss_increase's defaults.
"""

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from flows.config import PRESETS
from model.checkpoint import WEIGHTS, load_model, save_model
from model.evaluate import eval_loss, tokens_read
from model.gpt import GPT, GPTConfig
from model.quantize import (
    Int4Linear,
    decode_tokens_per_s,
    forward_latencies_ms,
    load_for_cpu,
    load_quantized,
    quantize_state_dict,
    read_quantized,
    save_quantized,
    with_cpu_kernels,
)
from storage.store import Store
from storage.tokens import open_tokens
from tasks.pretrain import padded_vocab_size

SHAPES = ("tiny", "small")


def preset_shape(preset: str) -> GPTConfig:
    """The preset's model: its pretrain shape and its tokenizer's vocabulary."""
    shape = {k: PRESETS[preset]["pretrain"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    return GPTConfig(vocab_size=padded_vocab_size(PRESETS[preset]["tokenizer"]["vocab_size"]), **shape)


class Int8WeightOnlyLinear(nn.Module):
    """A stored int8 Linear on `_weight_int8pack_mm`: int8 weights, activations and scales in `dtype`."""

    def __init__(self, entry: dict, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = entry["shape"]
        self.dtype = dtype
        self.register_buffer("weight", entry["qweight"].clone())
        self.register_buffer("scales", entry["scales"].to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.dtype), self.weight, self.scales)
        y = y.float().view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Fp32Linear(Int4Linear):
    """Int4Linear on the kernel's fp32 activations and scales."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).float(), self.weight, self.group_size, self.scales_and_zeros.float()
        )
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def replace_linears(model: GPT, qstate: dict, make: Callable[[dict, torch.Tensor | None], nn.Module]) -> GPT:
    """A copy of `model` whose Linear layers are `make(stored entry, bias)`."""
    model = copy.deepcopy(model).eval()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear):
            entry = qstate["quantized"][qstate["aliases"].get(f"{name}.weight", f"{name}.weight")]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(entry, layer.bias))
    return model


def with_engine(engine: str, make: Callable[[], GPT]) -> GPT:
    """What `make` builds with the quantized engine set to `engine` (packing happens as the layers are built)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return make()
    finally:
        torch.backends.quantized.engine = before


def cpu_paths(model: GPT) -> dict[str, GPT]:
    """Every CPU path measured, keyed by label, as models built from the stored int8 / int4 (groups of 64)."""
    q8 = quantize_state_dict(model.state_dict(), bits=8)
    q4 = quantize_state_dict(model.state_dict(), bits=4, group_size=64)
    paths = {"fp32": model, "int8 dynamic (fbgemm)": with_cpu_kernels(model, q8)}
    head_fp32 = copy.deepcopy(paths["int8 dynamic (fbgemm)"])
    head_fp32.lm_head = copy.deepcopy(model.lm_head)
    if model.config.tie_embeddings:
        head_fp32.lm_head.weight = head_fp32.transformer.wte.weight
    paths["int8 dynamic, fp32 head"] = head_fp32
    if "onednn" in torch.backends.quantized.supported_engines:
        paths["int8 dynamic (onednn)"] = with_engine("onednn", lambda: with_cpu_kernels(model, q8))
    paths["int8 weight-only bf16"] = replace_linears(
        model, q8, lambda entry, bias: Int8WeightOnlyLinear(entry, bias, torch.bfloat16)
    )
    paths["int4 kernel bf16"] = with_cpu_kernels(model, q4)
    return paths


def matmul_paths(model: GPT) -> dict[str, GPT]:
    """cpu_paths plus the ones too slow to decode with: weight-only kernels on fp32 activations."""
    q8 = quantize_state_dict(model.state_dict(), bits=8)
    q4 = quantize_state_dict(model.state_dict(), bits=4, group_size=64)
    paths = {label: m for label, m in cpu_paths(model).items() if label != "int8 dynamic, fp32 head"}
    paths["int8 weight-only fp32"] = replace_linears(
        model, q8, lambda entry, bias: Int8WeightOnlyLinear(entry, bias, torch.float32)
    )
    paths["int4 kernel fp32"] = replace_linears(
        model, q4, lambda entry, bias: Int4Fp32Linear(entry["qweight"], entry["scales"], tuple(entry["shape"]), bias)
    )
    return paths


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The matmul layers of a model in the order a forward pass runs them (nn.Linear, int8, int4 alike)."""
    return [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


@torch.inference_mode()
def step_matmuls_ms(paths: dict[str, GPT], rounds: int) -> dict[str, float]:
    """Median time (ms) of one decoding step's matmuls: every weight matrix times one vector, in model order,
    so that each matrix comes from memory as in decoding, not from a cache it was just read into."""
    layers = {label: linear_layers(m) for label, m in paths.items()}
    inputs = [torch.randn(1, 1, layer.in_features) for layer in layers["fp32"]]  # (1, 1, in) per layer

    def step(label: str) -> None:
        for layer, x in zip(layers[label], inputs, strict=True):
            layer(x)

    times: dict[str, list[float]] = {label: [] for label in paths}
    for label in paths:
        step(label)
    for _ in range(rounds):
        for label in paths:  # taking turns, as decode_tokens_per_s
            start = time.perf_counter()
            step(label)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) * 1000.0 for label, t in times.items()}


def bench(preset: str, runs: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(preset_shape(preset)).eval()
    block, vocab = model.config.block_size, model.config.vocab_size
    print(
        f"\n{preset}: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters ({model.config.n_layer} layers x "
        f"{model.config.n_embd}, context {block}, vocab {vocab:,}), {threads} thread{'s' if threads > 1 else ''}"
    )

    matmuls = step_matmuls_ms(matmul_paths(model), rounds=5 * runs)
    print(f"  {'one step: every matmul once':<28} {'ms':>9} {'vs fp32':>8}")
    for label, ms in matmuls.items():
        print(f"  {label:<28} {ms:>9.3f} {matmuls['fp32'] / ms:>7.2f}x")

    paths = cpu_paths(model)
    prompt = torch.randint(0, vocab, (1, block // 4))  # (1, T): one stream
    decode = decode_tokens_per_s(paths, prompt, block - prompt.size(1), runs=runs)
    new_tokens = block - prompt.size(1)
    print(
        f"  {'greedy decoding, KV cache':<28} {'tokens/s':>9} {'vs fp32':>8}   ({prompt.size(1)} + {new_tokens} tokens)"
    )
    for label, speed in decode.items():
        print(f"  {label:<28} {speed:>9.1f} {speed / decode['fp32']:>7.2f}x")

    idx = torch.randint(0, vocab, (1, block))  # (1, T): one full context
    forward = {label: paths[label] for label in ("fp32", "int8 dynamic (fbgemm)", "int4 kernel bf16")}
    latency = forward_latencies_ms(forward, idx, runs=runs)
    print(f"  {'forward, one full context':<28} {'ms':>9} {'vs fp32':>8}")
    for label, ms in latency.items():
        print(f"  {label:<28} {ms:>9.2f} {latency['fp32'] / ms:>7.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(folder / "fp32", model)
        sizes = {"fp32": (folder / "fp32" / WEIGHTS).stat().st_size}
        for bits, group in ((8, 64), (4, 32), (4, 64), (4, 128)):
            path = save_quantized(folder / f"int{bits}-{group}", model, bits=bits, group_size=group)
            sizes["int8" if bits == 8 else f"int4, groups of {group}"] = path.stat().st_size
    print(f"  {'file':<28} {'bytes':>11} {'smaller':>8}")
    for label, size in sizes.items():
        print(f"  {label:<28} {size:>11,} {sizes['fp32'] / size:>7.2f}x")


def zeroed(model: GPT) -> GPT:
    """A copy of `model` whose weight matrices are all zero: what a dequantizer that returns zeros loads."""
    copy_ = GPT(model.config)
    copy_.load_state_dict({k: torch.zeros_like(v) if v.dim() == 2 else v for k, v in model.state_dict().items()})
    return copy_.eval()


def loss_increase(root: Path, eval_tokens: int, batch: int) -> None:
    torch.set_num_threads(1)  # as the quantize stage: the thread count decides the losses' last digits
    store = Store(root)
    version = store.latest("finetune")
    if version is None:
        raise SystemExit(f"{root}: no finetune version to measure (run the pipeline until finetune first)")
    source = store.path("finetune", version)
    tokens = store.lineage("finetune", version).get("tokens")
    if tokens is None:
        raise SystemExit(f"{source}: its lineage names no tokens version")
    val = open_tokens(store.path("tokens", tokens), "val")
    model = load_model(source, "cpu")
    block = model.config.block_size

    def score(m: nn.Module) -> float:
        return eval_loss(m, val, block, batch, eval_tokens, "cpu")

    fp32 = score(model)
    read = tokens_read(val, eval_tokens)
    print(f"\nfinetune/{version} on tokens/{tokens}: {read:,} validation tokens read, fp32 loss {fp32:.4f}")
    print(f"  {'variant':<36} {'val loss':>10} {'increase':>9}")
    rows: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in ((8, 64), (4, 32), (4, 64), (4, 128)):
            label = "int8" if bits == 8 else f"int4, groups of {group}"
            folder = Path(tmp) / label
            save_quantized(folder, model, bits=bits, group_size=group)
            rows[f"{label}: stored weights"] = load_quantized(folder)
            rows[f"{label}: {'dynamic (fbgemm)' if bits == 8 else 'kernel bf16'}"] = load_for_cpu(folder)
            if bits == 8:
                rows["int8: weight-only bf16"] = replace_linears(
                    rows["int8: stored weights"],
                    read_quantized(folder)[1],
                    lambda entry, bias: Int8WeightOnlyLinear(entry, bias, torch.bfloat16),
                )
    rows["zeroed weights"] = zeroed(model)
    for label, m in rows.items():
        loss = score(m)
        print(f"  {label:<36} {loss:>10.4f} {loss - fp32:>+9.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per variant (the median is shown)")
    parser.add_argument("--threads", default="1", help="torch thread counts to measure, comma-separated")
    parser.add_argument("--store", type=Path, help="also measure the loss increase of this store's latest finetune")
    parser.add_argument(
        "--eval-tokens", type=int, default=32_768, help="validation tokens read (the tiny preset's quantize setting)"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}")
    for threads in [int(t) for t in args.threads.split(",")]:
        for preset in SHAPES if args.preset == "all" else [args.preset]:
            bench(preset, args.runs, threads)
    if args.store is not None:
        loss_increase(args.store, args.eval_tokens, batch=16)


if __name__ == "__main__":
    main()
