"""``--head knn``: k-nearest neighbours under cosine similarity, the standard evaluation of frozen
features (DINO, DINOv2) and a strong zero-training baseline for few-shot data.

Features are standardised (unless ``standardize=False``) and L2-normalised, so the dot product is
the cosine similarity. Voting is DINO's (``temperature``: each of the k neighbours votes
exp(similarity / T) for its class) or plain majority (``majority``: one vote each). The head's
scores are the log of each class's share of the votes, so their softmax is the vote distribution.

A sweep computes each evaluated row's similarities to the training rows once, in row chunks
((CHUNK, M) floats at a time), keeps the top max(k) neighbours and scores every (k, temperature,
voting) configuration from them. Training rows are scored leave-one-out (a row is never its own
neighbour), so train accuracy means something. The saved head carries the training features (the
"bank", (M, D) at the cache's dtype: M x D x 4 bytes for float32 caches, half that for float16)
and their labels; head.pt grows accordingly and an export holds the bank as a constant.
"""
from __future__ import annotations

import itertools
import time

from featcache.pipeline.errors import opt
from featcache.pipeline.heads.kinds import HeadKind, register
from featcache.pipeline.heads.kinds.sequential import rows_of

VOTING = ("temperature", "majority")


@register
class KNN(HeadKind):
    name = "knn"
    summary = "k-nearest neighbours under cosine similarity (no training; DINO's temperature voting)"
    options = ("k", "knn_temperature", "knn_voting")
    trains = False

    def check(self, cfg) -> list[str]:
        bad = [f"{opt('k')} {k} (must be at least 1)" for k in cfg.k if k < 1]
        bad += [f"{opt('knn_temperature')} {t} (must be > 0 and finite)" for t in cfg.knn_temperature if not 0 < t < float("inf")]
        bad += [f"{opt('knn_voting')} {v!r} (choose from {', '.join(VOTING)})" for v in cfg.knn_voting if v not in VOTING]
        if cfg.cv or cfg.train_sizes:
            bad.append(f"{opt('cv')}/{opt('train_sizes')} with {opt('head')} knn (k-NN trains nothing: its k values are "
                       "compared on the val split, from one similarity computation)")
        return bad

    def solver_bytes(self, cfg, *, n_train: int, dim: int, n_classes: int) -> int:
        """The normalised bank (and its saved copy for float16), a normalised query split, and one
        (CHUNK, M) similarity block with its top-k."""
        from featcache.pipeline.heads.similarity import CHUNK

        return 2 * n_train * dim * 4 + 2 * CHUNK * n_train * 4

    def configurations(self, cfg) -> list[tuple[int, float, str]]:
        """(k, temperature, voting) combinations; majority voting ignores the temperature."""
        combos = itertools.product(dict.fromkeys(cfg.k), dict.fromkeys(cfg.knn_temperature), dict.fromkeys(cfg.knn_voting))
        return list(dict.fromkeys((k, t if v == "temperature" else 0.0, v) for k, t, v in combos))

    def fit(self, cfg, data):
        from featcache.pipeline.heads import similarity as sim
        from featcache.pipeline.heads.result import Candidate

        t0 = time.perf_counter()
        n_classes = len(data.class_names)
        Xb, yb = rows_of(data, data.rows["train"])
        bank = sim.normalized(Xb)
        configs = self.configurations(cfg)
        kmax = min(max(k for k, _, _ in configs), len(bank) - 1)
        near = {}  # split -> (sims, labels) of its top-kmax neighbours
        for split in ("train", "val", "test"):
            X, y = data.split(split)
            if len(X):
                query = sim.normalized(X) if split != "train" else bank
                sims, idx = sim.neighbours(query, bank, max(kmax, 1), split == "train")
                near[split] = (sims, yb[idx], y)
        shared = (time.perf_counter() - t0) / len(configs)
        saved = sim.saved_bank(bank, data)  # one tensor shared by every configuration's head
        out = []
        for i, (k, temp, voting) in enumerate(configs):
            t1 = time.perf_counter()
            row = {"index": i, "head": self.name, "k": k, "knn_temperature": temp, "knn_voting": voting}
            for split in ("train", "val", "test"):
                if split in near:
                    sims, labels, y = near[split]
                    s = sim.scores(sim.vote_log_shares(sims[:, :k], labels[:, :k], n_classes, temp or 1.0, voting), y)
                else:
                    s = {}
                for m in ("loss", "accuracy", "balanced_accuracy", "macro_f1"):
                    row[f"{split}_{m}"] = s.get(m)
            row["seconds"] = round(shared + time.perf_counter() - t1, 4)
            head = sim.KNNHead(saved, yb.cpu(), n_classes, k, temp or 1.0, voting)
            out.append(Candidate(row, head))
        return out

    def refit(self, cfg, data, best, rows):
        from featcache.pipeline.heads import similarity as sim

        X, y = rows_of(data, rows)
        r = best.row
        bank = sim.saved_bank(sim.normalized(X), data)
        return sim.KNNHead(bank, y.cpu(), len(data.class_names), r["k"], r["knn_temperature"] or 1.0, r["knn_voting"]), None

    def label(self, row: dict) -> str:
        vote = "majority" if row.get("knn_voting") == "majority" else f"T={row.get('knn_temperature', 0):g}"
        return f"knn k={row.get('k')} {vote}"

    def describe(self, params: dict) -> str:
        return self.label(params) + " (cosine similarity, no training)"

    def architecture(self, best, head) -> dict:
        return {"k": head.k, "knn_temperature": head.temperature, "knn_voting": head.voting,
                "bank_rows": int(head.bank.shape[0]), "bank_dtype": str(head.bank.dtype).replace("torch.", "")}

    def build(self, meta: dict):
        import torch

        from featcache.pipeline.heads.similarity import KNNHead

        dtype = getattr(torch, meta.get("bank_dtype", "float32"))
        bank = torch.zeros(meta["bank_rows"], meta["in_dim"], dtype=dtype)
        return KNNHead(bank, torch.zeros(meta["bank_rows"], dtype=torch.long), meta["n_classes"], meta["k"],
                       meta["knn_temperature"], meta["knn_voting"]).eval()


