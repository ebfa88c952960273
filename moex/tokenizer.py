"""Tokenizers behind one `encode` / `decode` contract, and the word-level tokenizer builder.

  ByteTokenizer     256 byte ids plus specials; no files (the tiny / small presets, the stdlib
                    language-model study)
  HFTextTokenizer   a `tokenizers.Tokenizer` (a converted checkpoint's tokenizer.json, or a
                    trained checkpoint's task tokenizer)
  word_tokenizer    a word-level `tokenizers.Tokenizer` built from a task's corpus: every word
                    and punctuation run of the corpus gets an id, anything else is <unk>

Every `<image>` in a text becomes `num_image_tokens` placeholder ids, LLaVA-style, so the VLM
splices image features at exactly those positions.
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


class HFTextTokenizer:
    """A `tokenizers.Tokenizer` (or the path of its tokenizer.json) behind ByteTokenizer's
    `encode` contract.

    `encode` splits the text on "<image>", encodes each part without special tokens, puts
    `num_image_tokens` x `image_token_id` between parts and prepends `bos_id` (if any).
    `image_wrap` = (start id, end id) encloses each run of placeholders (Qwen2/3-VL's
    <|vision_start|> ... <|vision_end|>); None: bare placeholders (LLaVA).
    """

    def __init__(self, tokenizer, image_token_id: int, bos_id: int | None = None,
                 pad_id: int = 0, eos_id: int | None = None,
                 image_wrap: tuple[int, int] | None = None):
        from tokenizers import Tokenizer   # imported here: byte-level users never need it
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else \
            Tokenizer.from_file(str(tokenizer))
        self.image_id = image_token_id
        self.bos_id, self.pad_id, self.eos_id = bos_id, pad_id, eos_id
        self.image_wrap = image_wrap

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = True, num_image_tokens: int = 0) -> list[int]:
        parts = text.split(IMAGE_TAG)
        if len(parts) > 1 and num_image_tokens < 1:
            raise ValueError(f"text contains {IMAGE_TAG} but num_image_tokens={num_image_tokens}; "
                             "pass the vision tower's number of image tokens")
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        image = [self.image_id] * num_image_tokens
        if self.image_wrap:
            image = [self.image_wrap[0], *image, self.image_wrap[1]]
        for i, part in enumerate(parts):
            if i:
                ids.extend(image)
            if part:
                ids.extend(self.tokenizer.encode(part, add_special_tokens=False).ids)
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`, stopping at eos; image placeholders become "<image>" (the wrap
        markers, special tokens, are skipped as the tokenizer skips them)."""
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


# -- word-level tokenizers for tasks with a closed vocabulary -------------------------------------

WORD_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TAG)   # ids 0..4, in this order
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(WORD_SPECIALS))


def word_tokenizer(texts):
    """A word-level `tokenizers.Tokenizer` over `texts` (an iterable of strings).

    Pre-tokenization splits on whitespace and between word characters and punctuation
    ("Answer:" -> "Answer", ":"; "option's" -> "option", "'", "s"). Ids: WORD_SPECIALS first
    (0..4), then the corpus words by decreasing count (ties alphabetical), so the same corpus
    always gives the same ids. A word outside the corpus encodes to <unk> (UNK_ID); decoding
    joins words with single spaces.
    """
    import collections
    import re
    from tokenizers import Tokenizer, models, pre_tokenizers
    counts = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t))
    for s in WORD_SPECIALS:
        counts.pop(s, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate(list(WORD_SPECIALS) + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # <unk> stays a plain word, so decoding shows it; the others are skipped when decoding
    tok.add_special_tokens([s for s in WORD_SPECIALS if s != "<unk>"])
    return tok


def word_tokenizer_of(tokenizer) -> HFTextTokenizer:
    """A word tokenizer (from `word_tokenizer`) behind the encode contract, with its special ids."""
    return HFTextTokenizer(tokenizer, IMAGE_ID, bos_id=BOS_ID, pad_id=PAD_ID, eos_id=EOS_ID)


def left_pad(seqs: list[list[int]], pad_id: int, length: int | None = None, right: bool = False):
    """(ids, mask) (B, length) int32: each sequence at the end of its row (decoder prompts), or
    with right=True at the start (encoder inputs, as T5 tokenizers pad)."""
    longest = max(len(s) for s in seqs)
    length = length or longest
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, longer than length={length}")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for b, s in enumerate(seqs):
        if s:
            where = slice(0, len(s)) if right else slice(length - len(s), length)
            ids[b, where] = s
            mask[b, where] = 1
    return ids, mask
