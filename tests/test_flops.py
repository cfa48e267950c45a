"""Model FLOPs utilisation: the FLOPs per token of a model, the peak of the device, and their ratio."""

from collections.abc import Callable

import pytest
import torch

from model import flops
from model.gpt import GPT, GPTConfig

# Biases and a position table make a count of every parameter differ from the matmul weights' count.
SMALL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


def test_flops_per_token_is_six_per_matmul_weight_plus_attention() -> None:
    d, layers, vocab, context = 32, 2, 64, 16
    # Per block: q, k, v (d x 3d), the attention's output (d x d), the MLP's two (d x 4d, 4d x d): 12 d^2.
    blocks = layers * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)
    head = d * vocab  # tied to the token table, which is looked up, not multiplied
    attention = 12 * layers * d * context  # PaLM: 12 * L * H * Q * T, with H * Q = n_embd
    assert flops.flops_per_token(SMALL) == 6 * (blocks + head) + attention == 172_032
    longer = GPTConfig(**{**SMALL.to_dict(), "block_size": 32})
    assert flops.flops_per_token(longer) - flops.flops_per_token(SMALL) == 12 * layers * d * 16


@pytest.mark.parametrize("options", [{}, {"rope": True, "mlp": "relu2", "qk_norm": True, "tie_embeddings": False}])
def test_the_matmul_weights_are_the_models_hidden_matrices_and_head(options: dict) -> None:
    config = GPTConfig(**{**SMALL.to_dict(), **options})
    model = GPT(config)
    hidden = [p for name, p in model.named_parameters() if p.dim() >= 2 and name.startswith("transformer.h.")]
    assert flops.matmul_params(config) == sum(p.numel() for p in hidden) + model.lm_head.weight.numel()


@pytest.fixture
def cuda_named(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make torch report a CUDA device of the given name (no GPU needed)."""

    def name(device_name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)

    return name


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM board's name
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", None),  # not an L4
        ("NVIDIA GH200 480GB", None),  # not an H200
        ("NVIDIA H100 NVL", None),  # another board, another rate
    ],
)
def test_the_gpu_peak_is_looked_up_by_device_name(
    device_name: str, peak: float | None, cuda_named: Callable[[str], None]
) -> None:
    cuda_named(device_name)
    assert flops.peak_flops(torch.device("cuda", 0)) == peak
    expected = None if peak is None else flops.flops_per_token(SMALL) * 2e6 / peak
    assert flops.mfu(SMALL, 2e6, torch.device("cuda", 0)) == expected


def test_mfu_is_none_for_an_unknown_gpu(cuda_named: Callable[[str], None]) -> None:
    cuda_named("NVIDIA GeForce GTX 1080")
    assert flops.mfu(SMALL, 1e6, torch.device("cuda")) is None
    assert flops.mfu(SMALL, 1e6, torch.device("meta")) is None  # neither a GPU nor the CPU


def test_the_cpu_peak_is_measured_once_per_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops, "_cpu_peaks", {})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = flops.peak_flops(torch.device("cpu"))
        assert 1e8 < peak < 1e13  # a real fp32 matmul rate: between 0.1 GFLOP/s and 10 TFLOP/s
        assert flops.mfu(SMALL, 1000.0, torch.device("cpu")) == flops.flops_per_token(SMALL) * 1000.0 / peak

        measured: list[int] = []
        monkeypatch.setattr(flops, "measure_cpu_matmul_flops", lambda: measured.append(1) or 5e10)
        assert flops.peak_flops(torch.device("cpu")) == peak and not measured  # cached
        torch.set_num_threads(2)
        assert flops.peak_flops(torch.device("cpu")) == 5e10 and measured == [1]  # another count: measured
    finally:
        torch.set_num_threads(before)
