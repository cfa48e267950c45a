import json
import logging
import math
from pathlib import Path

import builders
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flows.cli import main as gptflow
from model.checkpoint import save_model
from model.evaluate import eval_loss
from model.gpt import GPT, GPTConfig
from model.quantize import (
    dequantize_int4,
    dequantize_state_dict,
    load_quantized,
    quantize_int4,
    quantize_int8,
    quantize_state_dict,
    quantized_bytes,
    save_quantized,
    to_dynamic_int8,
)
from model.tokenizer import train_char
from storage.errors import DataIntegrityError
from storage.store import Store
from tasks.quantize import REPORT, QuantizeConfig, rejected_reason
from tasks.quantize import STAGE as QUANTIZE

VOCAB = 16
UNIFORM_LOSS = math.log(VOCAB)  # what a model that predicts nothing scores: zeroed weights give exactly this


def tiny_gpt(seed: int = 0, n_embd: int = 32, vocab_size: int = VOCAB) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=n_embd)).eval()


def publish_tokens(store: Store, val: np.ndarray, vocab_size: int = VOCAB) -> str:
    return builders.publish_tokens(store.root, val[::-1].copy(), val, vocab_size=vocab_size, version="tok")


def publish_model(store: Store, model: GPT, version: str = "ft", inputs: dict[str, str] | None = None) -> str:
    store.publish(
        "finetune", version, lambda out: save_model(out, model), params={}, inputs=inputs or {}, code_version="t"
    )
    return version


@pytest.fixture(scope="module")
def trained(one_torch_thread: None) -> tuple[GPT, np.ndarray]:
    """A tiny GPT trained near the entropy floor (0.50 nats) of a Markov chain, and held-out ids of that chain.

    Quality is judged on this model: an untrained one predicts nearly uniformly, so a quantization that
    zeroes every weight would keep its loss and pass."""
    ids = builders.markov_tokens(6000, VOCAB)
    return builders.train_gpt(ids[:5000], VOCAB, steps=100), ids[5000:]


def zeroed(model: GPT) -> GPT:
    copy = GPT(model.config)
    copy.load_state_dict({k: torch.zeros_like(v) if v.dim() == 2 else v for k, v in model.state_dict().items()})
    return copy.eval()


def test_the_trained_model_is_one_a_broken_quantization_would_hurt(trained: tuple[GPT, np.ndarray]) -> None:
    model, val = trained
    loss = eval_loss(model, val, 16, 16, None)
    assert loss < 0.6  # near the chain's floor of 0.50
    assert eval_loss(zeroed(model), val, 16, 16, None) == pytest.approx(UNIFORM_LOSS, abs=1e-4)


def test_int8_error_is_at_most_half_a_step_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows on very different scales
    w[5] = 0.0  # an all-zero row must come back as zeros, not NaN
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    error = (w - q.float() * scales[:, None]).abs().amax(dim=1)
    assert torch.all(error <= scales / 2 * (1 + 1e-5))
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8))
    assert int(q.abs().max()) == 127  # the largest weight of a row uses the whole range


def test_int4_packs_two_values_per_byte_with_bounded_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 100)  # 100 inputs: not a multiple of the group size
    packed, scales = quantize_int4(w, group_size=32)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64) and scales.shape == (8, 4)
    back = dequantize_int4(packed, scales, (8, 100))
    assert back.shape == w.shape
    step = scales.repeat_interleave(32, dim=1)[:, :100]  # each weight's own group scale
    assert torch.all((w - back).abs() <= step / 2 * (1 + 1e-5))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, group_size=48)


def test_quantized_file_is_four_times_smaller_and_loads_weights_only(tmp_path: Path) -> None:
    model = tiny_gpt(n_embd=128, vocab_size=256)
    save_model(tmp_path / "fp32", model)
    path = save_quantized(tmp_path / "q", model, bits=8)
    assert path.name == "model_int8.pt"
    qstate = torch.load(path, weights_only=True)  # no pickled modules inside
    assert set(qstate["aliases"]) == {"lm_head.weight"}  # the tied head is stored once
    fp32_bytes = (tmp_path / "fp32" / "model.pt").stat().st_size
    assert fp32_bytes / path.stat().st_size > 3.5
    # The weights alone: one byte per weight plus one fp32 scale per row, about 4x smaller than fp32.
    weights = {k: v for k, v in model.state_dict().items() if v.dim() == 2 and k != "lm_head.weight"}
    fp32_weight_bytes = sum(v.numel() * 4 for v in weights.values())
    q_weight_bytes = quantized_bytes({"float": {}, "quantized": qstate["quantized"]})
    assert q_weight_bytes == sum(v.numel() + 4 * v.shape[0] for v in weights.values())
    assert 3.8 < fp32_weight_bytes / q_weight_bytes <= 4.0


