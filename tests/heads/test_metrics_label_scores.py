"""metrics.label_scores is scikit-learn's accuracy, balanced accuracy and macro-F1, to the bit."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from featcache.pipeline.heads.metrics import label_scores


def _sklearn(y: np.ndarray, pred: np.ndarray) -> dict:
    with warnings.catch_warnings():  # a class predicted but absent from y: sklearn warns
        warnings.simplefilter("ignore")
        return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
                "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}


def _random_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, c = int(rng.integers(1, 400)), int(rng.integers(1, 30))
        y = rng.integers(0, c, n)
        pred = np.where(rng.random(n) < rng.random(), y, rng.integers(0, c + 3, n))  # some classes only predicted
        yield y, pred


EDGE = {
    "single row": ([4], [4]),
    "single row wrong": ([4], [2]),
    "one class, all right": ([3, 3, 3], [3, 3, 3]),
    "one class in y, others predicted": ([3, 3, 3, 3], [3, 0, 7, 3]),
    "predicted classes absent from y": ([0, 0, 1, 1, 1], [2, 0, 1, 5, 1]),
    "classes absent from both (gaps in the labels)": ([0, 9, 9, 4], [0, 9, 4, 4]),
    "nothing right": ([0, 1, 2, 0], [1, 2, 0, 2]),
    "all one prediction": ([0, 1, 2, 2, 1, 0, 2], [2] * 7),
    "a true class never predicted": ([0, 0, 1, 2], [0, 0, 0, 0]),
}


@pytest.mark.parametrize("case", EDGE.values(), ids=EDGE.keys())
def test_edge_cases_equal_sklearn_exactly(case):
    y, pred = (np.asarray(a, dtype=np.int64) for a in case)
    assert label_scores(y, pred) == _sklearn(y, pred)


def test_random_labels_and_predictions_equal_sklearn_exactly():
    for y, pred in _random_cases():
        assert label_scores(y, pred) == _sklearn(y, pred), (y, pred)


def test_no_rows_raises_as_sklearn_does():
    empty = np.array([], dtype=np.int64)
    with pytest.raises(ValueError):
        _sklearn(empty, empty)
    with pytest.raises(ValueError):
        label_scores(empty, empty)
