"""Quantized models on CPU kernels: the int8 and int4 kernels run exactly the stored integers, every matmul of
a decoding step (the output head included) runs on them, they decode a trained model as its float model does,
and int8 decodes the small preset's model faster than fp32."""

from collections import Counter
from pathlib import Path

import builders
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from flows.config import PRESETS
from model.evaluate import eval_loss
from model.gpt import GPT, GPTConfig
from model.quantize import (
    Int4Linear,
    decode_tokens_per_s,
    dequantize_int4,
    load_for_cpu,
    load_quantized,
    quantize_int4,
    quantize_int8,
    save_quantized,
    to_dynamic_int8,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 16
KERNEL_OPS = {8: "quantized::linear_dynamic", 4: "aten::_weight_int4pack_mm_for_cpu"}


@pytest.fixture(scope="module")
def trained(one_torch_thread: None) -> tuple[GPT, torch.Tensor]:
    """A tiny GPT trained on a Markov chain (sharp predictions, as a served model's), and held-out ids."""
    ids = builders.markov_tokens(5000, VOCAB)
    return builders.train_gpt(ids[:4000], VOCAB, steps=100), ids[4000:]


def random_gpt(vocab_size: int = 64, n_embd: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=n_embd)).eval()


def matmul_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "in_features") and hasattr(m, "out_features")}


def test_int8_kernels_hold_exactly_the_stored_integers() -> None:
    model = random_gpt()
    fast = to_dynamic_int8(model)
    layers = matmul_layers(fast)
    assert len(layers) == 4 * 2 + 1  # four matmuls per block and the output head
    for name, layer in layers.items():
        stored_q, stored_scales = quantize_int8(model.get_submodule(name).weight)
        packed = layer.weight()  # the per-channel qint8 tensor the kernel was packed from
        # A re-quantization by PyTorch's own observer (scale max|w| / 127.5 over [-128, 127]) would differ here.
        assert torch.equal(packed.int_repr(), stored_q), name
        torch.testing.assert_close(packed.q_per_channel_scales().float(), stored_scales, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_every_matmul_of_a_decoding_step_runs_on_the_integer_kernel(tmp_path: Path, bits: int) -> None:
    save_quantized(tmp_path, random_gpt(), bits=bits, group_size=32)
    fast = load_for_cpu(tmp_path)
    with torch.inference_mode():
        cache = fast.new_cache()
        fast(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        with profile(activities=[ProfilerActivity.CPU]) as step:
            fast(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # one cached step
    ops = Counter(event.name for event in step.events())
    assert ops[KERNEL_OPS[bits]] == 4 * 2 + 1  # the output head too: at a 16k vocabulary a third of the weights
    assert not any(ops[name] for name in ("aten::mm", "aten::addmm", "aten::linear"))  # no float matmul left


def test_int4_kernel_computes_with_the_stored_weights() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 128), torch.randn(48)
    packed, scales = quantize_int4(weight, group_size=64)
    kernel = Int4Linear(packed, scales, (48, 128), bias)
    x = torch.randn(3, 5, 128)  # (B, T, in)
    # The kernel rounds the activations and the scales to bf16, and computes with the stored int4 values.
    stored = dequantize_int4(packed, scales.bfloat16().float(), (48, 128))
    expected = F.linear(x.bfloat16().float(), stored, bias)  # (B, T, out)
    torch.testing.assert_close(kernel(x), expected, rtol=0.02, atol=0.05)
    assert (kernel(x) - F.linear(x, weight, bias)).abs().max() > 0.1  # int4, not the float weights


def test_weights_the_int4_kernel_cannot_take_stay_float(tmp_path: Path) -> None:
    save_quantized(tmp_path, random_gpt(vocab_size=24), bits=4, group_size=32)  # 24 output rows: not 16k
    fast = load_for_cpu(tmp_path)
    assert type(fast.lm_head) is torch.nn.Linear
    assert isinstance(fast.transformer.h[0].attn.c_attn, Int4Linear)
    torch.testing.assert_close(fast.lm_head.weight, load_quantized(tmp_path).lm_head.weight)
    idx = torch.randint(0, 24, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(fast(idx, idx)[1], load_quantized(tmp_path)(idx, idx)[1], rtol=0.01, atol=0.01)


def test_cpu_kernels_decode_the_trained_model_as_its_float_model(
    tmp_path: Path, trained: tuple[GPT, torch.Tensor]
) -> None:
    model, val = trained
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    save_quantized(tmp_path / "int8", model, bits=8)
    int8 = load_for_cpu(tmp_path / "int8")
    assert torch.equal(int8.generate(prompt, 30, temperature=0.0), model.generate(prompt, 30, temperature=0.0))
    save_quantized(tmp_path / "int4", model, bits=4, group_size=32)
    stored = eval_loss(load_quantized(tmp_path / "int4"), val, 16, 16, None)
    assert eval_loss(load_for_cpu(tmp_path / "int4"), val, 16, 16, None) == pytest.approx(stored, abs=0.005)


@pytest.mark.slow
def test_int8_decodes_the_small_preset_model_faster_than_fp32() -> None:
    """The small preset's shape (6 layers x 384, vocab 16k): decoding one token reads every weight once, 68 MB
    in fp32 and 17 MB in int8, so int8 decodes faster however busy the CPU (measured 2.0-2.9x on one thread)."""
    settings = PRESETS["small"]["pretrain"]
    shape = {k: settings[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=PRESETS["small"]["tokenizer"]["vocab_size"], **shape)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    speed = decode_tokens_per_s({"fp32": model, "int8": to_dynamic_int8(model)}, prompt, 32, runs=3)
    assert speed["int8"] > 1.5 * speed["fp32"]
