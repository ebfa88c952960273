"""Image preprocessing for the vision tower: PIL image -> normalised (size, size, 3) float32.

Two aspect modes, as in LLaVA-1.5:
  crop  resize the shortest side to `size` (bicubic), then centre-crop (CLIP's processor)
  pad   pad to a square with the mean colour, centred (LLaVA's `expand2square`), then resize
Then per channel x = (pixel / 255 - mean) / std.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MODES = ("crop", "pad")


def _resize_shortest(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)   # HF CLIPImageProcessor rounds down the same way
    new = (size, new_long) if w <= h else (new_long, size)
    return image if new == (w, h) else image.resize(new, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return image.crop((left, top, left + size, top + size))


def _expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def preprocess(image: Image.Image, size: int, mean, std, mode: str = "crop") -> np.ndarray:
    """(size, size, 3) float32, normalised with per-channel `mean` and `std` (each 3 values)."""
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}; expected one of {MODES}")
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std need 3 values (R, G, B), found shapes {mean.shape} and "
                         f"{std.shape}")
    image = image.convert("RGB")
    if mode == "pad":
        fill = tuple(int(m * 255) for m in mean)   # LLaVA: tuple(int(x * 255) for x in image_mean)
        image = _expand_to_square(image, fill)
    image = _center_crop(_resize_shortest(image, size), size)
    pixels = np.asarray(image, np.float32) / 255.0
    return (pixels - mean) / std
