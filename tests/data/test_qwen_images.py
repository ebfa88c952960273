"""moex.data.qwen_images against transformers' Qwen3-VL image processor (PIL backend, offline)."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from moex.data.qwen_images import (CONFIG_FILE, PreprocessorConfigError, QwenImageSpec,
                                   hf_pixel_values, images_from_pixel_values, num_image_tokens,
                                   preprocess, smart_resize)

# factor 32; small budgets keep the images (and the test) small: 64^2 .. 160^2 pixels
SMALL = QwenImageSpec(min_pixels=64 * 64, max_pixels=160 * 160)
# Qwen3-VL's released preprocessor_config.json (no resample / rescale keys: class defaults)
RELEASED = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast"}


def _noise(height, width, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


def _hf_module():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    return image_processing_pil_qwen2_vl


def _hf_processor(spec: QwenImageSpec):
    """transformers' processor built from the spec's values, as Qwen3-VL's file builds it."""
    return _hf_module().Qwen2VLImageProcessorPil(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size, image_mean=list(spec.image_mean),
        image_std=list(spec.image_std))


def _assert_matches_hf(image, spec, hf, expected_hw):
    pixels, grid = preprocess(image, spec)
    out = hf(images=image)
    assert pixels.shape == (*expected_hw, 3) and pixels.dtype == np.float32
    np.testing.assert_array_equal(out["image_grid_thw"], [grid])
    ours = hf_pixel_values(pixels, spec)
    assert ours.shape == out["pixel_values"].shape
    assert np.abs(ours - out["pixel_values"]).max() <= 1e-5
    back = images_from_pixel_values(out["pixel_values"], grid, spec)
    assert np.abs(back - pixels).max() <= 1e-5
    assert num_image_tokens(grid, spec) * spec.merge_size ** 2 == len(out["pixel_values"])


@pytest.mark.parametrize("hw, expected", [
    ((64, 64), (64, 64)),      # square, already a multiple of 32: no resize
    ((97, 203), (96, 192)),    # non-square, rounded to multiples
    ((70, 70), (64, 64)),      # rounding (70 / 32 = 2.19 -> 64)
    ((20, 30), (64, 96)),      # below min_pixels: scaled up, ceiled
    ((300, 400), (128, 160)),  # above max_pixels: scaled down, floored
])
def test_preprocess_matches_transformers(hw, expected):
    image = Image.fromarray(_noise(*hw, seed=hw[0]))
    _assert_matches_hf(image, SMALL, _hf_processor(SMALL), expected)


def test_preprocess_released_budget_and_other_inputs():
    """Qwen3-VL's own budget (97x203 scaled up to >= 65536 pixels); an array input; RGBA (on
    white) and greyscale PIL images."""
    spec = QwenImageSpec()
    _assert_matches_hf(Image.fromarray(_noise(97, 203)), spec, _hf_processor(spec), (192, 384))
    hf = _hf_processor(SMALL)
    _assert_matches_hf(_noise(45, 77, seed=1), SMALL, hf, (64, 96))
    _assert_matches_hf(Image.fromarray(_noise(50, 90, 4, seed=2), "RGBA"), SMALL, hf, (64, 96))
    _assert_matches_hf(Image.fromarray(_noise(66, 66, seed=3)[..., 0], "L"), SMALL, hf, (64, 64))


def test_smart_resize_equals_transformers():
    theirs = _hf_module().smart_resize
    budgets = [(56 * 56, 28 * 28 * 1280), (64 * 64, 160 * 160), (65536, 16777216)]
    sizes = [*range(1, 700, 13), 1080, 1920, 4000, 9999]
    for factor in (28, 32):
        for min_pixels, max_pixels in budgets:
            for height in sizes:
                for width in sizes:
                    args = (height, width, factor, min_pixels, max_pixels)
                    if max(height, width) / min(height, width) > 200:
                        with pytest.raises(ValueError, match="aspect ratio"):
                            smart_resize(*args)
                        continue
                    assert smart_resize(*args) == theirs(*args), args


