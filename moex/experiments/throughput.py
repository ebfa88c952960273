"""Dense vs hard-MoE vs soft-MoE VLMs: prefill / decode throughput and memory over a grid.

    moex compare                                  # small presets, batch (1, 4) x seq (128, 512)
    moex compare --family tiny --batch 1 2 --seq 64 --out results/tiny

Each grid point builds B prompts of exactly T tokens (one image's placeholders + byte text),
times the jitted prefill (to the first sampled token) and the jitted decode step, both after a
warm-up, over `repeats` runs, and reports medians with min/max. Memory: parameter bytes (routed
experts / rest), KV-cache bytes, and XLA's compiled peak of the prefill call. Results: CSV, JSON
(with hardware and versions) and a markdown table under --out.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np

from moex.config import get_config
from moex.generate import GREEDY, Generator
from moex.info import model_info
from moex.measure import (compiled_peak_bytes, device_peak_bytes, measure, param_bytes,
                          tree_bytes, write_outputs)
from moex.model import build, init_params
from moex.tokenizer import ByteTokenizer

TEXT = ("Question: which option best describes the image? A. a cat B. a dog C. a bird D. a car. "
        "Answer with the letter of the correct option. ")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    family: str = "small"                  # presets {family}-dense / -hard / -soft
    batch_sizes: tuple[int, ...] = (1, 4)
    seq_lens: tuple[int, ...] = (128, 512)
    decode_steps: int = 16                 # timed decode steps (at least `repeats`)
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    out: str = "results/compare"


def make_batch(cfg, batch: int, seq_len: int, rng: np.random.Generator):
    """B prompts of exactly seq_len tokens: BOS, one image's placeholders, then text bytes
    (taken modulo the vocabulary for word-level models)."""
    tok = ByteTokenizer()
    n_img = cfg.vision.num_image_tokens
    head = [cfg.image_token_id if t == tok.image_id else t     # converted models: their id
            for t in tok.encode("<image>\n", num_image_tokens=n_img)]
    if seq_len <= len(head):
        raise ValueError(f"seq_len {seq_len} must exceed the {len(head)} tokens of the image prompt")
    vocab = cfg.decoder.vocab_size       # word-level models: any valid id but the image's
    text = [t % vocab if t % vocab != cfg.image_token_id else (t + 1) % vocab
            for t in TEXT.encode()]
    body = text * (seq_len // len(TEXT) + 1)
    ids = np.asarray([head + body[:seq_len - len(head)]] * batch, np.int32)
    images = rng.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size,
                              cfg.vision.channels)).astype(np.float32)
    return ids, np.ones_like(ids), jnp.asarray(images)


def run_point(gen: Generator, params, cfg, batch: int, seq_len: int, grid: CompareConfig,
              peak: bool = True) -> dict:
    """One grid point's timings and memory; peak=False skips XLA's compiled peak (one more
    compile of the prefill: the GPU check has no time for it)."""
    rng = np.random.default_rng(grid.seed)
    ids, mask, images = make_batch(cfg, batch, seq_len, rng)
    steps = grid.warmup + max(grid.repeats, grid.decode_steps)   # decode steps run after one prefill
    max_len = seq_len + steps + 1
    prefill = lambda: gen.prefill(params, ids, mask, images, max_len=max_len)
    t_pre = measure(prefill, warmup=grid.warmup, repeats=grid.repeats)
    cache, tok, _ = prefill()
    stop = jnp.asarray([-1], jnp.int32)
    done = jnp.zeros((batch,), bool)
    state = {"cache": cache, "tok": tok, "i": 0}

    def decode_step():
        # the cache buffer is donated: keep the returned one (the cache has room for every step)
        state["i"] += 1
        state["cache"], state["tok"], _, lg = gen.step(params, state["cache"], state["tok"], done,
                                                       state["i"], stop)
        return lg

    t_dec = measure(decode_step, warmup=grid.warmup, repeats=steps - grid.warmup)
    pb = param_bytes(params)
    peak = compiled_peak_bytes(gen._prefill, params, jnp.asarray(ids), jnp.asarray(mask), images,
                               max_len=max_len, sampling=GREEDY) if peak else None
    return {
        "model": cfg.name, "batch": batch, "seq_len": seq_len,
        "prefill_tokens_per_s": batch * seq_len / t_pre.median,
        "prefill_s_median": t_pre.median, "prefill_s_min": t_pre.min, "prefill_s_max": t_pre.max,
        "decode_tokens_per_s": batch / t_dec.median,
        "decode_step_s_median": t_dec.median, "decode_step_s_min": t_dec.min,
        "decode_step_s_max": t_dec.max,
        "param_bytes_experts": pb["experts"], "param_bytes_rest": pb["rest"],
        "kv_cache_bytes": tree_bytes(cache["layers"]),
        "prefill_peak_bytes": peak if peak is not None else -1,
        "device_peak_bytes": device_peak_bytes() or -1,     # allocator peak (GPU/TPU); -1 on CPU
    }


def run(grid: CompareConfig, progress: bool = True) -> list[dict]:
    from tqdm import tqdm
    presets = [f"{grid.family}-{kind}" for kind in ("dense", "hard", "soft")]
    points = [(p, b, s) for p in presets for b in grid.batch_sizes for s in grid.seq_lens]
    rows, bar = [], tqdm(total=len(points), disable=not progress, desc="compare")
    for name in presets:
        cfg = get_config(name)
        gen, params = Generator(build(cfg)), init_params(cfg, grid.seed)
        for b in grid.batch_sizes:
            for s in grid.seq_lens:
                bar.set_postfix_str(f"{name} B={b} T={s}")
                row = run_point(gen, params, cfg, b, s, grid)
                row["active_params_per_token"] = model_info(cfg).active_params_per_token
                rows.append(row)
                bar.update()
    bar.close()
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | B | T | prefill tok/s | decode tok/s | experts MB | rest MB | KV MB "
            "| prefill peak MB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        mb = lambda x: f"{x / 1e6:.1f}" if x >= 0 else "n/a"
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} "
                     f"| {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} "
                     f"| {mb(r['param_bytes_experts'])} | {mb(r['param_bytes_rest'])} "
                     f"| {mb(r['kv_cache_bytes'])} | {mb(r['prefill_peak_bytes'])} |")
    return "\n".join(lines)


def write_results(rows: list[dict], grid: CompareConfig) -> pathlib.Path:
    return write_outputs(grid.out, rows, dataclasses.asdict(grid),
                         f"# Dense vs hard-MoE vs soft-MoE ({grid.family} presets)\n\n"
                         f"Medians of {grid.repeats}+ runs after {grid.warmup} warm-up; decode = one "
                         f"step over the KV cache.\n\n{markdown_table(rows)}")


def compare(grid: CompareConfig) -> pathlib.Path:
    """Run the grid, write the results under grid.out, print the table."""
    rows = run(grid)
    out = write_results(rows, grid)
    print(markdown_table(rows))
    print(f"\nwrote {out}/results.csv, results.json, report.md")
    return out
