"""Muon: the orthogonalised update, which parameters it takes, the shared schedule, learning, and DDP."""

from pathlib import Path

import pytest
import torch
from test_train import batches, tiny_train_config

from model.gpt import GPT, GPTConfig
from model.muon import Muon, hidden_matrices, orthogonalize, param_groups
from model.train import lr_at, make_optimizer, train, train_step

# Tiny models train faster on one thread than on two contending ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def modern_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**shape, rope=True, qk_norm=True, mlp="relu2", tie_embeddings=False))


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (64, 64)])
def test_orthogonalize_sets_every_singular_value_near_one(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    # A skewed spectrum (singular values from 0.1 to 10), as gradients have: the update must not be. (Five
    # steps lift values down to ~1/1000 of the Frobenius norm; smaller ones, mere noise, stay small.)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    spectrum = torch.logspace(-1, 1, min(shape))
    matrix = u @ torch.diag(spectrum) @ v.T
    result = orthogonalize(matrix)
    assert result.shape == matrix.shape and result.dtype == matrix.dtype
    singular = torch.linalg.svdvals(result)
    # The quintic's fixed points lie in ~[0.7, 1.2], not at 1 (Jordan: "S' ~ Uniform(0.5, 1.5)").
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    # The singular vectors stay the gradient's: close to the exact U V^T.
    exact = u @ v.T
    assert torch.nn.functional.cosine_similarity(result.flatten(), exact.flatten(), dim=0) > 0.97


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = modern_model()
    names = dict(model.named_parameters())
    hidden = hidden_matrices(model)
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert hidden == [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in matrices]
    groups = param_groups(model, learning_rate=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.0)
    by_id = {id(p): n for n, p in names.items()}
    muon, decayed, vectors = ([by_id[id(p)] for p in group["params"]] for group in groups)
    assert muon == hidden and [g["muon"] for g in groups] == [True, False, False]
    assert decayed == ["transformer.wte.weight", "lm_head.weight"]  # embedding and untied head
    assert all(names[n].dim() == 1 for n in vectors) and "transformer.h.0.attn.q_norm.weight" in vectors
    assert [g["weight_decay"] for g in groups] == [0.0, 0.1, 0.0]
    assert sorted(muon + decayed + vectors) == sorted(names)  # every parameter, once
    # GPT-2's layout: the tied embedding (the head) and the position table are AdamW's.
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    gpt2_names = {id(p): n for n, p in gpt2.named_parameters()}
    groups = param_groups(gpt2, learning_rate=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.0)
    assert [gpt2_names[id(p)] for p in groups[1]["params"]] == ["transformer.wte.weight", "transformer.wpe.weight"]


@pytest.mark.parametrize("shape", [(128, 32), (32, 128)])
def test_one_step_is_the_orthogonalised_gradient_scaled_by_the_matrix_shape(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    before = weight.detach().clone()
    weight.grad = torch.randn(shape)
    optimizer = Muon([{"params": [weight], "muon": True, "weight_decay": 0.0}], lr=0.1)
    optimizer.step()
    # From zero momentum, the Nesterov update is a multiple of the gradient, which orthogonalising ignores.
    scale = max(1.0, shape[0] / shape[1]) ** 0.5  # 2 for the tall (c_fc-like) matrix, 1 for the wide one
    expected = before - 0.1 * scale * orthogonalize(weight.grad)
    torch.testing.assert_close(weight.detach(), expected, atol=1e-6, rtol=0)
    step_rms = (weight.detach() - before).square().mean().sqrt()
    assert 0.7 * 0.1 / shape[1] ** 0.5 < step_rms < 1.2 * 0.1 / shape[1] ** 0.5  # ~lr / sqrt(fan-in)


def test_the_schedule_scales_muons_rate_and_adamws_alike() -> None:
    cfg = tiny_train_config(optimizer="muon", learning_rate=1e-2, min_lr=1e-3, muon_lr=0.05, max_steps=30)
    model = modern_model()
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    source = batches(cfg)
    for step in (0, 2, 5, 17, 29):  # warmup, its end, the cosine decay, the last step
        train_step(model, optimizer, source, step, cfg, torch.device("cpu"))
        rates = {group["muon"]: group["lr"] for group in optimizer.param_groups}
        assert rates[False] == lr_at(step, cfg)
        assert rates[True] == pytest.approx(lr_at(step, cfg) * 0.05 / 1e-2, rel=1e-12)


def test_muon_learns_a_repeating_sequence(tmp_path: Path) -> None:
    cfg = tiny_train_config(optimizer="muon", max_steps=40, eval_interval=20, checkpoint_interval=100)
    model = modern_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = train(model, batches(cfg), cfg, tmp_path)
    assert result.records[0]["train_loss"] > 3.0  # ln(64) = 4.16 untrained
    assert result.val_loss < 0.5
    assert all("grad_norm" in r for r in result.records)  # clipping ran on Muon's gradients too
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # every group moved


@pytest.mark.slow
def test_two_processes_take_the_muon_steps_of_one(tmp_path: Path) -> None:
    from test_ddp import settings_for
    from test_pretrain import cycle, publish_tokens

    from model.checkpoint import load_model
    from model.train_entry import launch, pretrain
    from storage.store import Store

    store = Store(tmp_path / "store")
    tokens = publish_tokens(store, cycle(3000), cycle(500))
    single, _ = pretrain(settings_for(store, tokens, tmp_path / "one", optimizer="muon"), log=lambda line: None)
    two = settings_for(store, tokens, tmp_path / "two", optimizer="muon")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        launch(two, 2, log=lambda line: None, warn=lambda line: None)
    split = load_model(Path(two.out))
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(split.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)
