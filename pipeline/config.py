"""One frozen dataclass per command: the CLI fills it, the pipeline reads it, the cache records it.

What is recorded (the cache's ``config`` attribute, head.pt and metrics.json ``config``) is read
back with ``Config.from_dict``, into the same dataclass: a field missing from an older record takes
the dataclass default (declared once, here), JSON lists become the tuples the fields hold, and a
field this version does not know is an error rather than a silently dropped setting.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from featcache.pipeline.errors import FeatcacheError


def _tuples(value):
    """JSON lists (at any depth) -> tuples, as the frozen configs hold them."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class _Recorded:
    """``from_dict`` for the frozen configs (mixed in; the dataclasses stay plain)."""

    @classmethod
    def from_dict(cls, record: dict):
        """Rebuild the config from its recorded ``dataclasses.asdict`` form."""
        if not isinstance(record, dict):
            raise FeatcacheError(f"recorded {cls.__name__} is not a mapping: {record!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise FeatcacheError(f"recorded {cls.__name__} has settings this featcache does not know: "
                                 f"{', '.join(unknown)} (written by a newer version?)")
        hints = typing.get_type_hints(cls)
        values = {k: _tuples(v) if "tuple" in str(hints[k]) else v for k, v in record.items()}
        try:
            return cls(**values)
        except TypeError as e:  # a required field missing from the record
            raise FeatcacheError(f"recorded {cls.__name__} is incomplete: {e}") from None


@dataclass(frozen=True)
class ExtractConfig(_Recorded):
    image_dir: str
    output: str
    backbone: str = "resnet18"  # torchvision name | timm:NAME[.TAG][@SIZE] | efficientnet_lite0
    weights: str = "DEFAULT"  # DEFAULT | <torchvision enum name> | none | PATH (.safetensors or state_dict)
    layer: str | None = None  # layer name or comma list (featcache layers); None = input of the classifier
    pool: str | None = None  # avg | max | flatten per layer; None = flatten for the default layer, avg otherwise
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None  # None = sized to the cores this process may use
    dtype: str = "float32"
    seed: int = 0  # seeds random init for --weights none, so features are reproducible
    overwrite: bool = False  # replace a cache built with a different configuration
    prune: bool = False  # consent to an update removing most rows, all of them, or the cache's /views
    verify_content: bool = False  # decide "changed" by sha256 of the bytes, not size + mtime
    max_skipped: float = 0.5  # fail when more than this fraction of files is unusable
    optimize: bool = True  # fastest faithful form (BN folding, channels_last); False = reference eager, NCHW
    compile: str = "auto"  # torch.compile: auto (when the job repays compiling) | on | off
    amp: str = "auto"  # autocast: auto (CUDA: bf16 where native, else fp16; CPU: off) | bf16 | fp16 | off
    draft: bool = True  # JPEGs decoded at reduced scale (shorter side >= 2x resize) when large enough
    augment: int = 0  # augmented views stored per train-split image (seeded by ``seed``)
    augment_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    augment_flip: float = 0.5  # horizontal flip probability
    augment_rotate: float = 0.0  # max rotation in degrees (uniform in +-this), before the crop


SELECT_BY = ("accuracy", "balanced_accuracy", "macro_f1")  # HeadConfig.select_by: what ranks configurations


