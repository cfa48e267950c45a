"""Measure what the KV cache buys when generating on this CPU: greedy decoding tokens/s with and without it.

    python benchmarks/decode_bench.py                    # tiny and small shapes, both recipes, 1 thread
    python benchmarks/decode_bench.py --preset small --runs 5 --threads 2 --batch 4

Shapes as benchmarks/quantize_bench.py: "tiny" is nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide,
context 64), "small" its shakespeare-char GPU config (6 layers, 6 heads, 384 wide, context 256). Each run
starts from a prompt a quarter of the context long and generates up to the full context, so every cached
step is a cache hit (past the context, GPT.generate re-fills the window each step and the cache buys
nothing). Speed depends on the shapes, not on what was learned: the models are randomly initialised.
"""

import argparse
import statistics
import time

import torch

from model.gpt import GPT, GPTConfig

SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}
RECIPES = {
    "gpt2": {},
    "modern": dict(rope=True, qk_norm=True, mlp="relu2", tie_embeddings=False),
}


@torch.inference_mode()
def tokens_per_s(model: GPT, prompt: torch.Tensor, new_tokens: int, runs: int) -> dict[bool, float]:
    """Median new tokens/s of greedy decoding, keyed by use_cache; the two take turns run by run."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for use_cache in times:
        model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)  # warm-up
    for _ in range(runs):
        for use_cache, spent in times.items():
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
            spent.append(time.perf_counter() - start)
    return {use_cache: prompt.size(0) * new_tokens / statistics.median(t) for use_cache, t in times.items()}


def bench(shape: str, recipe: str, vocab_size: int, batch: int, runs: int) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, dropout=0.0, **SHAPES[shape], **RECIPES[recipe])).eval()
    block = model.config.block_size
    prompt = torch.randint(0, vocab_size, (batch, block // 4))  # (B, T)
    new_tokens = block - prompt.size(1)
    speed = tokens_per_s(model, prompt, new_tokens, runs)
    print(
        f"  {shape:<6} {recipe:<7} {model.num_params() / 1e6:>6.2f}M  {prompt.size(1):>3} + {new_tokens:>3} tokens  "
        f"{speed[False]:>9.0f} {speed[True]:>9.0f} {speed[True] / speed[False]:>6.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--vocab-size", type=int, default=2048, help="a small BPE vocabulary by default")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (the median is shown)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, greedy")
    print(f"  {'shape':<6} {'recipe':<7} {'params':>7}  {'prompt + new':<18} {'no cache':>9} {'cache':>9} {'ratio':>7}")
    print(f"  {'':<6} {'':<7} {'':>7}  {'':<18} {'tokens/s':>9} {'tokens/s':>9}")
    for shape in SHAPES if args.preset == "all" else [args.preset]:
        for recipe in RECIPES if args.recipe == "all" else [args.recipe]:
            bench(shape, recipe, args.vocab_size, args.batch, args.runs)


if __name__ == "__main__":
    main()
