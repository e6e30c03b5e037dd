"""Stage 2: cached features -> trained heads.

data (splits, standardisation) -> sweep (configurations) -> train/stacked/optim (many heads per
pass) or logreg (scikit-learn) -> leaderboard/metrics/plots/report -> headio (head.pt) -> fit (the
fit-head runner); evaluate and runs read saved heads back.
"""
