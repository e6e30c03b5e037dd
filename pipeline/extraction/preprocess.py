"""Preprocessing read from the weights (torchvision ``weights.transforms()`` or timm's data config).

The values are captured once in a ``PreprocessSpec`` that the cache records verbatim; the transform
that runs is built from that spec, so what is recorded is exactly what ran and ``predict`` can
rebuild it from a cache without the weights at hand.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torchvision.transforms import InterpolationMode

if TYPE_CHECKING:  # annotations only: importing v2 at module level costs ~2 s (see transform)
    from torchvision.transforms import v2

# torchvision's ImageClassification preset defaults; used for random (--weights none) and file
# weights, which carry no preprocessing of their own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    resize_size: int  # shorter side after resize, pixels
    crop_size: int  # square center crop, pixels
    interpolation: str  # InterpolationMode value: bilinear | bicubic | nearest
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = True
    source: str = ""  # where the values came from, for humans

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def transform(self) -> "v2.Compose":
        """PIL RGB image -> normalised float tensor (3, crop, crop)."""
        # imported here: torchvision.transforms.v2 pulls in torch._dynamo (~2 s), which extraction's
        # own batch path (loader.pil_stage + accel.Normalizer) does not need
        from torchvision.transforms import v2

        return v2.Compose(
            [
                # Resize and crop on the PIL image, as weights.transforms() does.
                v2.Resize(self.resize_size, InterpolationMode(self.interpolation), antialias=self.antialias),
                v2.CenterCrop(self.crop_size),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )


def from_torchvision_weights(weights) -> PreprocessSpec:
    """Read resize/crop/mean/std/interpolation off ``weights.transforms()`` (ImageClassification)."""
    t = weights.transforms()
    return PreprocessSpec(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
        antialias=bool(t.antialias if t.antialias is not None else True),
        source=f"torchvision {weights}.transforms()",
    )


def imagenet_default(source: str) -> PreprocessSpec:
    """torchvision's ImageClassification defaults (resize 256, crop 224, bilinear, ImageNet stats)."""
    return PreprocessSpec(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, True, source)


def from_timm_config(cfg: dict, source: str) -> PreprocessSpec:
    """timm ``resolve_data_config`` output -> spec, with timm's own resize rule floor(size/crop_pct)."""
    size = int(cfg["input_size"][-1])
    return PreprocessSpec(
        resize_size=int(math.floor(size / cfg["crop_pct"])),
        crop_size=size,
        interpolation=cfg["interpolation"],
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        antialias=True,
        source=source,
    )
