"""One frozen dataclass per command: the CLI fills it, the pipeline reads it, the cache records it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExtractConfig:
    image_dir: str
    output: str
    backbone: str = "resnet18"
    weights: str = "DEFAULT"  # DEFAULT | <enum name> | none | PATH to a state_dict
    layer: str | None = None  # torchvision graph node; None = input of the classifier
    pool: str | None = None  # avg | max | flatten; None = flatten for the default layer, avg otherwise
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None  # None = sized to the cores this process may use
    dtype: str = "float32"
    seed: int = 0  # seeds random init for --weights none, so features are reproducible
    overwrite: bool = False  # replace a cache built with a different configuration
    prune: bool = False  # consent to an update removing most rows, all of them, or the cache's /views
    verify_content: bool = False  # decide "changed" by sha256 of the bytes, not size + mtime
    max_skipped: float = 0.5  # fail when more than this fraction of files is unusable
    optimize: bool = True  # fastest faithful form (BN folding, channels_last, CUDA fp16); False = reference eager fp32
    compile: str = "auto"  # torch.compile: auto (when the job repays compiling) | on | off
    draft: bool = True  # JPEGs decoded at reduced scale (shorter side >= 2x resize) when large enough
    augment: int = 0  # augmented views stored per train-split image (seeded by ``seed``)
    augment_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    augment_flip: float = 0.5  # horizontal flip probability
    augment_rotate: float = 0.0  # max rotation in degrees (uniform in +-this), before the crop


@dataclass(frozen=True)
class HeadConfig:
    """fit-head options. Tuple fields hold one value, or several to sweep (grid over all of them)."""

    cache: str
    output: str
    head: str = "linear"  # linear | mlp | logreg (scikit-learn LogisticRegression over C)
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
    C: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # logreg only: inverse L2 strength (sklearn's C)
    search: str = "grid"  # grid: every combination | random: --trials samples, lists read as ranges
    trials: int | None = None  # random search only; None = 20
    refit: bool = False  # retrain the winner on train+val (its best epoch count) before testing
    plots: bool = True  # PNG curves, weight norms, confusion matrix and sweep plot beside metrics.json
    use_augmented: bool | None = None  # train on the cache's augmented views; None = when it has some
