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
from moex.tokenizer import IMAGE_TAG, left_pad


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


class HFTextTokenizer:
    """A HuggingFace `tokenizer.json` behind ByteTokenizer's `encode` contract (converted models).

    `encode` splits the text on "<image>", encodes each part without special tokens, puts
    `num_image_tokens` x `image_token_id` between parts and prepends `bos_id` (if any).
    """

    def __init__(self, path, image_token_id: int, bos_id: int | None = None, pad_id: int = 0,
                 eos_id: int | None = None):
        from tokenizers import Tokenizer   # imported here: only converted models need it
        self.tokenizer = Tokenizer.from_file(str(path))
        self.image_id = image_token_id
        self.bos_id, self.pad_id, self.eos_id = bos_id, pad_id, eos_id

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = True, num_image_tokens: int = 0) -> list[int]:
        parts = text.split(IMAGE_TAG)
        if len(parts) > 1 and num_image_tokens < 1:
            raise ValueError(f"text contains {IMAGE_TAG} but num_image_tokens={num_image_tokens}; "
                             "pass the vision tower's number of image tokens")
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for i, part in enumerate(parts):
            if i:
                ids.extend([self.image_id] * num_image_tokens)
            if part:
                ids.extend(self.tokenizer.encode(part, add_special_tokens=False).ids)
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`, stopping at eos; image placeholders become "<image>"."""
        out, run = [], []
        for t in map(int, ids):
            if t == self.eos_id:
                break
            if t == self.image_id:
                out.append(self.tokenizer.decode(run) + IMAGE_TAG)
                run = []
            else:
                run.append(t)
        return "".join(out) + self.tokenizer.decode(run)
