"""Classifier heads on cached features, stacked so that K configurations train as one model.

A ``StackedHead`` holds K independent heads of one shape (same hidden sizes, batch norm or not):
weights are (K, in, out) tensors and one mini-batch (B, D) yields logits (K, B, C). Each head keeps
its own initialisation (seeded per configuration), dropout rate and batch-norm statistics, so a
head trained inside a stack equals the same head trained alone. ``to_sequential`` turns one of
them back into a plain ``nn.Sequential`` for saving and prediction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _linear_init(k_seeds: list[int], layer: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)) drawn per configuration from its own seed."""
    bound = 1.0 / math.sqrt(fan_in)
    ws, bs = [], []
    for seed in k_seeds:
        g = torch.Generator().manual_seed(seed * 1009 + layer)  # a distinct stream per layer
        ws.append(torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=g))
        bs.append(torch.empty(fan_out).uniform_(-bound, bound, generator=g))
    return torch.stack(ws), torch.stack(bs)


class StackedHead(nn.Module):
    """K heads: Linear -> [BatchNorm] -> ReLU -> Dropout per hidden layer, then Linear.

    Args:
        in_dim: feature dimension D.
        hidden: hidden layer sizes; () is a linear (logistic-regression) head.
        n_classes: C.
        seeds: one init seed per configuration (K = len(seeds)).
        dropout: per-configuration dropout rate, shape (K,); ignored for linear heads.
        batchnorm: batch norm after each hidden Linear.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], n_classes: int, seeds: list[int],
                 dropout: torch.Tensor | None = None, batchnorm: bool = False):
        super().__init__()
        self.k = len(seeds)
        self.hidden = tuple(hidden)
        self.batchnorm = batchnorm and bool(hidden)
        dims = [in_dim, *hidden, n_classes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.bn_weights = nn.ParameterList()
        self.bn_biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            w, b = _linear_init(seeds, layer, fan_in, fan_out)
            self.weights.append(nn.Parameter(w))  # (K, in, out)
            self.biases.append(nn.Parameter(b))  # (K, out)
            if self.batchnorm and layer < len(hidden):
                self.bn_weights.append(nn.Parameter(torch.ones(self.k, fan_out)))
                self.bn_biases.append(nn.Parameter(torch.zeros(self.k, fan_out)))
                self.register_buffer(f"bn_mean{layer}", torch.zeros(self.k, fan_out))
                self.register_buffer(f"bn_var{layer}", torch.ones(self.k, fan_out))
        p = torch.zeros(self.k) if dropout is None else torch.as_tensor(dropout, dtype=torch.float32)
        self.register_buffer("dropout", p.clone())
        self.generator: torch.Generator | None = None  # dropout masks; set by the trainer

    def decay_parameters(self) -> list[nn.Parameter]:
        """Weight matrices only: no weight decay or L1 on biases and norm parameters."""
        return list(self.weights)

    def _has_bias(self, layer: int) -> bool:
        # A bias right before batch norm is cancelled by the mean subtraction: its true gradient is
        # zero, but float noise (~1e-9) would make Adam take full-size steps on it. Leave it out.
        return not (self.batchnorm and layer < len(self.hidden))

    def other_parameters(self) -> list[nn.Parameter]:
        biases = [b for layer, b in enumerate(self.biases) if self._has_bias(layer)]
        return [*biases, *self.bn_weights, *self.bn_biases]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) shared by all heads, or (K, B, D). Returns logits (K, B, C)."""
        h = x
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.matmul(h, w)  # (K, B, out)
            if self._has_bias(layer):
                h = h + b[:, None, :]
            if layer == last:
                break
            if self.batchnorm:
                kk, bsz, width = h.shape
                # Per-config batch norm: treat the K*width units as channels of one batch norm.
                flat = F.batch_norm(
                    h.transpose(0, 1).reshape(bsz, kk * width),
                    getattr(self, f"bn_mean{layer}").view(-1), getattr(self, f"bn_var{layer}").view(-1),
                    self.bn_weights[layer].view(-1), self.bn_biases[layer].view(-1),
                    training=self.training, momentum=0.1, eps=1e-5,
                )
                h = flat.reshape(bsz, kk, width).transpose(0, 1)
            h = F.relu(h)
            if self.training and bool((self.dropout > 0).any()):
                p = self.dropout.view(-1, 1, 1)
                keep = torch.rand(h.shape, device=h.device, generator=self.generator) >= p
                h = h * keep / (1.0 - p)
        return h

    def to_sequential(self, k: int) -> nn.Sequential:
        """Head k as a plain nn.Sequential (what head.pt stores and predict/export use)."""
        layers: list[nn.Module] = []
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            lin = nn.Linear(w.shape[1], w.shape[2], bias=self._has_bias(layer))
            with torch.no_grad():
                lin.weight.copy_(w[k].T)
                if lin.bias is not None:
                    lin.bias.copy_(b[k])
            layers.append(lin)
            if layer == last:
                break
            if self.batchnorm:
                bn = nn.BatchNorm1d(w.shape[2])
                with torch.no_grad():
                    bn.weight.copy_(self.bn_weights[layer][k])
                    bn.bias.copy_(self.bn_biases[layer][k])
                    bn.running_mean.copy_(getattr(self, f"bn_mean{layer}")[k])
                    bn.running_var.copy_(getattr(self, f"bn_var{layer}")[k])
                layers.append(bn)
            layers.append(nn.ReLU())
            layers.append(nn.Dropout(float(self.dropout[k])))
        return nn.Sequential(*layers).cpu().eval()


def build_sequential(in_dim: int, hidden: tuple[int, ...], n_classes: int, batchnorm: bool, dropout: float) -> nn.Sequential:
    """An empty head of the shape ``to_sequential`` produces, to load a saved state_dict into."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(fan_in, fan_out, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(fan_out))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(dims[-1], n_classes))
    return nn.Sequential(*layers).eval()
