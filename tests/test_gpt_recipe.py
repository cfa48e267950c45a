"""The architecture options of GPTConfig: GPT-2 by default, exactly; rope, QK-norm, ReLU² and an untied head
each doing what it says; parameter counts; configs checked together; DDP and bf16 autocast."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import CONFIG, load_config, load_model, save_model
from model.gpt import GPT, GPTConfig, apply_rope, gpt_config_problems, rope_angles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODERN = dict(rope=True, qk_norm=True, mlp="relu2", tie_embeddings=False)


def tiny_config(**overrides) -> GPTConfig:
    values = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**{**values, **overrides})


def scrambled(model: GPT, seed: int = 0) -> GPT:
    """`model` with every parameter drawn at random: random gains and biases too, so that every part of the
    network shows in the logits (at init, biases are zero and gains one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


# -- the defaults are GPT-2, weight for weight ---------------------------------------------------------------
# A frozen copy of the model as it was before the options existed: the defaults must draw the same weights
# from the same seed and compute the same logits, so old checkpoints, seeds and results keep their meaning.


class _RefAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = c.n_head, c.n_embd, c.dropout
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class _RefMLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class _RefBlock(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd, bias=c.bias), _RefAttention(c)
        self.ln_2, self.mlp = nn.LayerNorm(c.n_embd, bias=c.bias), _RefMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _RefGPT2(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.vocab_size, c.n_embd),
                wpe=nn.Embedding(c.block_size, c.n_embd),
                drop=nn.Dropout(c.dropout),
                h=nn.ModuleList([_RefBlock(c) for _ in range(c.n_layer)]),
                ln_f=nn.LayerNorm(c.n_embd, bias=c.bias),
            )
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(GPT._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


@pytest.mark.parametrize("overrides", [{}, dict(bias=False, dropout=0.1, n_layer=3, n_head=4)])
def test_default_options_are_gpt2_weight_for_weight_and_logit_for_logit(overrides: dict) -> None:
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    model = GPT(config)
    torch.manual_seed(0)
    reference = _RefGPT2(config)
    assert list(model.state_dict()) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    idx = torch.randint(0, 64, (3, 16))
    for mode in ("eval", "train"):  # train: dropout draws its masks in the same order too
        getattr(model, mode)(), getattr(reference, mode)()
        torch.manual_seed(1)
        logits, loss = model(idx, idx)
        torch.manual_seed(1)
        ref_logits, ref_loss = reference(idx, idx)
        assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss), mode


def test_a_model_config_written_before_the_options_loads_as_gpt2(tmp_path) -> None:
    old = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    (tmp_path / CONFIG).write_text(json.dumps(old), encoding="utf-8")
    config = load_config(tmp_path)
    assert (config.rope, config.qk_norm, config.mlp, config.tie_embeddings) == (False, False, "gelu", True)


# -- each option --------------------------------------------------------------------------------------------


def test_rope_gives_word_order_without_a_position_table() -> None:
    torch.manual_seed(0)
    model = scrambled(GPT(tiny_config(rope=True)))
    assert not any("wpe" in name for name in model.state_dict())
    # Without any position signal, attention is blind to the order of earlier tokens; rotations restore it.
    idx = torch.tensor([[5, 9, 13, 2, 7]])
    swapped = torch.tensor([[9, 5, 13, 2, 7]])
    assert not torch.allclose(model(idx)[0], model(swapped)[0], atol=1e-3)


def test_rope_scores_depend_on_distance_only() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)  # (B, nh, T, hs): a query after a key

    def score(positions: list[int]) -> torch.Tensor:
        cos, sin = rope_angles(torch.tensor(positions), 16, 10000.0)
        return (apply_rope(q, cos, sin)[..., 1, :] * apply_rope(k, cos, sin)[..., 0, :]).sum()

    torch.testing.assert_close(score([0, 3]), score([7, 10]))  # same distance, same score
    assert not torch.allclose(score([0, 3]), score([0, 5]))


