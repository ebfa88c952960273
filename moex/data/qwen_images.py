"""Qwen3-VL image preprocessing: dynamic resolution, the processor's numerics, its patch layout.

Shape letters: H, W the image as given; H', W' after `smart_resize` (multiples of F = P * M);
P patch side, M merge side, T temporal patch (an image is repeated T times), C = 3 channels;
the grid (t, h, w) = (1, H' / P, W' / P) counts patches, and the language model sees
t * h * w / M^2 image tokens.

What transformers' processor does (Qwen3-VL's `preprocessor_config.json` maps to
`Qwen2VLImageProcessor`; without torchvision `AutoImageProcessor` returns its PIL backend,
`Qwen2VLImageProcessorPil`, whose numerics `preprocess` reproduces):
  1. RGB (transparency composited onto white), uint8
  2. (H', W') = smart_resize(H, W, F, size["shortest_edge"], size["longest_edge"]): the
     `size` dict holds pixel COUNTS, not edges -- shortest_edge is min_pixels (65536 = 256^2),
     longest_edge is max_pixels (16777216 = 4096^2); top-level `min_pixels` / `max_pixels`
     keys (Qwen2-VL's files) override them
  3. PIL bicubic resize of the uint8 RGB image (PIL's own 8-bit filter, output uint8)
  4. float64(pixel) * rescale_factor -> float32, then (x - mean) / std in float32
  5. patches flattened to pixel_values (t*h*w, C*T*P*P): rows in M x M blocks (block row,
     block column, row in block, column in block), columns (C, T, P, P)
The torchvision backend resizes differently (torch bicubic); moex matches the PIL one.
moex's vision tower takes (B, H', W', C) images and cuts patches row-major itself, so
`preprocess` returns the image; `hf_pixel_values` / `images_from_pixel_values` convert
to and from the processor's layout for parity checks against transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image

from moex.data.records import write_atomic

CONFIG_FILE = "preprocessor_config.json"
MAX_ASPECT = 200        # smart_resize refuses images more elongated than this (as transformers)
RESAMPLE = {m.name.lower(): m for m in Image.Resampling}   # "bicubic" -> Image.Resampling.BICUBIC
_FLAGS = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")

Grid = tuple[int, int, int]   # (t, h, w) in patches


class PreprocessorConfigError(ValueError):
    """A preprocessor_config.json (or a spec) is not what moex's Qwen preprocessing can run."""