@dataclass(frozen=True)
class HeadConfig(_Recorded):
    """fit-head options. Tuple fields hold one value, or several to sweep (grid over all of them)."""

    cache: str | None = None  # the cache file; None when the Python API trains on arrays
    output: str | None = None  # the run folder; None = train in memory, write nothing
    head: str = "linear"  # a registered head kind: linear | mlp | logreg | knn | centroid (heads/kinds/)
    hidden: tuple[tuple[int, ...], ...] = ((512,),)  # architectures tried by mlp; () = linear
    dropout: tuple[float, ...] = (0.5,)  # on hidden activations (mlp only)
    weight_decay: tuple[float, ...] = (1e-4,)  # L2 on weight matrices, never on biases or norm params
    l1: tuple[float, ...] = (0.0,)
    batchnorm: bool = False
    optimizer: tuple[str, ...] = ("adam",)  # adam | adamw | sgd
    lr: tuple[float, ...] = (1e-3,)
    momentum: tuple[float, ...] = (0.9,)  # sgd only
    epochs: int = 100
    batch_size: int = 256
    patience: int = 10  # epochs without val-loss improvement; <= 0 disables early stopping
    val_fraction: float = 0.2  # used only when the cache has no val split
    standardize: bool = True
    seed: int = 0
    device: str = "auto"
    C: tuple[float, ...] | None = None  # inverse L2 strengths (sklearn's C); None = the head's own path (kinds)
    search: str = "grid"  # grid: every combination | random: --trials samples, lists read as ranges
    trials: int | None = None  # random search only; None = 20
    refit: bool = False  # retrain the winner on train+val (its best epoch count) before testing
    plots: bool = True  # PNG curves, weight norms, confusion matrix and sweep plot beside metrics.json
    layers: tuple[tuple[str, ...], ...] = ()  # layer sets of a multi-layer cache to sweep; () = every column
    solver: str = "auto"  # linear head: auto (exact unless --l1, views or an epoch option) | exact (L-BFGS over C) | epochs
    use_augmented: bool | None = None  # train on the cache's augmented views; None = when it has some
    drop_nonfinite: bool = False  # drop rows whose features hold NaN/Inf (default: refuse the cache)
    overwrite: bool = False  # replace an existing run folder (default: refuse to)
    cv: int = 0  # stratified K-fold cross-validation over the train rows; 0 = off (rank on the val split)
    train_sizes: tuple[int, ...] = ()  # learning curve: training images per class; 0 = all (always added)
    views_keep_original: float = 0.0  # probability that an epoch's draw of a row is its un-augmented features
    k: tuple[int, ...] = (1, 5, 10, 20)  # knn: neighbours, every value scored from one similarity computation
    knn_temperature: tuple[float, ...] = (0.07,)  # knn voting weight exp(sim / T) (DINO's); centroid softmax T
    knn_voting: tuple[str, ...] = ("temperature",)  # knn: temperature (DINO's weighted vote) | majority
    class_weight: str | tuple[tuple[str, float], ...] | None = None  # "balanced" | (class name, weight) pairs
    select_by: str = "accuracy"  # rank configurations by val accuracy | balanced_accuracy | macro_f1
    max_memory: str | None = None  # e.g. "4G": refuse a run whose memory plan exceeds it (None = what is available)


# FinetuneConfig.augment: training augmentation -> RandomResizedCrop area fraction range (None: no
# crop, the eval preprocessing). "mild" keeps most of a centred subject in every crop; "strong" is
# the ImageNet recipe's (0.08, 1), whose small crops cut drawings and icons into unrecognisable pieces.
FT_AUGMENT: dict[str, tuple[float, float] | None] = {"none": None, "mild": (0.35, 1.0), "strong": (0.08, 1.0)}


@dataclass(frozen=True)
class FinetuneConfig(_Recorded):
    """finetune options. The schedule is fixed: linear warm-up over the first FT_WARMUP of the planned
    steps, then cosine decay to 0 at ``epochs``; early stopping only cuts it short."""

    image_dir: str
    run_dir: str  # --from: a fit-head RUN_DIR
    output: str
    unfreeze: str = "all"  # all | N (last N blocks of the backbone that take part in its forward pass)
    epochs: int = 10
    batch_size: int = 32
    # The head starts at fit-head's converged solution, so it gets no more than the backbone's rate
    # (as in linear-probe-then-fine-tune): on the OpenMoji demo (seed 0, last 3 blocks, 4 epochs) a
    # 10x head rate (1e-3) scored val 0.7091-0.7364 per epoch, against 0.7091-0.7455 at 1e-4.
    lr: float = 1e-4  # head learning rate (peak of the schedule)
    backbone_lr_mult: float = 1.0  # backbone lr = lr x this (blocks left frozen by --unfreeze: 0)
    weight_decay: float = 1e-4  # AdamW, not on biases or norm parameters
    patience: int = 3  # epochs without a better val score (accuracy, then loss); <= 0: no early stopping
    val_fraction: float = 0.2
    augment: str = "mild"  # none | mild | strong (FT_AUGMENT)
    image_size: int | None = None  # side fed to the backbone, pixels; None = the run's preprocessing (its crop)
    workers: int | None = None  # decoding processes; None = decode_workers() chooses for the device
    device: str = "auto"
    seed: int = 0


FT_WARMUP = 0.1  # fraction of the planned optimizer steps spent warming the learning rate up from ~0
