"""SGD / Adam / AdamW over stacked parameters with a learning rate, weight decay and momentum per head.

Written by hand because torch.optim keeps one set of hyperparameters per parameter tensor, while a
stacked head keeps K configurations in the leading dimension of one tensor. The update rules are
torch.optim's (non-fused, no amsgrad, no nesterov); tests check K=1 against torch.optim step for step.

A step may leave some heads out (``step(active=...)``): a head whose rows are absent from a shared
mini-batch (a small training-set size, see ``masks``) must not move, nor age its moments, as a lone
run would take no step there. Such a head keeps its own step count for Adam's bias correction.
"""
from __future__ import annotations

import math

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
        self.t = 0  # steps taken by the stack
        self.skipped: torch.Tensor | None = None  # (K,) steps each head sat out; None = none ever did
        self.state = [dict() for _ in self.groups]

    @staticmethod
    def _per_head(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.ndim - 1)))  # (K,) -> (K, 1, ...) to broadcast

    def zero_grad(self) -> None:
        for p, _ in self.groups:
            p.grad = None

    def keep_heads(self, old: StackedOptimizer, keep: torch.Tensor) -> None:
        """Take over ``old``'s step counts and moments for heads ``keep`` (local indices into old's K)."""
        self.t = old.t
        self.skipped = None if old.skipped is None else old.skipped[keep]
        for st_new, st_old in zip(self.state, old.state):
            st_new.update({key: v[keep].clone() for key, v in st_old.items()})

    def _bias_corrections(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """Adam's 1 - beta^t, a float (every head took every step) or (K,) per head."""
        b1, b2 = self.betas
        if self.skipped is None:
            return 1 - b1 ** self.t, 1 - b2 ** self.t
        t = (self.t - self.skipped).clamp(min=1)  # a head that never stepped yet: any finite value
        # 1 - b^t as -expm1(t ln b): in float32, 1 - 0.999^t would cancel to ~1e-4 relative error
        return -torch.expm1(t * math.log(b1)), -torch.expm1(t * math.log(b2))

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        """One update; it consumes the gradients (they serve as scratch space: zero_grad before
        the next backward). Args: active: (K,) bool on the parameters' device, the heads that take
        this step; the others keep parameters, moments and step count. None = every head."""
        self.t += 1
        if active is not None:
            sat_out = (~active).to(self.lr.dtype)
            self.skipped = sat_out if self.skipped is None else self.skipped + sat_out
        bc1, bc2 = self._bias_corrections()
        for (p, decays), st in zip(self.groups, self.state):
            if p.grad is None:
                continue
            if not st:  # zeros: torch SGD's first buffer is the gradient itself, and 0 * momentum + g is g
                st.update({"momentum": torch.zeros_like(p)} if self.kind == "sgd"
                          else {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
            a = None if active is None else self._per_head(active, p)
            self._update(p, p.grad, st, decays, a, bc1, bc2)

    def _update(self, p: torch.Tensor, g: torch.Tensor, st: dict, decays: bool, a: torch.Tensor | None,
                bc1: float | torch.Tensor, bc2: float | torch.Tensor) -> None:
        """Update one stacked parameter in place; ``a`` (K, 1, ...) bool gates heads, None = all.
        ``g`` (p's gradient) is used as scratch space and holds no gradient afterwards."""
        b1, b2 = self.betas
        lr = self._per_head(self.lr, p)
        wd = self._per_head(self.wd, p) if decays else None
        if a is not None:
            lr = lr * a  # a head that sits out moves by 0
        if self.kind == "adamw" and wd is not None:
            p.mul_(1 - lr * wd)  # decoupled decay
        elif wd is not None:
            g = g.addcmul_(p, wd)  # g += wd * p: L2 folded into the gradient (torch Adam / SGD weight_decay)
        if self.kind == "sgd":
            buf, mom = st["momentum"], self._per_head(self.momentum, p)
            if a is None:
                buf.mul_(mom).add_(g)
            else:  # a head that sits out keeps its buffer
                buf.copy_(torch.where(a, buf * mom + g, buf))
            p.addcmul_(buf, lr, value=-1.0)  # p -= lr * buf
            return
        m, v = st["m"], st["v"]
        if a is None:
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:
            m.copy_(torch.where(a, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(a, v * b2 + (1 - b2) * g * g, v))
        if isinstance(bc1, torch.Tensor):
            bc1, bc2 = self._per_head(bc1, p), self._per_head(bc2, p)
        # torch's lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) as m / ((sqrt(v) + eps sqrt(bc2)) / step),
        # step = lr sqrt(bc2) / bc1 per head, built in g's memory (g is not needed any more): no
        # temporary of p's size. A stack's (K, D, H) temporaries are over glibc's 32 MiB mmap limit
        # (20 heads of 1,280 x 512: 52 MB), so each would be mapped, zeroed and unmapped every step.
        # A head that sits out has step 0: its denominator is inf, its update 0.
        root2 = bc2 ** 0.5
        denom = torch.sqrt(v, out=g).add_(self.eps * root2).div_(lr * root2 / bc1)
        p.addcdiv_(m, denom, value=-1.0)
