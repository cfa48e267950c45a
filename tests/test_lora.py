"""LoRA: adapters on a frozen GPT, their merge into plain weights, training them, and exact resume."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model import finetune as finetune_module
from model.data import ExampleBatches, TokenBatches
from model.finetune import PROMPT_TEMPLATE, finetune, response_loss
from model.gpt import GPT, GPTConfig
from model.lora import LoRALinear, LoRASettings, adapter_names, add_lora, merge_lora
from model.tokenizer import Tokenizer, train_char
from model.train import CHECKPOINT, METRICS, TIMING_FIELDS, TrainConfig, read_metrics, train
from storage.errors import ConfigError

PROJECT = Path(__file__).resolve().parent.parent
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "fig", "jam", "owl", "ray", "tip", "van", "web"]
BLOCK = 48

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scrambled_gpt(seed: int = 0, dropout: float = 0.0) -> GPT:
    """A small GPT with random weights far from their init: a wrong merge shows in its logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def scramble_adapters(model: GPT) -> None:
    """B starts at zero (the update is then nothing): give every adapter a non-zero update."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0.0, 0.5)


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out, _ = model(idx, idx)  # with targets: every position's logits
    return out


@pytest.mark.parametrize(
    "targets", [("q", "k", "v", "attn_proj"), ("q", "v"), ("k",), ("attn_proj", "mlp_fc", "mlp_proj")]
)
def test_merged_model_computes_what_the_adapter_model_computes(targets: tuple[str, ...]) -> None:
    model = scrambled_gpt()
    plain_keys = list(model.state_dict())
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    base = logits(model, idx)
    add_lora(model, LoRASettings(rank=4, alpha=8.0, dropout=0.1, targets=targets), seed=0)
    assert torch.equal(logits(model, idx), base)  # B = 0: the adapters start as the pretrained function
    scramble_adapters(model)
    adapted = logits(model, idx)
    assert (adapted - base).abs().max() > 0.1  # the update is visible, so a merge that drops it would fail

    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == plain_keys and adapter_names(model) == []
    torch.testing.assert_close(logits(model, idx), adapted, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # a plain GPT again


def test_untargeted_thirds_of_the_fused_attention_stay_as_pretrained() -> None:
    model = scrambled_gpt()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    add_lora(model, LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v")), seed=0)
    scramble_adapters(model)
    merge_lora(model)
    after = model.transformer.h[0].attn.c_attn.weight
    q, k, v = (slice(i * 32, (i + 1) * 32) for i in range(3))
    assert torch.equal(after[k], before[k])
    assert not torch.equal(after[q], before[q]) and not torch.equal(after[v], before[v])


def test_only_the_adapters_get_gradients() -> None:
    model = scrambled_gpt()
    trainable = add_lora(model, LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=("q", "k", "v")), seed=0)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx, idx)
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_names(model)) and with_grad
    # 2 blocks x 3 adapters x (A: 4 x 32, B: 32 x 4)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 3 * (128 + 128)
    # B starts at zero, so only B moves on the first step; A's gradient comes once B is not zero.
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if ".lora_B." in n)
    # Biases, LayerNorm gains and embeddings stay frozen.
    assert not model.transformer.wte.weight.requires_grad and not model.transformer.h[0].ln_1.weight.requires_grad


def test_the_same_seed_draws_the_same_adapters_whatever_the_targets_order() -> None:
    one, two = scrambled_gpt(), scrambled_gpt()
    add_lora(one, LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=("v", "attn_proj", "q")), seed=7)
    add_lora(two, LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v", "attn_proj")), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True))


def test_bad_lora_settings_are_one_config_error_listing_every_problem() -> None:
    with pytest.raises(ConfigError, match=r"rank must be >= 1.*alpha must be > 0.*unknown lora targets \['wq'\]"):
        LoRASettings(rank=0, alpha=0.0, dropout=0.0, targets=("wq",))
    with pytest.raises(ConfigError, match="lora rank 64 exceeds the model's width n_embd=32"):
        add_lora(scrambled_gpt(), LoRASettings(rank=64, alpha=8.0, dropout=0.0, targets=("q",)), seed=0)


# -- training ------------------------------------------------------------------------------------------


def pairs(words: list[str]) -> list[dict[str, str]]:
    return [{"prompt": f"twice {w}", "response": f"{w} {w}"} for w in words]


def char_tokenizer() -> Tokenizer:
    return train_char([PROMPT_TEMPLATE.format(prompt=p["prompt"]) + p["response"] for p in pairs(WORDS)])


def pretrained_char_model(tokenizer: Tokenizer, folder: Path) -> GPT:
    """A tiny GPT pretrained on the template's texts of half the words: it knows the format, and fine-tuning
    still has the other half's answers to learn."""
    ids = []
    for pair in pairs(WORDS[:8]) * 6:
        ids += tokenizer.encode(PROMPT_TEMPLATE.format(prompt=pair["prompt"]) + pair["response"]) + [tokenizer.eot_id]
    tokens = np.array(ids, dtype=np.uint16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(batch_size=8, max_steps=60, learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=60,
                      eval_steps=1, checkpoint_interval=1000, log_interval=60, device="cpu")  # fmt: skip
    train(model, TokenBatches(tokens, None, BLOCK, cfg.batch_size, 0), cfg, folder, log=lambda _: None)
    return model


def lora_train_config(**overrides) -> TrainConfig:
    values = dict(batch_size=8, max_steps=40, learning_rate=1e-2, min_lr=1e-3, warmup_steps=4, eval_interval=20,
                  eval_steps=2, checkpoint_interval=20, log_interval=5, seed=3, device="cpu")  # fmt: skip
    return TrainConfig(**{**values, **overrides})


SETTINGS = LoRASettings(rank=4, alpha=8.0, dropout=0.05, targets=("q", "k", "v", "attn_proj"))


def test_a_lora_run_lowers_the_heldout_response_loss_and_leaves_a_plain_model(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    model = pretrained_char_model(tokenizer, tmp_path / "pretrain")
    frozen = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train_pairs, heldout = pairs(WORDS[:12]), pairs(WORDS[12:])
    before = response_loss(model, tokenizer, heldout, BLOCK, 8, "cpu")
    result, counts = finetune(
        model, tokenizer, train_pairs, heldout, lora_train_config(), tmp_path / "ft", lora=SETTINGS
    )
    after = response_loss(model, tokenizer, heldout, BLOCK, 8, "cpu")
    assert after < before - 0.2, (before, after)
    assert counts["trainable_params"] == 2 * 4 * (4 * 32 + 32 * 4)
    assert list(model.state_dict()) == list(frozen) and adapter_names(model) == []
    # Only the targeted matrices changed; embeddings, norms and the MLP are the pretrained ones.
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, frozen[name])}
    assert changed == {f"transformer.h.{i}.attn.{m}.weight" for i in range(2) for m in ("c_attn", "c_proj")}
    # The loop's last held-out loss was measured on the unmerged model: the merge keeps it.
    assert result.val_loss == pytest.approx(after, rel=1e-4)
    checkpoint = torch.load(tmp_path / "ft" / CHECKPOINT, weights_only=True)
    assert {name for name in checkpoint["model"] if ".lora_" in name}  # the adapters, for a resume
    assert len(checkpoint["optimizer"]["state"]) == 2 * 4 * 2  # AdamW state for the adapters alone


