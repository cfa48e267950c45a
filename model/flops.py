"""Model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, appendix B): the FLOPs one training token
costs a model, the peak FLOP/s of the device it trains on, and their ratio at a measured throughput.

MFU counts the model's own arithmetic only (no recomputation, no optimizer step), so it compares runs
across implementations and machines.
"""

import re
import time

import torch

from model.gpt import GPTConfig

# Dense bf16 tensor-core peaks in FLOP/s, by CUDA device name. NVIDIA's data sheets list these figures
# "with sparsity" (2:4 structured), which is twice the dense rate a training run can reach:
# - A100 data sheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): BFLOAT16 Tensor Core 312 TFLOPS dense
#   (624 with sparsity), the same for the SXM and PCIe boards, 40 and 80 GB;
# - H100 data sheet: BFLOAT16 Tensor Core 1,979 TFLOPS (SXM) and 1,513 (PCIe) with sparsity;
# - H200 data sheet: BFLOAT16 Tensor Core 1,979 TFLOPS with sparsity (H200 SXM, the H100 SXM's GH100);
# - L4 data sheet: BF16 Tensor Core 242 TFLOPS with sparsity.
# NVL boards (H100 NVL, H200 NVL) and MIG slices run at other rates and GH200 is another product: they are
# not in the table, and get None rather than a wrong figure. First match wins.
_CUDA_PEAKS: tuple[tuple[re.Pattern[str], float | None], ...] = (
    (re.compile(r"\bNVL\b|\bMIG\b", re.IGNORECASE), None),
    (re.compile(r"\bH100\b.*\bPCIe\b", re.IGNORECASE), 756e12),
    (re.compile(r"\bH100\b", re.IGNORECASE), 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (re.compile(r"\bH200\b", re.IGNORECASE), 989e12),
    (re.compile(r"\bA100\b", re.IGNORECASE), 312e12),
    (re.compile(r"\bL4\b", re.IGNORECASE), 121e12),
)
# A square fp32 matmul large enough to run at the CPU's peak (on 2 threads of this machine's Zen 3 cores
# ~85 GFLOP/s, see ENV-NOTES: ~25 ms each), timed for at least this long, best run kept.
_CPU_MATMUL_SIZE = 1024
_CPU_MEASURE_S = 0.25
_cpu_peaks: dict[int, float] = {}  # measured fp32 matmul FLOP/s, by intra-op thread count


def matmul_params(config: GPTConfig) -> int:
    """The weights that multiply activations: the blocks' matrices (the hidden matrices) and the output head.
    Embedding lookups, norms and biases cost no matmul FLOPs, so the token table counts only as the head
    (tied or not, the head is one n_embd x vocab_size matmul).

    Counted from the config, by model/gpt.py's layout: per block q, k, v (n_embd x 3 n_embd), the attention's
    output projection (n_embd x n_embd) and the MLP's two (n_embd x 4 n_embd and back), 12 n_embd^2. (A model
    built on the meta device would give the shapes too, but its initialisation imports torch._dynamo: ~6 s.)
    """
    return 12 * config.n_layer * config.n_embd**2 + config.n_embd * config.vocab_size


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token (forward and backward, PaLM appendix B): 6 per matmul weight (2 forward, 4
    backward) plus attention's 12 * n_layer * n_embd * block_size (its score and value matmuls over the whole
    context, as PaLM and nanoGPT count them; a causal kernel skips about half, so MFU stays comparable)."""
    attention = 12 * config.n_layer * config.n_embd * config.block_size
    return float(6 * matmul_params(config) + attention)


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name (torch.cuda.get_device_name), None if not listed."""
    for pattern, peak in _CUDA_PEAKS:
        if pattern.search(name):
            return peak
    return None


def measure_cpu_matmul_flops() -> float:
    """fp32 matmul FLOP/s on this CPU at the current intra-op thread count (the best of short timed runs)."""
    a = torch.randn(_CPU_MATMUL_SIZE, _CPU_MATMUL_SIZE)
    b = torch.randn(_CPU_MATMUL_SIZE, _CPU_MATMUL_SIZE)
    out = torch.empty(_CPU_MATMUL_SIZE, _CPU_MATMUL_SIZE)
    torch.mm(a, b, out=out)  # warm-up: thread pool and caches
    best = float("inf")
    deadline = time.perf_counter() + _CPU_MEASURE_S
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
        runs += 1
    return 2 * _CPU_MATMUL_SIZE**3 / best


def peak_flops(device: torch.device) -> float | None:
    """The peak FLOP/s a training run on `device` can be measured against: the dense bf16 tensor-core peak
    of a listed CUDA device (the loop autocasts to bf16 there), the measured fp32 matmul peak of the CPU at
    the current intra-op thread count (call it where the loop runs: inside its fixed thread count; measured
    once per count), None for anything else."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        threads = torch.get_num_threads()
        if threads not in _cpu_peaks:
            _cpu_peaks[threads] = measure_cpu_matmul_flops()
        return _cpu_peaks[threads]
    return None


def mfu(config: GPTConfig, tokens_per_s: float, device: torch.device) -> float | None:
    """The fraction of `device`'s peak that training `config` at `tokens_per_s` uses, None when the peak is
    unknown. `tokens_per_s` is that one device's: divide a data-parallel run's total by its processes."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return flops_per_token(config) * tokens_per_s / peak
