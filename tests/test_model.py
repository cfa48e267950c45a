"""The GPT itself: shapes, causality, weight tying, the loss mask, sampling, and model files."""

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_config, load_model, save_model
from model.gpt import GPT, GPTConfig

# Tiny models train faster on one thread than on two contending ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> GPTConfig:
    values = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    return GPTConfig(**{**values, **overrides})


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def test_forward_shapes_with_and_without_targets(model: GPT) -> None:
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 64)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # An untrained model is close to uniform over the vocabulary: loss ~ ln(64).
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5

    last, none = model(idx)
    assert last.shape == (3, 1, 64) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_longer_than_block_size_is_refused(model: GPT) -> None:
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_future_tokens_do_not_change_earlier_logits(model: GPT) -> None:
    idx = torch.randint(0, 64, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    logits, _ = model(idx, idx)
    logits_changed, _ = model(changed, changed)
    torch.testing.assert_close(logits[:, :8], logits_changed[:, :8])
    assert not torch.allclose(logits[:, 8:], logits_changed[:, 8:])


def test_output_head_is_tied_to_token_embedding(model: GPT) -> None:
    assert model.transformer.wte.weight is model.lm_head.weight
    with torch.no_grad():
        model.lm_head.weight[5].fill_(1.0)
    assert torch.equal(model.transformer.wte.weight[5], torch.ones(32))
    # Counted once: the shared matrix is one parameter.
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1


def test_ignore_index_positions_do_not_count(model: GPT) -> None:
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 64), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    _, unmasked_loss = model(idx, targets)
    assert not torch.allclose(loss, unmasked_loss)


def test_generate_is_reproducible_with_a_seeded_generator(model: GPT) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    first = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    second = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    other = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(8))
    assert first.shape == (1, 23)
    assert torch.equal(first[:, :3], prompt)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # Past block_size, generation keeps going on the last block_size tokens.
    assert model.generate(prompt, 30, temperature=0.0).shape == (1, 33)


def test_generate_stops_at_the_stop_token(model: GPT) -> None:
    greedy = model.generate(torch.tensor([[1, 2, 3]]), 1, temperature=0.0)
    stop = int(greedy[0, -1])
    out = model.generate(torch.tensor([[1, 2, 3]]), 10, temperature=0.0, stop_token=stop)
    assert out.tolist() == greedy.tolist()


def test_save_and_load_give_identical_outputs(model: GPT, tmp_path) -> None:
    save_model(tmp_path, model)
    assert load_config(tmp_path) == model.config
    loaded = load_model(tmp_path)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx, idx)[0], loaded(idx, idx)[0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.transformer.wte.weight is loaded.lm_head.weight


def test_bad_model_config_lists_every_problem() -> None:
    with pytest.raises(ValueError) as err:
        tiny_config(n_embd=30, n_head=4, dropout=1.5)
    assert "n_embd (30) must be divisible by n_head (4)" in str(err.value)
    assert "dropout must be in [0, 1)" in str(err.value)
