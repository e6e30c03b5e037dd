"""Classifier heads on cached features, stacked so that K configurations train as one model.

A ``StackedHead`` holds K independent heads of one shape (same hidden sizes, batch norm or not):
weights are (K, in, out) tensors and one mini-batch (B, D) yields logits (K, B, C). Each head keeps
its own initialisation (seeded per configuration), dropout rate and batch-norm statistics, so a
head trained inside a stack equals the same head trained alone. ``to_sequential`` turns one of
them back into a plain ``nn.Sequential`` for saving and prediction.

Per-head input standardisation (cross-validation folds, see ``masks``) never copies the data per
head. The trained parameter stays W in standardised coordinates (weight decay, L1 and Adam act as
in a lone run on z-scored rows), and autograd differentiates through whichever form applies it:

- a linear stack folds the statistics into its weights, ((x - mu) / sigma) W + b =
  x (W / sigma) + (b - mu . (W / sigma)) (``first_layer``), so one (B, D) @ (D, C*K) GEMM serves
  every head: the fold touches K x D x C numbers a step, fewer than the S x B x D of a batch
  transform;
- an MLP standardises the shared batch once per distinct statistics set (heads of one fold share
  theirs: S sets, not K heads), each set's heads multiplying their own (B, D) copy: S x B x D
  numbers a step, where folding would rewrite all K x D x H first-layer weights and their gradient
  several times a step (measured: +50% step time at K = 20, D = 1,280, H = 512). Each run of heads
  writes its products straight into one (K, B, H) output and its weight gradient into one (K, D, H)
  gradient (``_RunMatmul``): no concatenation of the parts forward, nor of their gradients backward.

In training an MLP stack may take a (G, B, D) input instead of a shared (B, D) batch: row group g
holds the batch rows of one training-row set (a fold), padded with rows of zero weight, and each
head reads its own group's rows (``forward``'s ``groups``), so a fold head computes its own rows
of the batch and not the held-out ones (see ``masks.BatchRows``).

Both are the same function; ``to_sequential`` exports the folded form, which takes raw inputs.

Batch norm may take a (K, B) row mask: each head normalises with the mean and variance of its own
rows of a shared batch only, so rows outside a head's training set never enter its statistics.
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


def _runs(ids: list) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of equal values in ``ids``."""
    cuts = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    return list(zip([0, *cuts], [*cuts, len(ids)]))


def head_span(heads: torch.Tensor) -> slice | torch.Tensor:
    """``heads`` (long indices, on the CPU: reading them is free there) as a slice when they are
    one ascending run (a fold's heads, every head of a stack), so that t[...] is a view, not a
    gathered copy of (h, D, H) weights; else ``heads`` itself."""
    ids = heads.tolist()
    return slice(ids[0], ids[0] + len(ids)) if ids and ids == list(range(ids[0], ids[0] + len(ids))) else heads


def _picker(heads: torch.Tensor | None):
    """t -> t[heads] (the rows of the chosen heads, a view when they are one run), or the identity
    for every head."""
    if heads is None:
        return lambda t: t
    span = head_span(heads)
    return lambda t: t[span]