def test_qk_norm_bounds_the_attention_logits_whatever_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    sdpa = F.scaled_dot_product_attention
    captured = {}

    def capture(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        captured["logits"] = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # what softmax gets
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", capture)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 32)
    for qk_norm in (False, True):
        attn = GPT(tiny_config(qk_norm=qk_norm)).transformer.h[0].attn
        with torch.no_grad():
            attn.c_attn.weight.mul_(1000.0)  # huge queries and keys
        attn(x)
        biggest = captured["logits"].abs().max().item()
        if qk_norm:
            assert biggest <= math.sqrt(16) * (1 + 1e-4)  # unit-RMS q and k of size 16: |q.k| / 4 <= 4
            assert {n for n, _ in attn.named_parameters() if "norm" in n} == {"q_norm.weight", "k_norm.weight"}
        else:
            assert biggest > 1000


def test_relu2_mlp_computes_relu_squared() -> None:
    torch.manual_seed(0)
    mlp = GPT(tiny_config(mlp="relu2")).transformer.h[0].mlp
    x = torch.randn(2, 3, 32)
    expected = mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(GPT(tiny_config()).transformer.h[0].mlp.act(x), F.relu(x) ** 2)


def test_untied_head_is_its_own_matrix_and_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(tie_embeddings=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # GPT-2's init, as the embedding
    with torch.no_grad():
        model.lm_head.weight[5].fill_(1.0)
    assert not torch.equal(model.transformer.wte.weight[5], torch.ones(32))  # the embedding is left alone
    scrambled(model)
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx, idx)[0], model(idx, idx)[0])


def test_every_option_combination_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = scrambled(GPT(tiny_config(**MODERN, bias=False)))
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx, idx)[0], model(idx, idx)[0])


# -- parameter counts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_num_params_counts_each_matrix_once_and_leaves_out_lookup_tables(rope: bool, tie: bool) -> None:
    V, P, C, L = 64, 16, 32, 2
    blocks = L * (2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C))
    model = GPT(tiny_config(rope=rope, tie_embeddings=tie))
    head = V * C  # the tied token table, or the untied head: the output matmul is counted either way
    assert model.num_params() == head + blocks + 2 * C
    lookups = (0 if rope else P * C) + (0 if tie else V * C)  # position table, untied token table
    assert model.num_params(non_embedding=False) == head + blocks + 2 * C + lookups
    assert model.num_params(non_embedding=False) == sum(t.numel() for t in model.state_dict().values()) - (
        V * C if tie else 0  # state_dict lists a tied matrix under both names
    )


def test_qk_norm_gains_are_counted_and_hidden_matrices_are_the_block_weights() -> None:
    plain, modern = GPT(tiny_config()), GPT(tiny_config(**MODERN))
    head_size = 16
    assert modern.num_params() == plain.num_params() + 2 * 2 * head_size  # a q and a k gain per layer
    hidden = {n for n, p in modern.named_parameters() if p.dim() >= 2 and n.startswith("transformer.h.")}
    expected = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert hidden == expected


# -- configuration problems ----------------------------------------------------------------------------------


def test_config_problems_are_listed_together() -> None:
    problems = gpt_config_problems(dict(n_embd=36, n_head=4, rope=True, mlp="swiglu", rope_base=0.0, dropout=1.0))
    assert any("rope needs an even head size" in p and "= 9" in p for p in problems)
    assert any("mlp must be one of gelu, relu2, got 'swiglu'" in p for p in problems)
    assert any("rope_base must be > 0" in p for p in problems)
    assert any("dropout must be in [0, 1)" in p for p in problems)
    assert len(problems) == 4
    assert gpt_config_problems(dict(n_embd=36, n_head=4)) == []  # an odd head size is fine without rope
    assert gpt_config_problems({"n_layers": 3}) == ["unknown GPTConfig field 'n_layers'"]
    with pytest.raises(ValueError, match=r"invalid GPTConfig: .*rope needs an even head size.*; mlp must be"):
        tiny_config(n_embd=36, n_head=4, rope=True, mlp="swiglu")


# -- training machinery ----------------------------------------------------------------------------------------


def test_modern_model_trains_under_cpu_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = scrambled(GPT(tiny_config(**MODERN))).train()
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA recipe's precision, on CPU
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_modern_model_under_ddp_gives_every_parameter_a_gradient(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config(**MODERN))
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False, as model/train.py
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx = torch.randint(0, 64, (4, 16))
        losses = []
        for _ in range(3):  # DDP raises on the next step when a parameter got no gradient
            _, loss = ddp(idx, idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
    finally:
        dist.destroy_process_group()
