"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") for a GPT's hidden
matrices, AdamW for everything else, in one optimizer.

Muon runs SGD with Nesterov momentum and replaces each matrix's update by the nearest semi-orthogonal matrix
(all singular values ~1), found by a quintic Newton-Schulz iteration, so that every direction of the update
moves the weights alike however skewed the gradient's spectrum. It suits the matrices inside the blocks;
the token and position embeddings, the head and the LayerNorm gains keep AdamW (modded-nanogpt's split:
an embedding row is a lookup, not a linear map, and a gain is not a matrix).

The parameter groups carry `muon` (True: Muon's rule; False: AdamW's) and `lr_scale` (the group's peak
learning rate over the schedule's, so that model/train.py's warmup + cosine schedule moves every group
alike). One optimizer means one state dict: a checkpoint holds Muon's momentum and AdamW's moments together.

Under DDP each process holds the all-reduced gradient, so each computes the same update: no collective is
needed here (modded-nanogpt shares the orthogonalisations out between GPUs and all-gathers them; that saves
time on many GPUs, not bits).
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch

# Keller Jordan's quintic coefficients: chosen to maximise the slope at zero, so that small singular
# values grow fast, at the price of converging to a value in ~[0.7, 1.2] rather than exactly 1, which
# does not hurt training (modded-nanogpt, zeropower_via_newtonschulz5).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for matrix = U S V^T, by `steps` quintic Newton-Schulz iterations.

    bf16 on CUDA, as modded-nanogpt (the iteration is stable in it and twice as fast); fp32 elsewhere,
    because CPUs without bf16 matmuls run it ~100x slower (ENV-NOTES).
    """
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.mT  # (cols, rows): the Gram matrix x @ x.mT is then the smaller of the two
    # The spectral norm is at most the Frobenius norm: after this every singular value is <= 1, inside the
    # interval where the iteration converges.
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT  # (r, r), r = min(rows, cols)
        poly = b * gram + c * gram @ gram  # (r, r)
        x = a * x + poly @ x  # (r, max(rows, cols))
    if tall:
        x = x.mT
    return x.to(matrix.dtype)


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """The names of the parameters Muon updates: matrices inside the transformer blocks."""
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and param.dim() >= 2 and name.startswith("transformer.h.")
    ]


def param_groups(
    model: torch.nn.Module, *, learning_rate: float, weight_decay: float, muon_lr: float, muon_weight_decay: float
) -> list[dict[str, Any]]:
    """Muon's group (the hidden matrices), then AdamW's: the other matrices (embeddings, an untied head) with
    weight decay, and vectors (gains, biases) without, as model.optimizer_groups decays them."""
    hidden = set(hidden_matrices(model))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {
            "params": [p for name, p in params if name in hidden],
            "muon": True,
            "weight_decay": muon_weight_decay,
            "lr_scale": muon_lr / learning_rate,
        },
        {
            "params": [p for name, p in params if name not in hidden and p.dim() >= 2],
            "muon": False,
            "weight_decay": weight_decay,
            "lr_scale": 1.0,
        },
        {
            "params": [p for name, p in params if name not in hidden and p.dim() < 2],
            "muon": False,
            "weight_decay": 0.0,
            "lr_scale": 1.0,
        },
    ]


class Muon(torch.optim.Optimizer):
    """Muon on the groups whose `muon` is True, AdamW (Loshchilov & Hutter 2019, decoupled weight decay, as
    torch.optim.AdamW computes it) on the others. `lr` is set per group by the training loop."""

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        *,
        lr: float,
        momentum: float = 0.95,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "ns_steps": ns_steps, "betas": betas, "eps": eps}
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["muon"]:
                    self._muon_step(param, group)
                else:
                    self._adamw_step(param, group)
        return loss

    def _muon_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad, self.state[param]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        beta = group["momentum"]
        buffer.lerp_(grad, 1 - beta)  # an exponential moving average of the gradients
        update = grad.lerp(buffer, beta)  # Nesterov: the gradient pulled toward where momentum is heading
        rows, cols = len(update), update[0].numel()
        update = orthogonalize(update.view(rows, cols), group["ns_steps"]).view_as(param)
        # An orthogonal rows x cols update has RMS 1/sqrt(max(rows, cols)); this factor makes it 1/sqrt(cols)
        # for tall matrices too (c_attn, the MLP's c_fc), so every update's size follows its fan-in alone
        # (the Muon package's muon_update).
        scale = max(1.0, rows / cols) ** 0.5
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-group["lr"] * scale)

    def _adamw_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad, self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        param.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))
