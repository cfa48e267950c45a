"""Measure what quantization buys and costs on this machine: CPU forward latency and file size, fp32 vs int8
vs int4, and, on a trained model from a store, the validation loss each one adds.

    python benchmarks/quantize_bench.py                  # tiny and small shapes
    python benchmarks/quantize_bench.py --preset small --runs 20 --threads 2
    python benchmarks/quantize_bench.py --store storage  # + loss increase of the store's latest finetune

Latency and size depend on the shapes, not on what was learned, so they are measured on randomly
initialised models. Shapes: "tiny" is nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, context 64),
"small" its shakespeare-char GPU config (6 layers, 6 heads, 384 wide, context 256).

The loss increase needs a trained model (an untrained one predicts nearly uniformly, so even zeroed
weights lose nothing): with --store, the latest fine-tuned model there is scored on the first
--eval-tokens validation tokens of its tokens version, as the quantize stage does, beside a model whose
weight matrices are zeroed, to show what a broken quantization costs. This is the measurement behind
QuantizeConfig.max_loss_increase's defaults.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from model.checkpoint import WEIGHTS, load_model, save_model
from model.evaluate import eval_loss, tokens_read
from model.gpt import GPT, GPTConfig
from model.quantize import forward_latencies_ms, load_quantized, save_quantized, to_dynamic_int8
from storage.store import Store
from storage.tokens import open_tokens

SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


def bench(name: str, vocab_size: int, batch: int, runs: int) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, dropout=0.0, **SHAPES[name])).eval()
    idx = torch.randint(0, vocab_size, (batch, model.config.block_size))  # (B, T): full contexts
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(folder / "fp32", model)
        sizes = {"fp32": (folder / "fp32" / WEIGHTS).stat().st_size}
        variants = {"fp32": model}
        for bits, group in ((8, 0), (4, 64)):
            path = save_quantized(folder / f"int{bits}", model, bits=bits, group_size=group or 64)
            sizes[f"int{bits}"] = path.stat().st_size
            variants[f"int{bits} dequantized"] = load_quantized(folder / f"int{bits}")
        variants["int8 dynamic kernels"] = to_dynamic_int8(variants["int8 dequantized"])

    params = model.num_params(non_embedding=False)
    print(f"\n{name}: {params / 1e6:.2f}M parameters, batch {batch} x {model.config.block_size} tokens")
    latency = forward_latencies_ms(variants, idx, runs=runs)
    print(f"  {'variant':<22} {'latency ms':>10} {'speedup':>8}")
    for label, ms in latency.items():
        print(f"  {label:<22} {ms:>10.2f} {latency['fp32'] / ms:>7.2f}x")
    print(f"  {'file':<22} {'bytes':>10} {'smaller':>8}")
    for label, size in sizes.items():
        print(f"  {label:<22} {size:>10,} {sizes['fp32'] / size:>7.2f}x")


def zeroed(model: GPT) -> GPT:
    """A copy of `model` whose weight matrices are all zero: what a dequantizer that returns zeros loads."""
    copy = GPT(model.config)
    copy.load_state_dict({k: torch.zeros_like(v) if v.dim() == 2 else v for k, v in model.state_dict().items()})
    return copy.eval()


def loss_increase(root: Path, eval_tokens: int, batch: int) -> None:
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

    def score(m: GPT) -> float:
        return eval_loss(m, val, block, batch, eval_tokens, "cpu")

    fp32 = score(model)
    read = tokens_read(val, eval_tokens)
    print(f"\nfinetune/{version} on tokens/{tokens}: {read:,} validation tokens read, fp32 loss {fp32:.4f}")
    print(f"  {'variant':<22} {'val loss':>10} {'increase':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in ((8, 64), (4, 32), (4, 64), (4, 128)):
            folder = Path(tmp) / f"int{bits}-{group}"
            save_quantized(folder, model, bits=bits, group_size=group)
            loss = score(load_quantized(folder))
            label = "int8" if bits == 8 else f"int4, groups of {group}"
            print(f"  {label:<22} {loss:>10.4f} {loss - fp32:>+9.4f}")
    loss = score(zeroed(model))
    print(f"  {'zeroed weights':<22} {loss:>10.4f} {loss - fp32:>+9.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--vocab-size", type=int, default=2048, help="a small BPE vocabulary by default")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10, help="timed passes per variant (the median is shown)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--store", type=Path, help="also measure the loss increase of this store's latest finetune")
    parser.add_argument(
        "--eval-tokens", type=int, default=32_768, help="validation tokens read (the tiny preset's quantize setting)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine {torch.backends.quantized.engine}")
    for name in SHAPES if args.preset == "all" else [args.preset]:
        bench(name, args.vocab_size, args.batch, args.runs)
    if args.store is not None:
        loss_increase(args.store, args.eval_tokens, batch=16)


if __name__ == "__main__":
    main()