def test_int4_file_is_smaller_than_int8(tmp_path: Path) -> None:
    model = tiny_gpt(n_embd=128, vocab_size=256)
    int8 = save_quantized(tmp_path / "q8", model, bits=8).stat().st_size
    int4 = save_quantized(tmp_path / "q4", model, bits=4, group_size=64).stat().st_size
    assert int4 < 0.6 * int8


@pytest.mark.parametrize(("bits", "group_size", "tolerance"), [(8, 64, 0.005), (4, 32, 0.03), (4, 128, 0.03)])
def test_loaded_model_keeps_ties_and_the_trained_loss(
    tmp_path: Path, trained: tuple[GPT, np.ndarray], bits: int, group_size: int, tolerance: float
) -> None:
    model, val = trained
    save_quantized(tmp_path, model, bits=bits, group_size=group_size)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    float_loss = eval_loss(model, val, 16, 16, None)
    # Measured: int8 -0.0001, int4 +0.002; zeroed weights add 2.2 (the test above).
    assert eval_loss(loaded, val, 16, 16, None) == pytest.approx(float_loss, abs=tolerance)


def test_dequantize_keeps_non_matrix_tensors_exactly() -> None:
    state = tiny_gpt().state_dict()
    back = dequantize_state_dict(quantize_state_dict(state, bits=8))
    assert set(back) == set(state)
    assert torch.equal(back["transformer.h.0.ln_1.weight"], state["transformer.h.0.ln_1.weight"])
    assert torch.equal(back["lm_head.weight"], back["transformer.wte.weight"])


def test_dynamic_int8_model_predicts_like_the_float_model(trained: tuple[GPT, np.ndarray]) -> None:
    model, val = trained
    fast = to_dynamic_int8(model)
    assert model.lm_head.__class__ is torch.nn.Linear  # the original is left alone
    assert eval_loss(fast, val, 16, 16, None) == pytest.approx(eval_loss(model, val, 16, 16, None), abs=0.01)


def test_corrupt_or_foreign_weights_are_data_errors(tmp_path: Path) -> None:
    model = tiny_gpt()
    path = save_quantized(tmp_path, model, bits=8)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataIntegrityError, match="model_int8.pt"):
        load_quantized(tmp_path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(DataIntegrityError, match="format"):
        load_quantized(tmp_path)
    path.unlink()
    with pytest.raises(DataIntegrityError, match="no quantized weights file"):
        load_quantized(tmp_path)


def test_quantize_stage_writes_weights_and_report(tmp_path: Path, trained: tuple[GPT, np.ndarray]) -> None:
    model, val_ids = trained
    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, val_ids)
    finetune = publish_model(store, model)
    cfg = QuantizeConfig(eval_tokens=300, latency_runs=2)
    ref = QUANTIZE.run(store.root, cfg, {"finetune": finetune, "tokens": tokens})
    folder = store.path("quantize", ref.version)
    assert {"model_int8.pt", "model_config.json", REPORT} <= {p.name for p in folder.iterdir()}
    report = json.loads((folder / REPORT).read_text())
    assert report["eval_tokens"] == 300 and report["scored_tokens"] == 299 and report["source_version"] == "ft"
    assert report["val_loss_fp32"] < 0.7  # a model that learned the chain: the loss change means something
    assert report["val_loss_delta"] == pytest.approx(report["val_loss_quantized"] - report["val_loss_fp32"])
    assert abs(report["val_loss_delta"]) < 0.005
    assert report["val_loss_cpu_kernel"] == pytest.approx(report["val_loss_fp32"], abs=0.02)
    assert report["val_loss_cpu_kernel_delta"] == pytest.approx(report["val_loss_cpu_kernel"] - report["val_loss_fp32"])
    assert report["max_loss_increase"] == 0.05
    assert report["rejected"] is False and report["rejected_reason"] is None
    assert rejected_reason(store.manifest("quantize", ref.version)) is None
    assert report["cpu_threads"] == 1
    assert report["decode_prompt_tokens"] + report["decode_new_tokens"] == 16  # up to the full context
    assert report["size_ratio"] == pytest.approx(report["fp32_file_bytes"] / report["quantized_file_bytes"])
    assert report["latency_fp32_ms"] > 0 and report["latency_quantized_ms"] > 0
    assert "dynamic int8" in report["method"]
    assert store.manifest("quantize", ref.version)["metrics"]["val_loss_fp32"] == report["val_loss_fp32"]
    # The loss in the report is the one a reader of the published file measures.
    val = np.fromfile(store.path("tokens", tokens) / "val.bin", dtype=np.uint16)
    assert eval_loss(load_quantized(folder), val, 16, 16, 300) == pytest.approx(report["val_loss_quantized"])