@dataclasses.dataclass(frozen=True)
class QwenImageSpec:
    """The image processor's settings; the defaults are Qwen3-VL's released ones.

    `min_pixels` / `max_pixels` bound H' * W' (the file's size.shortest_edge / longest_edge).
    `image_processor_type` / `processor_class` are only carried so `to_json` writes a file
    transformers' Auto classes can load.
    """
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    image_processor_type: str = "Qwen2VLImageProcessorFast"
    processor_class: str = "Qwen3VLProcessor"

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                     "max_pixels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PreprocessorConfigError(f"QwenImageSpec.{name}: expected a positive int, "
                                              f"found {value!r}")
        if self.min_pixels > self.max_pixels:
            raise PreprocessorConfigError(f"QwenImageSpec: expected min_pixels <= max_pixels, "
                                          f"found {self.min_pixels} > {self.max_pixels}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise PreprocessorConfigError(f"QwenImageSpec.{name}: expected 3 values (R, G, B),"
                                              f" found {value!r}")
        if 0.0 in self.image_std:
            raise PreprocessorConfigError(f"QwenImageSpec.image_std: expected nonzero values, "
                                          f"found {self.image_std}")
        if self.resample not in RESAMPLE:
            raise PreprocessorConfigError(f"QwenImageSpec.resample: expected one of "
                                          f"{sorted(RESAMPLE)}, found {self.resample!r}")

    @property
    def factor(self) -> int:
        """F = P * M: H' and W' are multiples of it (one merged token covers F x F pixels)."""
        return self.patch_size * self.merge_size

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') for an H x W image under this spec's budget."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    @classmethod
    def from_json(cls, data: dict, source: str = CONFIG_FILE) -> "QwenImageSpec":
        """A spec from a parsed preprocessor_config.json; `source` names the file in errors."""
        return cls(**_fields_from_json(data, source))

    @classmethod
    def from_checkpoint(cls, folder) -> "QwenImageSpec":
        """The spec in `folder`/preprocessor_config.json (an HF checkpoint folder)."""
        path = os.path.join(os.fspath(folder), CONFIG_FILE)
        if not os.path.isfile(path):
            raise PreprocessorConfigError(f"{path}: expected the image processor's config file, "
                                          f"found no such file")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise PreprocessorConfigError(f"{path}: expected JSON, found {e}") from None
        return cls.from_json(data, path)

    def to_json(self) -> dict:
        """The preprocessor_config.json transformers writes for this spec (keys as HF's)."""
        return {
            "size": {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": int(RESAMPLE[self.resample]),
            **{flag: True for flag in _FLAGS},
            "image_processor_type": self.image_processor_type,
            "processor_class": self.processor_class,
        }

    def write(self, folder) -> str:
        """Write `to_json()` as `folder`/preprocessor_config.json (atomically); its path."""
        path = os.path.join(os.fspath(folder), CONFIG_FILE)
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return path


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(data: dict, key: str, source: str, check, expected: str, default=None):
    """data[key] when `check` accepts it; `default` when absent and a default exists."""
    if key not in data:
        if default is not None:
            return default
        raise PreprocessorConfigError(f"{source}: missing key {key!r} (expected {expected})")
    value = data[key]
    if not check(value):
        raise PreprocessorConfigError(f"{source}: key {key!r}: expected {expected}, found "
                                      f"{value!r} ({type(value).__name__})")
    return value


def _pixel_budget(data: dict, source: str) -> tuple[int, int]:
    """(min_pixels, max_pixels): size.shortest_edge / longest_edge, overridden as HF does."""
    positive = lambda v: _is_int(v) and v > 0   # noqa: E731
    found = {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if data.get(key) is not None:
            found[key] = _get(data, key, source, positive, "a positive int (pixel count)")
        else:
            size = _get(data, "size", source, lambda v: isinstance(v, dict),
                        'a dict {"shortest_edge": min pixels, "longest_edge": max pixels}')
            found[key] = _get(size, edge, f"{source}: size", positive,
                              "a positive int (a pixel count)")
    return found["min_pixels"], found["max_pixels"]


def _fields_from_json(data: dict, source: str) -> dict:
    if not isinstance(data, dict):
        raise PreprocessorConfigError(f"{source}: expected a JSON object, found "
                                      f"{type(data).__name__}")
    for flag in _FLAGS:
        if _get(data, flag, source, lambda v: isinstance(v, bool), "true or false", True) is False:
            raise PreprocessorConfigError(f"{source}: key {flag!r}: expected true (moex always "
                                          f"converts, resizes, rescales and normalises), found "
                                          f"false")
    positive = lambda v: _is_int(v) and v > 0   # noqa: E731
    triple = lambda v: (isinstance(v, list) and len(v) == 3   # noqa: E731
                        and all(_is_number(x) for x in v))
    by_value = {int(m): name for name, m in RESAMPLE.items()}
    min_pixels, max_pixels = _pixel_budget(data, source)
    resample = _get(data, "resample", source, lambda v: _is_int(v) and v in by_value,
                    f"a PIL resampling filter number {sorted(by_value)}", int(RESAMPLE["bicubic"]))
    defaults = QwenImageSpec.__dataclass_fields__
    return dict(
        patch_size=_get(data, "patch_size", source, positive, "a positive int"),
        temporal_patch_size=_get(data, "temporal_patch_size", source, positive, "a positive int"),
        merge_size=_get(data, "merge_size", source, positive, "a positive int"),
        min_pixels=min_pixels, max_pixels=max_pixels,
        image_mean=tuple(_get(data, "image_mean", source, triple, "a list of 3 numbers")),
        image_std=tuple(_get(data, "image_std", source, triple, "a list of 3 numbers")),
        rescale_factor=_get(data, "rescale_factor", source, lambda v: _is_number(v) and v > 0,
                            "a positive number", defaults["rescale_factor"].default),
        resample=by_value[resample],
        **{key: _get(data, key, source, lambda v: isinstance(v, str), "a string",
                     defaults[key].default)
           for key in ("image_processor_type", "processor_class")},
    )


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """(H', W'): each side rounded to the nearest multiple of `factor` (Python's round, ties to
    even); if that exceeds `max_pixels`, both sides are scaled by sqrt(H*W / max_pixels) and
    floored to multiples (at least `factor`); if below `min_pixels`, scaled up by
    sqrt(min_pixels / (H*W)) and ceiled. transformers' rule, its float expressions kept."""
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise ValueError(f"smart_resize: expected positive int height and width, found "
                         f"{height!r} x {width!r}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"smart_resize: expected an aspect ratio <= {MAX_ASPECT}, found "
                         f"{height} x {width} ({max(height, width) / min(height, width):.1f})")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _rgb(image) -> Image.Image:
    """An RGB PIL image; transparency composited onto white (transformers' convert_to_rgb)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, found shape {image.shape} "
                             f"dtype {image.dtype}; convert other layouts to RGB first")
        return Image.fromarray(image, "RGB")
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, found "
                         f"{type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess(image, spec: QwenImageSpec = QwenImageSpec()) -> tuple[np.ndarray, Grid]:
    """PIL image or (H, W, 3) uint8 -> (pixels (H', W', 3) float32 normalised, grid (1, h, w)).

    Bit-for-bit the numbers of transformers' PIL-backend Qwen2VLImageProcessor (module doc).
    """
    rgb = _rgb(image)
    height, width = spec.resized(rgb.height, rgb.width)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), RESAMPLE[spec.resample])
    scaled = (np.asarray(rgb, np.float64) * spec.rescale_factor).astype(np.float32)
    pixels = (scaled - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std,
                                                                            np.float32)
    return pixels, (1, height // spec.patch_size, width // spec.patch_size)


def spec_for(vision, folder=None) -> QwenImageSpec:
    """The processor spec of a model: `folder`/preprocessor_config.json when the checkpoint has
    one (converted checkpoints keep it), else Qwen3-VL's budget with the tower's patch, merge,
    frames and pixel normalisation (`vision`: a moex VisionConfig)."""
    if folder is not None and os.path.isfile(os.path.join(os.fspath(folder), CONFIG_FILE)):
        return QwenImageSpec.from_checkpoint(folder)
    return QwenImageSpec(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch,
                         merge_size=vision.spatial_merge, image_mean=tuple(vision.image_mean),
                         image_std=tuple(vision.image_std))


def num_image_tokens(grid: Grid, spec: QwenImageSpec = QwenImageSpec()) -> int:
    """t * h * w / M^2: the language model's image tokens for one image's grid."""
    t, h, w = grid
    if h % spec.merge_size or w % spec.merge_size:
        raise ValueError(f"grid {tuple(grid)}: expected h and w multiples of merge_size "
                         f"{spec.merge_size}")
    return t * h * w // spec.merge_size ** 2


def hf_pixel_values(pixels: np.ndarray, spec: QwenImageSpec = QwenImageSpec()) -> np.ndarray:
    """(H', W', C) -> the processor's pixel_values (h*w, C*T*P*P) for that one image (t = 1).

    Rows: patches in M x M blocks (block row, block column, row in block, column in block);
    columns: (C, T, P, P), the image repeated over the temporal patch T.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[0] % spec.factor or pixels.shape[1] % spec.factor:
        raise ValueError(f"expected an (H', W', C) image with H', W' multiples of "
                         f"{spec.factor} (patch_size * merge_size), found shape {pixels.shape}")
    height, width, c = pixels.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    blocks = pixels.reshape(height // spec.factor, m, p, width // spec.factor, m, p, c)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)              # (h/M, w/M, M, M, C, P, P)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return frames.reshape((height // p) * (width // p), c * t * p * p)


def images_from_pixel_values(pixel_values: np.ndarray, grid: Grid,
                             spec: QwenImageSpec = QwenImageSpec()) -> np.ndarray:
    """The processor's pixel_values (h*w, C*T*P*P) of one image, grid (1, h, w) -> (H', W', C)
    (the first temporal frame; an image's frames are copies)."""
    pixel_values = np.asarray(pixel_values)
    t_grid, h, w = (int(g) for g in grid)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if t_grid != 1 or h % m or w % m:
        raise ValueError(f"grid {tuple(grid)}: expected an image's grid (1, h, w) with h, w "
                         f"multiples of merge_size {m}")
    if (pixel_values.ndim != 2 or pixel_values.shape[0] != h * w
            or pixel_values.shape[1] % (t * p * p)):
        raise ValueError(f"pixel_values: expected shape ({h * w}, C * {t * p * p}) for grid "
                         f"{tuple(grid)}, found {pixel_values.shape}")
    c = pixel_values.shape[1] // (t * p * p)
    frames = pixel_values.reshape(h // m, w // m, m, m, c, t, p, p)[:, :, :, :, :, 0]
    return frames.transpose(0, 2, 5, 1, 3, 6, 4).reshape(h * p, w * p, c)
