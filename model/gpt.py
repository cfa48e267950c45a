"""A GPT language model: causal self-attention, MLP, pre-norm block, config, model. Pure PyTorch.

Reads top to bottom like nanoGPT's model.py: token + position embeddings, a stack of pre-norm transformer
blocks, a final LayerNorm and a language-model head tied to the token embedding. That is GPT-2, and what
GPTConfig's defaults build, weight for weight. Four options (each below, with its source) turn it into the
"modern" recipe of modded-nanogpt: rotary positions, normalised queries and keys, a ReLU² MLP and an
untied output head.

Generation keeps a KV cache (`KVCache`): the keys and values of the positions already seen, so that each
new token costs one position's forward pass instead of the whole context's.
"""

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

MLP_KINDS = ("gelu", "relu2")


class KVCache:
    """Keys and values of every layer for the first `length` positions of a batch, up to `capacity`.

    The buffers are allocated on the first write, with the batch size, dtype and device of what is written.
    GPT.forward writes the new positions' keys and values and then advances `length`.
    """

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) after the stored positions; return the keys and values of all of them."""
        if self.keys[layer] is None:
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.capacity, hs)  # (B, nh, capacity, hs)
            self.values[layer] = v.new_empty(B, nh, self.capacity, hs)  # (B, nh, capacity, hs)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # 2 x (B, nh, end, hs)


def rope_angles(positions: torch.Tensor, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hs/2) of RoFormer's rotation angles: position p turns pair i by p * base^(-2i/hs)."""
    inv_freq = base ** -(torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = torch.outer(positions.float(), inv_freq)  # (T, hs/2); fp32 is off by < 1e-4 rad at p = 1024
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) pairwise: dimension i with i + hs/2 (GPT-NeoX's halves, as modded-nanogpt)."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under bf16 autocast, q and k stay in v's dtype for SDPA
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "GPTConfig") -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm (Dehghani et al. 2023, ViT-22B; modded-nanogpt): RMS-normalised queries and keys keep the
        # attention logits bounded, which lets training take a higher learning rate without logit blow-ups.
        # modded-nanogpt's norm has no gain; this one has a learned gain per head dimension (ones at init, so
        # it starts as theirs), as ViT-22B's LayerNorm has: with unit-RMS q and k of size hs, a logit can
        # never exceed sqrt(hs) (5.7 for 32-wide heads), too flat for sharp attention in a small model.
        self.q_norm = nn.RMSNorm(self.head_size) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            # In fp32 (as autocast runs LayerNorm), back in v's dtype for SDPA: (B, nh, T, hs), per head.
            q, k = self.q_norm(q.float()).type_as(v), self.k_norm(k.float()).type_as(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, T, hs)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.store(layer, k, v)  # 2 x (B, nh, past + T, hs)
        if past == 0:
            mask, causal = None, True  # is_causal masks the future (the fused kernel: flash attention on CUDA)
        elif T == 1:
            mask, causal = None, False  # one new position sees every stored one
        else:
            # New position i (absolute past + i) sees keys 0..past + i; is_causal would align it to key i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, past+T)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)²: the "squared ReLU" Primer found by search (So et al. 2021); modded-nanogpt measured ~1-2%
    lower loss than GELU at the same width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: "GPTConfig") -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU() if config.mlp == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: "GPTConfig") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 for faster matmuls on GPUs
    block_size: int = 1024  # the longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is slightly better and faster
    # The defaults below are GPT-2's, so model_config.json files written before these fields existed load
    # as the same model.
    # Rotary position embeddings (Su et al. 2021, RoFormer; modded-nanogpt): queries and keys are rotated by
    # their position, so attention scores depend on relative distance; no learned position table (wpe).
    rope: bool = False
    rope_base: float = 10000.0  # RoFormer's base of the rotation frequencies
    qk_norm: bool = False  # RMS-normalised queries and keys per head (Dehghani et al. 2023; modded-nanogpt)
    mlp: str = "gelu"  # "gelu" (GPT-2) or "relu2", ReLU squared (So et al. 2021, Primer; modded-nanogpt)
    # False: a separate output head (modded-nanogpt unties them: the embedding and the head want different
    # geometries, and updates to one no longer disturb the other). It starts as GPT-2's matrices do,
    # N(0, 0.02), not at zero as modded-nanogpt's: with one AdamW learning rate for all (modded-nanogpt tunes
    # one per group), a zero head trained a 4-layer, 128-wide char model with every option on to val loss
    # 1.60 instead of 1.36 in 1000 steps; zeroed residual projections (modded-nanogpt's too) to 1.38 instead
    # of 1.35, so GPT-2's 1/sqrt(2 * n_layer) scale is kept as well.
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        problems = gpt_config_problems(asdict(self))
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


