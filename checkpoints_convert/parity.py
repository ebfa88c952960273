"""`moex compare-hf SRC`: the converted model against `transformers` on the same inputs.

For each prompt (tokenised with SRC's tokenizer.json, or seeded random ids when SRC has none) and,
for LLaVA, one seeded synthetic image, both models run one forward over the left-padded batch.
Reported per position (counted from each row's first real token) and overall: max and mean
absolute logit difference, and KL(p_transformers || p_moex) of the next-token distributions.

Encoder-decoders (Switch Transformers): the prompts are the encoder's right-padded inputs; the
decoder is teacher-forced with DECODER_TOKENS seeded ids after the decoder start token, and the
rows are reported per decoder position. Both models then generate GREEDY_TOKENS greedy tokens
(no stop token), reported side by side.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert.convert import convert_params, open_source
from moex.config import EncDecConfig
from moex.model import build, forward
from moex.tokenizer import left_pad

DECODER_TOKENS = 8      # teacher-forced decoder length (the start token and 7 seeded ids)
GREEDY_TOKENS = 8
DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                   "Mixture-of-experts models route each token to"]


def _token_ids(src: pathlib.Path, prompts: list[str], vocab: int, seed: int) -> list[list[int]]:
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        return [tok.encode(p).ids for p in prompts]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, 6 + 3 * i).tolist() for i in range(len(prompts))]


def _qwen_image(src: pathlib.Path, cfg, seqs, seed: int):
    """One seeded 2:3 image through Qwen3-VL's preprocessing (the folder's
    preprocessor_config.json, else Qwen3-VL's defaults at the tower's native size), spliced after
    each prompt's first token between <|vision_start|> and <|vision_end|>. Returns (token rows,
    moex images (B, H', W', 3), transformers' pixel_values and image_grid_thw)."""
    import torch
    from PIL import Image
    from moex.data.qwen_images import CONFIG_FILE, hf_pixel_values, preprocess, spec_for
    v = cfg.vision
    spec = spec_for(v, src)
    if not (src / CONFIG_FILE).is_file():     # Qwen3-VL's budget would be huge for a tiny tower
        side = v.patch_size * v.spatial_merge
        spec = dataclasses.replace(spec, min_pixels=side * side,
                                   max_pixels=max(side * side, v.image_size ** 2))
    rng = np.random.default_rng(seed)
    h = v.image_size
    pixels, grid = preprocess(Image.fromarray(rng.integers(0, 256, (h, h * 3 // 2, 3), np.uint8)),
                              spec)
    hf_cfg = json.loads((src / "config.json").read_text())
    start, end = hf_cfg.get("vision_start_token_id"), hf_cfg.get("vision_end_token_id")
    n = v.tokens_for(*pixels.shape[:2])
    image = [start] * (start is not None) + [cfg.image_token_id] * n + [end] * (end is not None)
    seqs = [s[:1] + image + s[1:] for s in seqs]
    b = len(seqs)
    extra = {"pixel_values": torch.from_numpy(np.concatenate([hf_pixel_values(pixels, spec)] * b)),
             "image_grid_thw": torch.tensor([list(grid)] * b)}
    return seqs, jnp.asarray(np.stack([pixels] * b)), extra


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _differences(ref, ours, valid, positions) -> dict:
    """max / mean |logit difference| and KL(p_ref || p_ours) over the valid positions, overall
    and per position."""
    diff = np.abs(ours - ref)
    lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(ours.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    rows = []
    for p in range(int(positions[valid].max()) + 1):
        sel = valid & (positions == p)
        if sel.any():
            rows.append({"position": p, "max_abs": float(diff[sel].max()),
                         "mean_abs": float(diff[sel].mean()), "kl": float(kl[sel].max())})
    return {"max_abs": float(diff[valid].max()), "mean_abs": float(diff[valid].mean()),
            "max_kl": float(kl[valid].max()),
            "greedy_agreement": float((ours.argmax(-1) == ref.argmax(-1))[valid].mean()),
            "per_position": rows}


def _compare_encdec(src: pathlib.Path, reader, arch, cfg: EncDecConfig, prompts: list[str],
                    seed: int) -> dict:
    """An encoder-decoder: teacher-forced logits, then greedy tokens of both (module docstring)."""
    import torch
    import transformers
    from moex.seq2seq import Seq2SeqGenerator

    params = convert_params(reader, arch, cfg, "float32")
    vocab = cfg.vocab_size
    ids, mask = left_pad(_token_ids(src, prompts, min(vocab, 1000), seed), cfg.pad_token_id,
                         right=True)
    rng = np.random.default_rng(seed + 1)
    dec = np.concatenate([np.full((len(ids), 1), cfg.decoder_start_token_id),
                          rng.integers(0, min(vocab, 1000), (len(ids), DECODER_TOKENS - 1))],
                         axis=1).astype(np.int32)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(src), dtype=torch.float32).eval()
    t = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
         "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    hf.generation_config.eos_token_id = None         # both run GREEDY_TOKENS steps
    with torch.no_grad():
        ref = hf(**t, decoder_input_ids=torch.from_numpy(dec.astype(np.int64))).logits.numpy()
        want = hf.generate(**t, max_new_tokens=GREEDY_TOKENS, do_sample=False)[:, 1:].numpy()
    ours = np.asarray(jax.jit(build(cfg).apply)({"params": params}, ids, mask, dec)[0])
    got = np.asarray(Seq2SeqGenerator(cfg, params).generate(ids, mask, GREEDY_TOKENS,
                                                            stop_at_eos=False))
    positions = np.broadcast_to(np.arange(dec.shape[1]), dec.shape)
    return {"source": str(src), "architecture": arch.name, "prompts": len(ids),
            **_differences(ref, ours, np.ones(dec.shape, bool), positions),
            "greedy": {"transformers": want.tolist(), "moex": got.tolist()},
            "greedy_equal": bool(want.shape == got.shape and (want == got).all())}


def compare_hf(src, prompts: list[str] | None = None, seed: int = 0) -> dict:
    import torch                            # optional dependencies (moex[convert])
    import transformers

    src = pathlib.Path(src)
    reader, arch, cfg = open_source(src)
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    prompts = prompts or DEFAULT_PROMPTS
    if isinstance(cfg, EncDecConfig):
        return _compare_encdec(src, reader, arch, cfg, prompts, seed)
    params = convert_params(reader, arch, cfg, "float32")
    seqs = _token_ids(src, prompts, min(cfg.decoder.vocab_size, 1000), seed)
    images, extra = None, {}
    if cfg.vision is not None and cfg.vision.dynamic:          # Qwen3-VL
        seqs, images, extra = _qwen_image(src, cfg, seqs, seed)
        model_cls = transformers.AutoModelForImageTextToText
    elif cfg.vision is not None:
        v = cfg.vision
        seqs = [s[:1] + [cfg.image_token_id] * v.num_image_tokens + s[1:] for s in seqs]
        pix = np.random.default_rng(seed).normal(
            size=(len(seqs), v.channels, v.image_size, v.image_size)).astype(np.float32)
        images, extra["pixel_values"] = jnp.asarray(pix.transpose(0, 2, 3, 1)), torch.from_numpy(pix)
        model_cls = transformers.LlavaForConditionalGeneration
    else:
        model_cls = transformers.AutoModelForCausalLM
    pad = cfg.pad_token_id if 0 <= cfg.pad_token_id < cfg.decoder.vocab_size else 0
    ids, mask = left_pad(seqs, pad)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    if "image_grid_thw" in extra:       # transformers places Qwen's MRoPE positions itself
        extra["mm_token_type_ids"] = torch.from_numpy((ids == cfg.image_token_id).astype(np.int64))
    else:
        extra["position_ids"] = torch.from_numpy(positions.astype(np.int64))
    kw = {"experts_implementation": "eager"} if cfg.decoder.moe.kind == "hard" else {}
    hf = model_cls.from_pretrained(str(src), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)), **extra).logits.numpy()
    ours = np.asarray(forward(build(cfg), params, ids, mask, images)[0])
    return {"source": str(src), "architecture": arch.name, "prompts": len(seqs),
            **_differences(ref, ours, mask.astype(bool), positions)}


def format_report(r: dict) -> str:
    lines = [f"{r['source']} ({r['architecture']}), {r['prompts']} prompts",
             "| position | max abs diff | mean abs diff | max KL(hf||moex) |", "|---|---|---|---|"]
    lines += [f"| {x['position']} | {x['max_abs']:.3e} | {x['mean_abs']:.3e} | {x['kl']:.3e} |"
              for x in r["per_position"]]
    lines.append(f"overall: max abs {r['max_abs']:.3e}, mean abs {r['mean_abs']:.3e}, "
                 f"max KL {r['max_kl']:.3e}, argmax agreement {100 * r['greedy_agreement']:.1f}%")
    if "greedy" in r:           # encoder-decoders: positions are decoder positions
        lines.append(f"greedy tokens ({'equal' if r['greedy_equal'] else 'DIFFERENT'}):")
        for b, (want, got) in enumerate(zip(r["greedy"]["transformers"], r["greedy"]["moex"])):
            lines += [f"  row {b} transformers {want}", f"  row {b} moex         {got}"]
    return "\n".join(lines)


def main(args) -> int:
    prompts = None
    if args.prompts:
        path = pathlib.Path(args.prompts)
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no prompts (expected one prompt per line)")
    report = compare_hf(args.src, prompts, args.seed)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