def test_quantize_stage_int4(tmp_path: Path, trained: tuple[GPT, np.ndarray]) -> None:
    model, val_ids = trained
    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, val_ids)
    finetune = publish_model(store, model)
    ref = QUANTIZE.run(
        store.root, QuantizeConfig(bits=4, group_size=32, latency_runs=1), {"finetune": finetune, "tokens": tokens}
    )
    report = json.loads((store.path("quantize", ref.version) / REPORT).read_text())
    assert report["quantized_file"] == "model_int4.pt" and report["group_size"] == 32
    assert report["val_loss_fp32"] < 0.7
    assert abs(report["val_loss_delta"]) < 0.03
    assert report["max_loss_increase"] == 0.15
    # Decoded on the int4 kernel, whose bf16 activations cost next to nothing over the stored weights.
    assert "_weight_int4pack_mm_for_cpu" in report["method"]
    assert report["val_loss_cpu_kernel"] == pytest.approx(report["val_loss_quantized"], abs=0.01)
    assert report["rejected"] is False


def zero_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.zeros(qweight.shape)


def zero_int4(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.zeros(shape)


def nan_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.full(qweight.shape, math.nan)


@pytest.mark.parametrize(
    ("bits", "broken", "bound"),
    [(8, zero_int8, None), (4, zero_int4, None), (8, nan_int8, None), (4, None, 0.0)],
    ids=["int8-zeroed", "int4-zeroed", "int8-nan", "int4-bound-0"],
)
def test_a_quantization_past_the_bound_is_published_rejected_with_its_reason(
    tmp_path: Path,
    trained: tuple[GPT, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bits: int,
    broken,
    bound: float | None,
) -> None:
    model, val_ids = trained
    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, val_ids)
    finetune = publish_model(store, model)
    if broken is not None:
        monkeypatch.setattr(f"model.quantize.dequantize_int{bits}", broken)
    cfg = QuantizeConfig(bits=bits, latency_runs=1, max_loss_increase=bound)
    with caplog.at_level(logging.WARNING, logger="gptflow.quantize"):
        ref = QUANTIZE.run(store.root, cfg, {"finetune": finetune, "tokens": tokens})
    assert store.latest("quantize") == ref.version  # published, for the record
    report = json.loads((store.path("quantize", ref.version) / REPORT).read_text())
    reason = report["rejected_reason"]
    assert report["rejected"] is True and "\n" not in reason
    assert rejected_reason(store.manifest("quantize", ref.version)) == reason  # the manifest says so too
    fp32 = f"{eval_loss(model, val_ids, 16, 16, None):.4f}"
    lost = "nan" if broken is nan_int8 else f"{report['val_loss_quantized']:.4f}"
    limit = cfg.loss_bound()
    assert f"the stored int{bits} weights raise the validation loss from {fp32} to {lost} nats/token" in reason
    assert f"more than max_loss_increase {limit}" in reason
    if broken is not None:
        assert lost in ("nan", f"{UNIFORM_LOSS:.4f}")  # what zeroed or NaN weights score
    assert "decode_tokens_per_s_quantized" not in report  # a model never served is not timed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"quantize/{ref.version} of finetune/ft is rejected and will not be served: {reason}"]


def test_cpu_kernels_past_the_bound_reject_the_version_too(
    tmp_path: Path, trained: tuple[GPT, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, val_ids = trained
    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, val_ids)
    finetune = publish_model(store, model)
    # Stored weights that are fine, run by CPU kernels that lose everything.
    monkeypatch.setattr("tasks.quantize.load_for_cpu", lambda folder: zeroed(load_quantized(folder)))
    ref = QUANTIZE.run(store.root, QuantizeConfig(latency_runs=1), {"finetune": finetune, "tokens": tokens})
    report = json.loads((store.path("quantize", ref.version) / REPORT).read_text())
    assert abs(report["val_loss_delta"]) < 0.005
    assert report["rejected"] is True
    assert report["rejected_reason"].startswith(
        f"the int8 CPU kernels raise the validation loss from {report['val_loss_fp32']:.4f} to {UNIFORM_LOSS:.4f}"
    )
    assert "stored" not in report["rejected_reason"]


def publish_servable_lineage(store: Store, model: GPT, val_ids: np.ndarray) -> tuple[str, str]:
    """tokens and a finetune version whose lineage holds a tokenizer, as `gptflow generate` needs."""
    tokenizer = train_char(["abcdefghijklmn"])  # 15 ids: within the trained model's 16
    store.publish(
        "tokenizer", "tk", lambda out: tokenizer.save(out / "tokenizer.json"), params={}, inputs={}, code_version="t"
    )
    return publish_tokens(store, val_ids), publish_model(store, model, inputs={"tokenizer": "tk"})


def test_gptflow_generate_refuses_a_rejected_quantized_model_in_one_line(
    tmp_path: Path, trained: tuple[GPT, np.ndarray], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model, val_ids = trained
    store = Store(tmp_path / "store")
    tokens, finetune = publish_servable_lineage(store, model, val_ids)
    inputs = {"finetune": finetune, "tokens": tokens}
    accepted = QUANTIZE.run(store.root, QuantizeConfig(latency_runs=1), inputs).version
    assert gptflow(["generate", "--storage", str(store.root), "--model", "quantize", "--prompt", "ab"]) == 0
    assert capsys.readouterr().out.startswith("ab")  # an accepted quantized model is served

    monkeypatch.setattr("model.quantize.dequantize_int8", zero_int8)
    # Other settings, so another version than the accepted one (the patch does not change the version id).
    rejected = QUANTIZE.run(store.root, QuantizeConfig(latency_runs=1, eval_tokens=500), inputs).version
    monkeypatch.undo()
    assert rejected != accepted and store.latest("quantize") == rejected
    reason = rejected_reason(store.manifest("quantize", rejected))
    for which in ("quantize", rejected[:8]):  # the stage's latest, or the version by its id
        assert gptflow(["generate", "--storage", str(store.root), "--model", which]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert (
            err == f"gptflow: error: quantize/{rejected} was rejected by its quality gate and is not served: {reason}\n"
        )
    assert gptflow(["generate", "--storage", str(store.root), "--model", accepted[:8], "--prompt", "ab"]) == 0


def test_max_loss_increase_defaults_by_bit_width_and_can_be_set() -> None:
    assert QuantizeConfig().loss_bound() == 0.05 and QuantizeConfig(bits=4).loss_bound() == 0.15
    assert QuantizeConfig(bits=4, max_loss_increase=0.5).loss_bound() == 0.5
    with pytest.raises(ValidationError):
        QuantizeConfig(max_loss_increase=-0.1)


def test_quantize_stage_rejects_tokens_beyond_the_model_vocabulary(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, np.arange(100, dtype=np.uint16) % VOCAB, vocab_size=VOCAB * 2)
    finetune = publish_model(store, tiny_gpt())
    with pytest.raises(DataIntegrityError, match="vocab_size 32 exceeds"):
        QUANTIZE.run(store.root, QuantizeConfig(), {"finetune": finetune, "tokens": tokens})
    assert store.latest("quantize") is None


def test_quantize_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError):
        QuantizeConfig(bits=2)
    with pytest.raises(ValidationError):
        QuantizeConfig(group_size=48)
    with pytest.raises(ValidationError):
        QuantizeConfig(eval_tokens=1)