def gpt_config_problems(values: Mapping[str, Any]) -> list[str]:
    """Every problem of a set of GPTConfig values (fields not given take their defaults); [] when valid."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    problems = [f"unknown GPTConfig field {name!r}" for name in values if name not in defaults]
    v = {**defaults, **{k: values[k] for k in values if k in defaults}}
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        if v[name] < 1:
            problems.append(f"{name} must be >= 1, got {v[name]}")
    if v["n_head"] >= 1 and v["n_embd"] % v["n_head"]:
        problems.append(f"n_embd ({v['n_embd']}) must be divisible by n_head ({v['n_head']})")
    elif v["rope"] and v["n_head"] >= 1 and (v["n_embd"] // v["n_head"]) % 2:
        problems.append(
            f"rope needs an even head size, got n_embd / n_head = {v['n_embd']} / {v['n_head']} = "
            f"{v['n_embd'] // v['n_head']} (rotary embeddings turn dimensions in pairs)"
        )
    if not v["rope_base"] > 0:
        problems.append(f"rope_base must be > 0, got {v['rope_base']}")
    if not 0.0 <= v["dropout"] < 1.0:
        problems.append(f"dropout must be in [0, 1), got {v['dropout']}")
    if v["mlp"] not in MLP_KINDS:
        problems.append(f"mlp must be one of {', '.join(MLP_KINDS)}, got {v['mlp']!r}")
    return problems


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rope:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned absolute positions
        self.transformer = nn.ModuleDict(
            dict(
                **modules,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): the output projection shares the token embedding matrix.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the embedding tables that are only looked up: the position
        table, and the token table when it is not also the output head (a tied one is counted once, as the
        head's matmul; an untied head is counted)."""
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is one parameter: counted once
        if non_embedding:
            if not self.config.rope:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def new_cache(self) -> KVCache:
        """An empty KV cache as long as the context, for forward(..., cache=)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy over targets != ignore_index if given.

        With `cache`, idx (B, T) continues the positions stored there, whose keys and values are reused, and
        the new positions' are stored."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            if cache is None:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            raise ValueError(f"{start} cached + {T} new positions exceed block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rope:
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        rope = None
        if self.config.rope:
            rope = rope_angles(pos, self.config.n_embd // self.config.n_head, self.config.rope_base)  # 2 x (T, hs/2)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:
            # Inference: only the last position's logits are needed.
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, vocab)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(),  # (B*T, vocab)
            targets.reshape(-1),  # (B*T,)
            ignore_index=ignore_index,
        )
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices (matmul weights, embeddings), never biases or norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue idx (B, T) by up to `max_new_tokens` sampled tokens; (B, T + new) back.

        temperature 0 is greedy; otherwise the logits are divided by it, cut to the `top_k` likeliest tokens
        and then to the smallest set holding `top_p` of the probability (nucleus sampling, Holtzman et al.
        2020). With `stop_token`, a row that has produced it pads with it, and generation ends once every
        row has. The model sees the last block_size tokens. `use_cache` gives the same tokens faster: within
        the context each step runs one position against the stored keys and values; once the context is
        full, the window slides and every position's keys change (absolute positions move; with rope, the
        tokens that dropped out changed the deeper layers' states), so each later step re-fills the cache
        with the last block_size tokens, as costly as a step without the cache but exact.
        """
        if idx.dim() != 2 or idx.size(1) < 1:
            raise ValueError(f"generate needs idx of shape (batch, tokens >= 1), got {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        block = self.config.block_size
        cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,) rows that produced stop_token
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block:])  # (B, 1, vocab): the window the model sees
            elif cache is None or cache.length == block:
                cache = self.new_cache()
                logits, _ = self(idx[:, -block:], cache=cache)  # (B, 1, vocab): fill the cache
            else:
                logits, _ = self(idx[:, -1:], cache=cache)  # (B, 1, vocab): the newest token only
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:
                next_id = next_id.masked_fill(done[:, None], stop_token)  # finished rows pad
                done |= next_id[:, 0] == stop_token
            idx = torch.cat((idx, next_id), dim=1)  # (B, T+1)
            if stop_token is not None and bool(done.all()):
                break
        return idx


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row (B, 1) from the last position's logits (B, vocab)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, vocab)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, vocab) each
        # A token is dropped when the likelier ones before it already hold top_p; the likeliest always stays.
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)  # (B, vocab), back in id order
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