def test_a_checkpoint_of_full_fine_tuning_does_not_resume_a_lora_run(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    cfg = lora_train_config(max_steps=4, warmup_steps=1, checkpoint_interval=2)
    finetune(scrambled_gpt_for(tokenizer), tokenizer, pairs(WORDS), [], cfg, tmp_path)
    with pytest.raises(ConfigError, match="checkpoint of a different model/training config"):
        finetune(scrambled_gpt_for(tokenizer), tokenizer, pairs(WORDS), [], cfg, tmp_path, lora=SETTINGS)


def scrambled_gpt_for(tokenizer: Tokenizer, seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


# -- exact resume (the pattern of test_train.py: SIGKILL after a checkpoint, then resume) --------------

RESUME = dict(max_steps=30, checkpoint_interval=10, log_interval=1, eval_interval=5)
STUCK_AT_STEP = 12  # past the checkpoint at step 10


class StuckExampleBatches(ExampleBatches):
    """Example batches that hang at one step, so the test can kill the run there."""

    marker: Path

    def train_batch(self, step: int, micro: int):
        if step == STUCK_AT_STEP:
            self.marker.touch()
            time.sleep(600)
        return super().train_batch(step, micro)


def run_until_stuck(folder: str) -> None:
    """Entry point of the subprocess that the resume test kills with SIGKILL."""
    torch.set_num_threads(1)
    StuckExampleBatches.marker = Path(folder) / "stuck"
    finetune_module.ExampleBatches = StuckExampleBatches
    tokenizer = char_tokenizer()
    model = scrambled_gpt_for(tokenizer, dropout=0.1)
    finetune(model, tokenizer, pairs(WORDS[:12]), pairs(WORDS[12:]), lora_train_config(**RESUME), Path(folder),
             lora=SETTINGS, log=lambda _: None)  # fmt: skip


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_lora_run_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    cfg = lora_train_config(**RESUME)
    reference = scrambled_gpt_for(tokenizer, dropout=0.1)  # dropout: the adapters' and the model's replay too
    finetune(reference, tokenizer, pairs(WORDS[:12]), pairs(WORDS[12:]), cfg, tmp_path / "uninterrupted",
             lora=SETTINGS, log=lambda _: None)  # fmt: skip

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    code = f"import sys; sys.path.insert(0, {str(PROJECT / 'tests')!r}); import test_lora; "
    code += "test_lora.run_until_stuck(sys.argv[1])"
    process = subprocess.Popen([sys.executable, "-c", code, str(resumed_dir)], cwd=PROJECT)
    try:
        deadline = time.monotonic() + 90
        while not (resumed_dir / "stuck").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the fine-tuning subprocess ended (rc {process.returncode}) or never reached step 12")
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert max(r["step"] for r in read_metrics(resumed_dir / METRICS)) == STUCK_AT_STEP

    # Other base weights and other adapters: everything must come from the checkpoint.
    resumed = scrambled_gpt_for(tokenizer, seed=99, dropout=0.1)
    lines: list[str] = []
    result, _ = finetune(resumed, tokenizer, pairs(WORDS[:12]), pairs(WORDS[12:]), cfg, resumed_dir, lora=SETTINGS,
                         log=lines.append)  # fmt: skip
    assert result.resumed_from == 10 and any("resuming from" in line for line in lines)
    assert list(resumed.state_dict()) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    got, expected = read_metrics(resumed_dir / METRICS), read_metrics(tmp_path / "uninterrupted" / METRICS)
    assert [r["step"] for r in got] == list(range(1, 31))
    assert without_timing(got) == without_timing(expected)
