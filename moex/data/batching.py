"""Questions -> model inputs: token ids (left-padded), attention mask and preprocessed images.

Shapes: B questions per batch, T tokens (longest prompt or `length`), H = W = vision image size.

    tok, vision = ByteTokenizer(), get_config("tiny-dense").vision
    for group in batches(questions, 8):
        # batch.ids, batch.mask: (B, T) int32; batch.images: (B, H, W, 3) float32
        batch = encode_batch(group, tok, vision, style="compact")
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np

from moex.data.images import preprocess
from moex.data.prompts import build_prompt
from moex.data.records import Question
from moex.tokenizer import HFTextTokenizer, left_pad  # noqa: F401  (HFTextTokenizer: re-exported)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of questions, encoded. Rows follow `questions`."""

    ids: np.ndarray       # (B, T) int32, left-padded with the tokenizer's pad_id
    mask: np.ndarray      # (B, T) int32, 1 on real tokens
    images: np.ndarray    # (B, H, W, 3) float32, normalised
    questions: tuple      # (B,) Question


def encode_batch(questions: Sequence[Question], tokenizer, vision_cfg, style: str = "mmbench",
                 length: int | None = None, mode: str = "crop",
                 suffix: Sequence[str] | None = None, template: str = "{prompt}",
                 bucket: int = 1) -> Batch:
    """Prompt, tokenize and left-pad `questions`; load and preprocess their images.

    `suffix[i]` (e.g. the answer letter for training) is appended to prompt i. Each `<image>` in a
    prompt becomes `vision_cfg.num_image_tokens` image placeholder ids. `template` wraps the
    prompt (a chat template, e.g. LLaVA-1.5's "USER: {prompt} ASSISTANT:"). Without `length`, T is
    the longest row rounded up to a multiple of `bucket` (fewer distinct shapes to compile).
    """
    questions = tuple(questions)
    if not questions:
        raise ValueError("encode_batch needs at least one question")
    if suffix is not None and len(suffix) != len(questions):
        raise ValueError(f"suffix has {len(suffix)} texts for {len(questions)} questions; "
                         "pass one per question")
    texts = [template.format(prompt=build_prompt(q, style))
             + (suffix[i] if suffix is not None else "") for i, q in enumerate(questions)]
    seqs = [tokenizer.encode(t, num_image_tokens=vision_cfg.num_image_tokens) for t in texts]
    if length is None:
        length = -(-max(map(len, seqs)) // bucket) * bucket
    ids, mask = left_pad(seqs, tokenizer.pad_id, length)
    images = np.stack([preprocess(q.load_image(), vision_cfg.image_size, vision_cfg.image_mean,
                                  vision_cfg.image_std, mode) for q in questions])
    return Batch(ids=ids, mask=mask, images=images.astype(np.float32), questions=questions)


def batches(questions: Iterable[Question], batch_size: int) -> Iterator[list[Question]]:
    """Consecutive lists of `batch_size` questions; the last may be shorter."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    group = []
    for q in questions:
        group.append(q)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group
