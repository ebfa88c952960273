"""Benchmark data: readers and writers for the official formats, prompts, images, batching.

  records     Question (one multiple-choice question + image), DataError, LETTERS
  mmbench     read_mmbench / write_mmbench: MMBench's TSV (base64 images in the `image` column)
  seedbench   read_seedbench / write_seedbench: SEED-Bench v1 JSON + image folder
  prompts     build_prompt (STYLES), answer_text, rotate (CircularEval)
  images      preprocess: PIL image -> normalised (size, size, 3) float32 ("crop" | "pad")
  qwen_images Qwen3-VL dynamic resolution: QwenImageSpec, smart_resize, preprocess -> (pixels,
              grid), hf_pixel_values / images_from_pixel_values (the HF processor's layout)
  batching    encode_batch -> Batch (ids, mask, images), batches, HFTextTokenizer
  synthetic   PIL shape scenes written in both formats, for offline runs and tests
"""

from moex.data.batching import Batch, HFTextTokenizer, batches, encode_batch  # noqa: F401
from moex.data.images import MODES, preprocess  # noqa: F401
from moex.data.mmbench import read_mmbench, write_mmbench  # noqa: F401
from moex.data.prompts import (STYLES, answer_text, build_prompt, continuation,  # noqa: F401
                               likelihood_prompt, rotate)
from moex.data.records import LETTERS, DataError, Question  # noqa: F401
from moex.data.seedbench import read_seedbench, write_seedbench  # noqa: F401
from moex.data.synthetic import (CATEGORIES, SyntheticSpec, generate_questions,  # noqa: F401
                                 write_synthetic)
