"""Decode one image file into an 8-bit RGB PIL image, or say exactly why it cannot be used.

Every conversion policy here is part of the cache fingerprint (``IMAGE_POLICY``): changing how
alpha, 16-bit or EXIF orientation is handled changes the pixels the backbone sees.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white

IMAGE_POLICY = {
    "exif_orientation": "applied",
    "alpha": f"composite on RGB{BACKGROUND}",
    "palette_transparency": "composite like alpha",
    "high_bit_depth": "rescaled to 8 bit (65535 -> 255)",
    "cmyk": "PIL convert to RGB",
    "truncated": "rejected",
    "max_pixels": Image.MAX_IMAGE_PIXELS,
}


class UnreadableImage(Exception):
    """The file is not a usable image; ``str(e)`` is the reason recorded in the cache."""


def _rescale_high_bit_depth(im: Image.Image) -> Image.Image:
    # Pillow opens 16-bit grayscale as I;16 / I; convert('L') would clip everything above 255
    # to white, so scale the full 16-bit range down instead.
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        peak = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
    else:
        peak = 65535.0
    arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB following ``IMAGE_POLICY``."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        im = _rescale_high_bit_depth(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _draft(im: Image.Image, min_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling: cheaper than full decoding) as
    long as the shorter side stays >= ``min_side``. Pillow picks the largest such scale."""
    w, h = im.size
    short = min(w, h)
    if short >= 2 * min_side:  # a scale of at least 1/2 is possible
        im.draft(None, (-(-w * min_side // short), -(-h * min_side // short)))  # ceil: never below min_side


def load_rgb(path: str, draft_min_side: int | None = None) -> Image.Image:
    """Open, decode, orient and convert one image.

    Args:
        path: file to read.
        draft_min_side: if given and the file is a JPEG whose shorter side is at least twice this,
            decode it at a reduced scale whose shorter side is still >= this many pixels
            (see ``_draft``); otherwise, and for every other format, decode fully.
    Raises:
        UnreadableImage: zero-byte, truncated, not an image, too large, or unreadable.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that; treat both as bombs.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if draft_min_side and im.format == "JPEG":
                    _draft(im, draft_min_side)
                im.load()  # decode now so truncation surfaces here, not later in a worker
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # UnidentifiedImageError is an OSError; truncated data raises OSError on load().
        reason = str(e) or type(e).__name__
        raise UnreadableImage(f"{type(e).__name__}: {reason}") from None
