"""``HeadClassifier``: a fit-head head as a scikit-learn estimator (Pipeline, GridSearchCV, cross_val_score).

It trains exactly what one fit-head configuration trains, with fit-head's hyperparameter names,
and passes scikit-learn's own estimator checks with its defaults (tests/heads/test_estimator.py). As in
fit-head, a linear head (``hidden=()``) is the exact probe (scikit-learn's LogisticRegression(C)
objective, heads/exact.py) unless an epoch option is given (``lr``, ``weight_decay``, ``l1``,
``optimizer``, ``momentum``, ``max_iter``, ``batch_size``, ``early_stopping``) or
``solver="epochs"``: those default to None, meaning "not given", and take fit-head's defaults
when epochs train (``train.train_many`` on standardised features, the same stacked head,
optimizer and early stopping).

Why no sweep estimator here: a scikit-learn search (GridSearchCV) fits one configuration per call,
which is what this class is for; featcache's batched sweep, which trains many configurations per
read of the data and picks on a validation split, is ``featcache.fit_heads`` (its result can hand
back the winner's hyperparameters for a HeadClassifier).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featcache.pipeline.device import resolve_device
from featcache.pipeline.heads.data import hold_out, zscore_stats
from featcache.pipeline.heads.metrics import predict_proba
from featcache.pipeline.heads.optim import OPTIMIZERS
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_many


class HeadClassifier(ClassifierMixin, BaseEstimator):
    """A linear (``hidden=()``) or MLP head trained by featcache's trainer.

    Args:
        hidden: hidden layer widths; () is a linear head (multinomial logistic regression).
        dropout: after each hidden layer (MLP only).
        weight_decay: L2 on weight matrices (never on biases or norm parameters).
        l1: L1 on weight matrices.
        batchnorm: batch norm after each hidden layer.
        optimizer: adam | adamw | sgd.
        lr: learning rate.
        momentum: SGD momentum.
        max_iter: epochs (fit-head's ``epochs``).
        batch_size: rows per step.
        early_stopping: hold out ``validation_fraction`` of the rows (stratified) and keep the epoch
            with the lowest validation loss, stopping after ``n_iter_no_change`` epochs without one.
        validation_fraction: see early_stopping.
        n_iter_no_change: fit-head's ``patience``.
        standardize: z-score features with training statistics (fit-head's default).
        random_state: seeds initialisation, data order, dropout and the hold-out.
        device: cpu | cuda | auto.
        C: inverse L2 strength of the exact probe (scikit-learn's C; a linear head without epoch options).
        solver: auto (exact for a linear head without epoch options) | exact | epochs.
        Epoch options left None take fit-head's defaults: weight_decay 1e-4, l1 0, optimizer adam,
        lr 1e-3, momentum 0.9, max_iter (epochs) 100, batch_size 256, early_stopping False.

    Attributes (after fit):
        classes_, n_features_in_, head_ (torch nn.Sequential on standardised features),
        mean_, scale_ (standardisation, or None), n_iter_ (the kept epoch), history_ (per epoch).
    """

    def __init__(self, hidden=(), dropout=0.0, weight_decay=None, l1=None, batchnorm=False, optimizer=None,
                 lr=None, momentum=None, max_iter=None, batch_size=None, early_stopping=None,
                 validation_fraction=0.1, n_iter_no_change=10, standardize=True, random_state=None, device="cpu",
                 C=1.0, solver="auto"):
        self.C = C
        self.solver = solver
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.l1 = l1
        self.batchnorm = batchnorm
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.standardize = standardize
        self.random_state = random_state
        self.device = device

    EPOCH_DEFAULTS = {"weight_decay": 1e-4, "l1": 0.0, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
                      "max_iter": 100, "batch_size": 256, "early_stopping": False}

    def _epoch(self, name: str):
        """An epoch option: as given, or fit-head's default when left None."""
        value = getattr(self, name)
        return self.EPOCH_DEFAULTS[name] if value is None else value

    def _solver(self, hidden: tuple[int, ...]) -> str:
        given = [n for n in self.EPOCH_DEFAULTS if getattr(self, n) is not None]
        if self.solver not in ("auto", "exact", "epochs"):
            raise ValueError(f"invalid solver={self.solver!r}: choose auto, exact or epochs")
        if self.solver == "exact" and (hidden or given):
            raise ValueError(f"solver='exact' solves a linear L2 probe: it takes hidden=() and no "
                             f"{', '.join(given) or 'hidden layers'}")
        if self.solver == "epochs" or hidden or given:
            return "epochs"
        return "exact"

    def _check_params(self) -> tuple[int, ...]:
        hidden = (self.hidden,) if isinstance(self.hidden, (int, np.integer)) else tuple(self.hidden)
        hidden = tuple(int(h) for h in hidden if h != 0)
        wd, l1, lr, mom = (self._epoch(n) for n in ("weight_decay", "l1", "lr", "momentum"))
        checks = {
            "hidden": all(h > 0 for h in hidden), "dropout": 0 <= self.dropout < 1,
            "weight_decay": np.isfinite(wd) and wd >= 0, "l1": np.isfinite(l1) and l1 >= 0,
            "optimizer": self._epoch("optimizer") in OPTIMIZERS, "lr": np.isfinite(lr) and lr > 0,
            "momentum": 0 <= mom < 1, "max_iter": int(self._epoch("max_iter")) >= 1,
            "batch_size": int(self._epoch("batch_size")) >= 1, "C": np.isfinite(self.C) and self.C > 0,
            "validation_fraction": 0 < self.validation_fraction < 1, "n_iter_no_change": int(self.n_iter_no_change) >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {bad[0]}={getattr(self, bad[0])!r}")
        return hidden

    def fit(self, X, y):
        """Train on X (n, D) and labels y (n,); returns self."""
        hidden = self._check_params()
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"HeadClassifier needs samples of at least 2 classes; the data contains 1 class: "
                             f"{self.classes_[0]!r}")
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        X = X.astype(np.float32)
        self.mean_ = self.scale_ = None
        if self.standardize:
            self.mean_, self.scale_ = zscore_stats(X)  # fit-head's own statistics
            X = (X - self.mean_) / self.scale_
        dev = resolve_device(self.device)
        Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y_idx.astype(np.int64)).to(dev)
        if self._solver(hidden) == "exact":
            from featcache.pipeline.heads.exact import fit_exact

            res = fit_exact([float(self.C)], Xt, yt, len(self.classes_))[0]
            self.head_, self.n_iter_, self.history_ = res.head, res.n_iter, []
            return self
        rows = np.arange(len(X))
        val = None
        if self._epoch("early_stopping"):
            rows, val, _ = hold_out(rows, y_idx, self.validation_fraction, seed)
        params = HeadParams(hidden=hidden, dropout=float(self.dropout) if hidden else 0.0,
                            batchnorm=bool(self.batchnorm) and bool(hidden), weight_decay=float(self._epoch("weight_decay")),
                            l1=float(self._epoch("l1")), optimizer=self._epoch("optimizer"), lr=float(self._epoch("lr")),
                            momentum=float(self._epoch("momentum")), seed=seed)
        settings = TrainSettings(int(self._epoch("max_iter")), int(self._epoch("batch_size")),
                                 int(self.n_iter_no_change) if self._epoch("early_stopping") else 0)
        tr = torch.as_tensor(rows, device=dev)
        vl = torch.as_tensor(val, device=dev) if val is not None else None
        data = TrainData(Xt[tr], yt[tr], len(self.classes_), Xt[vl] if vl is not None else None,
                         yt[vl] if vl is not None else None)
        (res,) = train_many([params], data=data, settings=settings)
        self.head_, self.n_iter_, self.history_ = res.head, res.best_epoch, res.history
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self, "head_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32]).astype(np.float32)
        if self.mean_ is not None:
            X = (X - self.mean_) / self.scale_
        return predict_proba(self.head_, torch.from_numpy(np.ascontiguousarray(X))).double().numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, as a label from ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]
