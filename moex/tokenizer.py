"""Byte-level tokenizer for the tiny and small presets: 256 byte ids plus special tokens.

No files, no download: id b (0..255) is the byte b; specials follow. The image placeholder stands
for one image token; `expand_images` repeats it to the number of image tokens the vision tower
makes, LLaVA-style, so the VLM splices image features at exactly those positions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_TAG = "<image>"


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    image_id: int = 259

    @property
    def num_tokens(self) -> int:
        return 260

    def encode(self, text: str, *, bos: bool = True, num_image_tokens: int = 0) -> list[int]:
        """Encode text; each `<image>` becomes `num_image_tokens` placeholder ids."""
        ids = [self.bos_id] if bos else []
        parts = text.split(IMAGE_TAG)
        if len(parts) > 1 and num_image_tokens < 1:
            raise ValueError(f"text contains {IMAGE_TAG} but num_image_tokens={num_image_tokens}; "
                             "pass the vision tower's number of image tokens")
        for i, part in enumerate(parts):
            if i:
                ids.extend([self.image_id] * num_image_tokens)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        out = bytearray()
        for t in ids:
            t = int(t)
            if t < 256:
                out.append(t)
            elif t == self.image_id:
                out.extend(IMAGE_TAG.encode())
            elif t == self.eos_id:
                break
        return out.decode("utf-8", errors="replace")

    def batch(self, texts: list[str], *, num_image_tokens: int = 0, length: int | None = None):
        """Left-padded (ids, mask), both (B, T) int32, T = longest prompt or `length`."""
        seqs = [self.encode(t, num_image_tokens=num_image_tokens) for t in texts]
        return left_pad(seqs, self.pad_id, length)


def left_pad(seqs: list[list[int]], pad_id: int, length: int | None = None):
    longest = max(len(s) for s in seqs)
    length = length or longest
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, longer than length={length}")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for b, s in enumerate(seqs):
        if s:
            ids[b, length - len(s):] = s
            mask[b, length - len(s):] = 1
    return ids, mask
