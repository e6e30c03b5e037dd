"""SGD / Adam / AdamW over stacked parameters with a learning rate, weight decay and momentum per head.

Written by hand because torch.optim keeps one set of hyperparameters per parameter tensor, while a
stacked head keeps K configurations in the leading dimension of one tensor. The update rules are
torch.optim's (non-fused, no amsgrad, no nesterov); tests check K=1 against torch.optim step for step.
"""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")


class StackedOptimizer:
    """Args:
        decay: parameters that get weight decay (weight matrices), each (K, ...).
        no_decay: biases and norm parameters, each (K, ...).
        kind: adam | adamw | sgd.
        lr, weight_decay, momentum: per-head values, shape (K,).
    """

    def __init__(self, decay: list[nn.Parameter], no_decay: list[nn.Parameter], kind: str,
                 lr: torch.Tensor, weight_decay: torch.Tensor, momentum: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in OPTIMIZERS:
            raise ValueError(kind)
        self.kind = kind
        self.groups = [(p, True) for p in decay] + [(p, False) for p in no_decay]
        self.lr, self.wd, self.momentum = lr, weight_decay, momentum
        self.betas, self.eps = betas, eps
        self.t = 0
        self.state = [dict() for _ in self.groups]

    @staticmethod
    def _per_head(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.ndim - 1)))  # (K,) -> (K, 1, ...) to broadcast

    def zero_grad(self) -> None:
        for p, _ in self.groups:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for (p, decays), st in zip(self.groups, self.state):
            if p.grad is None:
                continue
            g = p.grad
            lr = self._per_head(self.lr, p)
            wd = self._per_head(self.wd, p) if decays else None
            if self.kind == "adamw" and wd is not None:
                p.mul_(1 - lr * wd)  # decoupled decay
            elif wd is not None:
                g = g + wd * p  # L2 folded into the gradient (torch Adam / SGD weight_decay)
            if self.kind == "sgd":
                buf = st.get("momentum")
                mom = self._per_head(self.momentum, p)
                # torch SGD: the first step's buffer is the gradient itself
                buf = g.clone() if buf is None else buf.mul_(mom).add_(g)
                st["momentum"] = buf
                p.sub_(lr * buf)
                continue
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            m, v = st["m"], st["v"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1 = 1 - b1 ** self.t
            bc2 = 1 - b2 ** self.t
            denom = (v.sqrt() / (bc2 ** 0.5)).add_(self.eps)
            p.sub_((lr / bc1) * m / denom)