class _RunMatmul(torch.autograd.Function):
    """(K, B, H) = for each run [a, b) of heads, xs[r] (B, D) @ w[a:b] (b - a, D, H), each run's
    product written into its slice of one output and, backward, its weight gradient into its slice
    of one (K, D, H) gradient: splitting w and concatenating the parts would copy both again (the
    gradient's concatenation alone moves K x D x H numbers a step). The inputs xs (rows and their
    statistics) get theirs only when they ask for it: training never does."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, runs: list[tuple[int, int]], *xs: torch.Tensor) -> torch.Tensor:
        out = w.new_empty(w.shape[0], xs[0].shape[0], w.shape[2])
        for (a, b), x in zip(runs, xs):
            torch.bmm(x.expand(b - a, -1, -1), w[a:b], out=out[a:b])  # the run's heads share x: no copy
        ctx.runs = runs
        ctx.save_for_backward(w, *xs)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, *xs = ctx.saved_tensors
        gw = grad.new_empty(grad.shape[0], xs[0].shape[1], grad.shape[2])  # (K, D, H)
        gx: list[torch.Tensor | None] = []
        for i, ((a, b), x) in enumerate(zip(ctx.runs, xs)):
            torch.bmm(x.t().expand(b - a, -1, -1), grad[a:b], out=gw[a:b])
            # the run's heads all read x: its gradient is the sum of theirs, (B, D)
            gx.append(torch.bmm(grad[a:b], w[a:b].transpose(1, 2)).sum(0) if ctx.needs_input_grad[2 + i] else None)
        return (gw, None, *gx)


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
        # A plain bool, set whenever the dropout buffer is (here, replace_state): testing the buffer
        # in forward would be a device-to-host sync on every training step.
        self.has_dropout = bool((p > 0).any())
        self.generator: torch.Generator | None = None  # dropout masks; set by the trainer

    @property
    def standardizes(self) -> bool:
        """Whether heads standardise their inputs with their own statistics (``set_input_stats``)."""
        return hasattr(self, "in_mean")

    def set_input_stats(self, mean: torch.Tensor, scale: torch.Tensor, sets: list[int] | None = None) -> None:
        """Standardise head k's input with mean[k], scale[k] (each (K, D)).

        Args:
            sets: (K,) ids: heads with equal ids have equal statistics (an MLP standardises the batch
                once per run of equal ids); None = every head its own.
        """
        self.register_buffer("in_mean", mean.clone())
        self.register_buffer("in_scale", scale.clone())
        ids = list(range(len(mean))) if sets is None else list(sets)
        self.register_buffer("in_set", torch.tensor(ids, device=mean.device))
        self._set_ids = ids  # a CPU copy: forward splits the stack without a device sync

    def replace_state(self, state: dict[str, torch.Tensor]) -> None:
        """Swap every parameter and buffer for the given tensors (all (K', ...)); K' may differ from K."""
        with torch.no_grad():
            for name, t in state.items():
                owner, _, idx = name.partition(".")
                if idx:  # "weights.0": an entry of a ParameterList
                    getattr(self, owner)[int(idx)] = nn.Parameter(t.clone())
                else:  # "dropout", "bn_mean0", "in_mean": a buffer
                    setattr(self, owner, t.clone())
        self.k = len(state["dropout"])
        self.has_dropout = bool((self.dropout > 0).any())  # one sync per change of the stack, not per step
        if self.standardizes:
            self._set_ids = self.in_set.tolist()

    def first_layer(self, heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first layer's (K, D, out) weight and (K, out) bias as applied to raw inputs.

        Without input statistics: the parameters themselves (bias None where batch norm follows).
        With them: W / sigma and b - mu . (W / sigma); the shift is kept before batch norm too, so
        the layer's output (and the running mean) is exactly the standardised run's.

        Args:
            heads: (h,) long indices: only those heads (K = h), or None = every head.
        """
        pick = _picker(heads)
        w, b = pick(self.weights[0]), pick(self.biases[0]) if self._has_bias(0) else None
        if not self.standardizes:
            return w, b
        w = w / pick(self.in_scale)[:, :, None]  # (K, D, out)
        shift = torch.bmm(pick(self.in_mean)[:, None, :], w)[:, 0]  # (K, out): mu . (W / sigma)
        return w, -shift if b is None else b - shift

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                heads: torch.Tensor | None = None, groups: list[int] | None = None) -> torch.Tensor:
        """Logits (K, B, C).

        Args:
            x: (B, D) shared by all heads, (K, B, D), or (G, B, D) row groups (``groups``).
            mask: (K, B) float 0/1, the rows of the batch each head trains on (batch norm statistics
                are taken over those only); None = every row. Used in training mode only.
            heads: (h,) long indices: compute only those heads (eval mode only), None = all K.
            groups: (K,) per head the row group of x it reads (an MLP's training batch gathered per
                training-row set, see ``masks.BatchRows``); None = x is (B, D) or (K, B, D).
        """
        if heads is not None and self.training:
            raise ValueError("heads: a subset of the stack is computed in eval mode only")
        pick = _picker(heads)
        h = x
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            if layer == 0 and self.hidden and (groups is not None or (self.standardizes and x.dim() == 2)):
                h = self._first_by_runs(x, heads, groups)  # (K, B, H) without bias
                b = pick(b) if self._has_bias(0) else None
            else:
                if layer == 0:
                    w, b = self.first_layer(heads)
                else:
                    w, b = pick(w), pick(b) if self._has_bias(layer) else None
                h = torch.matmul(h, w)  # (K, B, out)
            if b is not None:
                h = h + b[:, None, :]
            if layer == last:
                break
            if self.batchnorm and mask is not None and self.training:
                h = self._masked_batch_norm(h, layer, mask)
            elif self.batchnorm:
                kk, bsz, width = h.shape
                # Per-config batch norm: treat the K*width units as channels of one batch norm.
                flat = F.batch_norm(
                    h.transpose(0, 1).reshape(bsz, kk * width),
                    pick(getattr(self, f"bn_mean{layer}")).view(-1), pick(getattr(self, f"bn_var{layer}")).view(-1),
                    pick(self.bn_weights[layer]).view(-1), pick(self.bn_biases[layer]).view(-1),
                    training=self.training, momentum=0.1, eps=1e-5,
                )
                h = flat.reshape(bsz, kk, width).transpose(0, 1)
            h = F.relu(h)
            if self.training and self.has_dropout:
                p = self.dropout.view(-1, 1, 1)
                keep = torch.rand(h.shape, device=h.device, generator=self.generator) >= p
                h = h * keep / (1.0 - p)
        return h

    def _first_by_runs(self, x: torch.Tensor, heads: torch.Tensor | None, groups: list[int] | None) -> torch.Tensor:
        """(K, B, H): the first layer (bias not added) of each run of heads with equal statistics and
        row group, on that group's rows standardised once for the run.

        Args:
            x: (B, D) shared, or (G, B, D) row groups (``groups``).
            heads: (h,) long indices on the CPU (a subset, in eval), or None = all K.
            groups: (K,) row group of each head, or None (x shared).
        """
        idx = list(range(self.k)) if heads is None else heads.tolist()
        stats = [self._set_ids[i] for i in idx] if self.standardizes else [-1] * len(idx)
        rows = [0] * len(idx) if groups is None else list(groups)
        runs = _runs(list(zip(stats, rows)))
        xs = [self._standardised(x if groups is None else x[rows[a]], idx[a]) for a, _ in runs]  # (B, D) each
        return _RunMatmul.apply(_picker(heads)(self.weights[0]), runs, *xs)

    def _standardised(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """x (B, D) z-scored with head ``head``'s input statistics (x itself without statistics)."""
        return (x - self.in_mean[head]) / self.in_scale[head] if self.standardizes else x

    def _masked_batch_norm(self, h: torch.Tensor, layer: int, mask: torch.Tensor, eps: float = 1e-5,
                           momentum: float = 0.1) -> torch.Tensor:
        """F.batch_norm's training mode per head over its own rows of the batch only.

        Args: h: (K, B, W) pre-activations; mask: (K, B) float 0/1. A head with fewer than two rows
        here keeps its running statistics (the trainer also leaves it out of the optimizer step).
        """
        m = mask[:, :, None]
        n = mask.sum(1)  # (K,) rows per head
        cnt = n.clamp(min=1)[:, None, None]
        mean = (h * m).sum(1, keepdim=True) / cnt  # (K, 1, W)
        var = ((h - mean) ** 2 * m).sum(1, keepdim=True) / cnt  # biased, as batch norm normalises
        out = (h - mean) * torch.rsqrt(var + eps)
        out = out * self.bn_weights[layer][:, None, :] + self.bn_biases[layer][:, None, :]
        with torch.no_grad():  # running statistics take the unbiased variance, as F.batch_norm
            upd = (n >= 2)[:, None]
            rm, rv = getattr(self, f"bn_mean{layer}"), getattr(self, f"bn_var{layer}")
            unbiased = var[:, 0] * (n / (n - 1).clamp(min=1))[:, None]
            rm.copy_(torch.where(upd, rm.lerp(mean[:, 0], momentum), rm))
            rv.copy_(torch.where(upd, rv.lerp(unbiased, momentum), rv))
        return out

    def to_sequential(self, k: int) -> nn.Sequential:
        """Head k as a plain nn.Sequential (what head.pt stores and predict/export use).

        Input statistics (``set_input_stats``) are folded into the first Linear, so the result takes
        the raw inputs the stack was given; before batch norm the shift moves into its running mean.
        """
        layers: list[nn.Module] = []
        last = len(self.weights) - 1
        with torch.no_grad():
            w0, b0 = self.first_layer(torch.tensor([k], device=self.dropout.device))  # this head only: (1, D, out)
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            w, b = (w0[0], None if b0 is None else b0[0]) if layer == 0 else (w[k], b[k])
            lin = nn.Linear(w.shape[0], w.shape[1], bias=self._has_bias(layer))
            with torch.no_grad():
                lin.weight.copy_(w.T)
                if lin.bias is not None:
                    lin.bias.copy_(b)
            layers.append(lin)
            if layer == last:
                break
            if self.batchnorm:
                bn = nn.BatchNorm1d(w.shape[1])
                shift = b0[0] if layer == 0 and b0 is not None else 0.0  # the bias Linear cannot hold
                with torch.no_grad():
                    bn.weight.copy_(self.bn_weights[layer][k])
                    bn.bias.copy_(self.bn_biases[layer][k])
                    bn.running_mean.copy_(getattr(self, f"bn_mean{layer}")[k] - shift)
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
