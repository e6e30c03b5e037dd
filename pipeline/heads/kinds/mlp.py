"""``--head mlp``: Linear -> [BatchNorm] -> ReLU -> Dropout per hidden layer, then Linear, trained by
epochs as stacks of configurations (heads/train.py); ``hidden`` lists the architectures to sweep
(a 0 in the list adds the linear head to the sweep)."""
from __future__ import annotations

from featcache.pipeline.errors import opt
from featcache.pipeline.heads.kinds import register
from featcache.pipeline.heads.kinds.sequential import EpochKind


@register
class MLP(EpochKind):
    name = "mlp"
    summary = "multilayer perceptron with dropout, weight decay, L1, batch norm, early stopping"

    def check(self, cfg) -> list[str]:
        bad = super().check(cfg)
        if cfg.batchnorm and cfg.batch_size < 2:
            bad.append(f"{opt('batchnorm')} needs {opt('batch_size')} of at least 2 (batch norm cannot normalise one row)")
        return bad

    def architectures(self, cfg) -> list[tuple[int, ...]]:
        return list(dict.fromkeys(tuple(h) for h in cfg.hidden))
