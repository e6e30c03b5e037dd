"""Head kinds as plug-ins: one module per kind, registered here by name (as timm registers models).

A kind is a ``HeadKind`` subclass that declares the HeadConfig fields it reads and implements a
small interface: fit a stack of its configurations on prepared data (one ``Candidate`` each: a
leaderboard row and a torch module mapping standardised features (N, D) to scores (N, C) whose
softmax is the class probabilities), refit the winner, describe a configuration in a few words,
record what rebuilds its module into head.pt, and rebuild it. Everything else (fit-head, the
result, the reports, ``runs``, head.pt loading, predict, evaluate, export) goes through ``get``
and never tests a kind's name.

Adding a kind = one module under pipeline/heads/kinds/ with a ``@register`` class, imported at the
bottom of this file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from featcache.pipeline.errors import FeatcacheError

if TYPE_CHECKING:  # annotations only: kinds import torch, this registry does not
    import numpy as np
    from torch import nn

    from featcache.pipeline.config import HeadConfig
    from featcache.pipeline.heads.data import Prepared
    from featcache.pipeline.heads.result import Candidate

_KINDS: dict[str, "HeadKind"] = {}


class HeadKind:
    """The interface of a head kind; subclasses set the class attributes and override the methods."""

    name: str = ""
    summary: str = ""  # one line for --help and the docs
    options: tuple[str, ...] = ()  # HeadConfig fields this kind reads (beyond the common ones)
    trains: bool = True  # it optimises a loss: class weights and --refit epochs mean something
    selection: bool = False  # --cv / --train-sizes are supported (as masked heads of a stack)
    curves: bool = False  # it has per-epoch history (curves.png, weight_norm.png)
    streams: bool = False  # it trains on a streamed cache (heads/stream.py): a RowSource for X

    def by_epochs(self, cfg: "HeadConfig") -> bool:
        """Whether ``cfg`` trains by epochs over shuffled rows (a streamed run then needs a shuffle window)."""
        return False

    def check(self, cfg: "HeadConfig") -> list[str]:
        """Messages for option values this kind cannot train with (each names the option)."""
        return []

    def fit(self, cfg: "HeadConfig", data: "Prepared") -> list["Candidate"]:
        """Train every configuration of ``cfg`` on ``data``; one Candidate each, rows scored on the splits."""
        raise NotImplementedError

    def refit(self, cfg: "HeadConfig", data: "Prepared", best: "Candidate", rows: "np.ndarray") -> tuple["nn.Module", int | None]:
        """Retrain the winner's configuration on ``rows`` of ``data``; returns (module, epochs or None)."""
        raise NotImplementedError

    def cv_refit(self, cfg: "HeadConfig", data: "Prepared", best: "Candidate") -> "Candidate":
        """The cross-validated winner retrained on every train row (train+val with refit), its row
        gaining the scores on the splits (kinds with ``selection`` only)."""
        raise NotImplementedError

    def label(self, row: dict) -> str:
        """A configuration in a few words (legends, ``runs``), from its leaderboard row or recorded params."""
        return self.name

    def describe(self, params: dict) -> str:
        """The winner in a sentence (fit-head's summary), from its recorded params."""
        return self.label(params)

    def params(self, best: "Candidate") -> dict:
        """What metrics.json and head.pt record as the winner's hyperparameters."""
        return {k: v for k, v in best.row.items() if k in self.options}

    def architecture(self, best: "Candidate", head: "nn.Module") -> dict:
        """head.pt metadata that ``build`` needs to rebuild ``head`` (its state_dict fills it)."""
        raise NotImplementedError

    def build(self, meta: dict) -> "nn.Module":
        """An empty module of the architecture recorded in ``meta``, to load head.pt's state_dict into."""
        raise NotImplementedError

    def solver_bytes(self, cfg: "HeadConfig", *, n_train: int, dim: int, n_classes: int,
                     pass_rows: int | None = None) -> int:
        """Bytes this kind needs beyond the feature matrix (heads/memory.py): parameters, gradients,
        optimizer state, per-pass temporaries. An estimate, rounded up. ``pass_rows``: streamed,
        the rows a pass holds at once (None = in memory, every train row)."""
        return 0

    def architectures(self, cfg: "HeadConfig") -> list[tuple[int, ...]]:
        """Hidden-layer shapes an epoch-trained sweep of this kind tries (stacked kinds only)."""
        return [()]


def register(cls: type[HeadKind]) -> type[HeadKind]:
    """Class decorator: make ``cls`` the kind called ``cls.name``."""
    if not cls.name or cls.name in _KINDS:
        raise ValueError(f"head kind needs a new, non-empty name: {cls.name!r}")
    _KINDS[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    """Registered kind names, in registration order (the order --help lists them)."""
    return tuple(_KINDS)


def get(name: str) -> HeadKind:
    """The kind called ``name``; FeatcacheError naming the choices otherwise."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise FeatcacheError(f"unknown head {name!r}: choose from {', '.join(_KINDS)}") from None


# Built-in kinds: importing a module registers it (order = --help order).
from featcache.pipeline.heads.kinds import centroid, knn, linear, logreg, mlp  # noqa: E402,F401