def test_round_trip_is_exact():
    pixels = np.random.default_rng(0).standard_normal((96, 192, 3)).astype(np.float32)
    flat = hf_pixel_values(pixels, SMALL)
    assert flat.shape == (6 * 12, 3 * 2 * 16 * 16)
    np.testing.assert_array_equal(images_from_pixel_values(flat, (1, 6, 12), SMALL), pixels)


def test_pixel_values_layout():
    """P = 1, M = 2, T = 2 on a 4x4 one-channel image holding 0..15 row-major: rows go by 2x2
    blocks (block (0, 0) = pixels 0 1 4 5, then block (0, 1) = 2 3 6 7, ...), each row holds
    its pixel once per temporal frame."""
    spec = QwenImageSpec(patch_size=1, merge_size=2, temporal_patch_size=2, min_pixels=1,
                         max_pixels=16)
    flat = hf_pixel_values(np.arange(16.0).reshape(4, 4, 1), spec)
    blocks = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    np.testing.assert_array_equal(flat, np.repeat(np.array(blocks, float)[:, None], 2, axis=1))


def test_num_image_tokens():
    assert num_image_tokens((1, 20, 36)) == 180
    with pytest.raises(ValueError, match="multiples of merge_size 2"):
        num_image_tokens((1, 3, 4))


def test_config_round_trip_and_released_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps(RELEASED))
    assert QwenImageSpec.from_checkpoint(tmp_path) == QwenImageSpec()
    out = tmp_path / "out"
    out.mkdir()
    SMALL.write(out)
    assert QwenImageSpec.from_checkpoint(out) == SMALL
    # Qwen2-VL style top-level min_pixels / max_pixels override `size`, as in transformers
    legacy = {**RELEASED, "min_pixels": 3136, "max_pixels": 12845056}
    spec = QwenImageSpec.from_json(legacy)
    assert (spec.min_pixels, spec.max_pixels) == (3136, 12845056)


def test_written_config_loads_in_transformers(tmp_path):
    """AutoImageProcessor reads `write`'s file into the processor `preprocess` matches."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        pytest.skip("with torchvision the default backend resizes with torch, not PIL")
    SMALL.write(tmp_path)
    hf = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert hf.backend == "pil"
    _assert_matches_hf(Image.fromarray(_noise(97, 203, seed=4)), SMALL, hf, (96, 192))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("patch_size"), r"missing key 'patch_size' \(expected a positive int\)"),
    (lambda d: d.update(merge_size="2"), r"key 'merge_size': expected a positive int, found '2' "
                                         r"\(str\)"),
    (lambda d: d["size"].pop("shortest_edge"), r"size: missing key 'shortest_edge'"),
    (lambda d: d.update(image_std=[0.5, 0.5]), r"key 'image_std': expected a list of 3 numbers"),
    (lambda d: d.update(do_normalize=False), r"key 'do_normalize': expected true"),
    (lambda d: d.update(resample="bicubic"), r"key 'resample': expected a PIL resampling filter"),
])
def test_bad_config_names_file_and_key(tmp_path, edit, message):
    data = json.loads(json.dumps(RELEASED))
    edit(data)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(PreprocessorConfigError, match=message) as info:
        QwenImageSpec.from_checkpoint(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(info.value)


def test_bad_inputs():
    with pytest.raises(PreprocessorConfigError, match="found no such file"):
        QwenImageSpec.from_checkpoint("/nonexistent")
    with pytest.raises(PreprocessorConfigError, match="min_pixels <= max_pixels"):
        QwenImageSpec(min_pixels=100, max_pixels=10)
    for array in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                  np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB array, found "
                                             + re.escape(f"shape {array.shape}")):
            preprocess(array, SMALL)
    with pytest.raises(ValueError, match="multiples of 32"):
        hf_pixel_values(np.zeros((40, 64, 3), np.float32), SMALL)
    with pytest.raises(ValueError, match=r"expected shape \(72, C \* 512\)"):
        images_from_pixel_values(np.zeros((70, 1536), np.float32), (1, 6, 12), SMALL)
    with pytest.raises(ValueError, match="expected an image's grid"):
        images_from_pixel_values(np.zeros((144, 1536), np.float32), (2, 6, 12), SMALL)
