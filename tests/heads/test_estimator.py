"""HeadClassifier as a scikit-learn estimator: scikit-learn's own checks, and use in its tools."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from featcache import HeadClassifier

# Checks HeadClassifier cannot pass, each with its reason (scikit-learn skips them as expected failures).
EXPECTED_FAILED = {}


@parametrize_with_checks([HeadClassifier(),  # the default a user gets first: the exact probe, C=1
                          HeadClassifier(lr=1e-2, max_iter=60, batch_size=64),
                          HeadClassifier(hidden=(16,), dropout=0.1, lr=1e-2, max_iter=60, batch_size=64,
                                         early_stopping=True, n_iter_no_change=5)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_default_linear_classifier_is_the_exact_probe_and_an_epoch_option_switches_it():
    X, y = load_digits(return_X_y=True)
    exact = HeadClassifier().fit(X, y)
    assert exact.history_ == [] and exact.n_iter_ >= 1  # L-BFGS iterations, no epochs
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(X, y)
    assert np.mean(exact.predict(X) == ref.predict(X)) >= 0.99
    epochs = HeadClassifier(lr=1e-2, max_iter=5).fit(X, y)
    assert len(epochs.history_) == 5
    with pytest.raises(ValueError, match="solver='exact'"):
        HeadClassifier(solver="exact", lr=1e-2).fit(X, y)
