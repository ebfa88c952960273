"""Which tokenizer reads a model's text, decided in one place.

    tok = tokenizer_for(cfg, checkpoint_dir)     # encode / decode, pad_id, eos_id, image_id

In order: an explicit tokenizer.json (`path`), the checkpoint's own tokenizer.json (converted HF
checkpoints; trained moex checkpoints save theirs), else what the config names
(`VLMConfig.tokenizer`): "byte" (`ByteTokenizer`) or "synthetic-words", the word-level tokenizer
of the synthetic benchmark (`synthetic_tokenizer`: its ~60 words, so a question is ~30 tokens
instead of ~190 bytes). Every tokenizer.json is read by `HFTextTokenizer`, the one code path for
converted and trained checkpoints alike.
"""

from __future__ import annotations

import functools
import pathlib

from moex.tokenizer import (BOS_ID, ByteTokenizer, HFTextTokenizer, word_tokenizer,
                            word_tokenizer_of)
from moex.data.synthetic import corpus

TOKENIZER_FILE = "tokenizer.json"
VISION_WRAP = ("<|vision_start|>", "<|vision_end|>")   # Qwen2/3-VL's markers around an image


@functools.lru_cache(maxsize=1)
def synthetic_tokenizer():
    """The word-level `tokenizers.Tokenizer` of the synthetic benchmark's corpus (deterministic:
    the same ids on every machine)."""
    return word_tokenizer(corpus())


def write_tokenizer(tokenizer, folder) -> pathlib.Path:
    """Save a `tokenizers.Tokenizer` (or the one inside an HFTextTokenizer) as folder/tokenizer.json."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    path = pathlib.Path(folder) / TOKENIZER_FILE
    inner.save(str(path))
    return path


def tokenizer_for(cfg, checkpoint_dir=None, path=None):
    """The tokenizer of model `cfg`: `path`, else checkpoint_dir/tokenizer.json, else the one
    `cfg.tokenizer` names. A tokenizer.json gets the config's image / pad / eos ids, BOS "<s>"
    where its vocabulary has one (Llama, Mistral, the word tokenizers), and for a VLM whose
    vocabulary has <|vision_start|> and <|vision_end|> (Qwen3-VL) those around every image, as
    its processor writes them."""
    if path is None and checkpoint_dir is not None:
        found = pathlib.Path(checkpoint_dir) / TOKENIZER_FILE
        path = found if found.is_file() else None
    if path is not None:
        tok = HFTextTokenizer(path, cfg.image_token_id, pad_id=cfg.pad_token_id,
                              eos_id=cfg.eos_token_id)
        tok.bos_id = tok.tokenizer.token_to_id("<s>")
        wrap = tuple(tok.tokenizer.token_to_id(t) for t in VISION_WRAP)
        if cfg.vision is not None and None not in wrap:
            tok.image_wrap = wrap
    elif cfg.tokenizer == "synthetic-words":
        tok = word_tokenizer_of(synthetic_tokenizer())
        assert tok.bos_id == BOS_ID
    else:
        tok = ByteTokenizer()
    check_fits(cfg, tok)
    return tok


def check_fits(cfg, tok) -> None:
    """A tokenizer whose ids do not fit the model's vocabulary, or whose special ids differ from
    the config's, is refused by name."""
    if tok.num_tokens > cfg.vocab_size:
        raise ValueError(f"{cfg.name}: its vocabulary holds {cfg.vocab_size} ids but the "
                         f"tokenizer ({type(tok).__name__}, {cfg.tokenizer!r}) has "
                         f"{tok.num_tokens}; pass a tokenizer.json that fits (--tokenizer)")
    if cfg.vision is not None and tok.image_id != cfg.image_token_id:
        raise ValueError(f"{cfg.name}: image placeholder id {cfg.image_token_id} in the config, "
                         f"{tok.image_id} in the tokenizer")
