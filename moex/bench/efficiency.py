"""The research question end to end: dense vs hard-MoE vs soft-MoE VLMs across batch sizes and
sequence lengths -- throughput, memory, accuracy, and expert offloading.

    python experiments/vlm_efficiency.py                 # small presets, synthetic data, CPU grid
    python experiments/vlm_efficiency.py --grid full     # batch 1..32 x seq 256..2048

Pipeline (each step cached, so a rerun only measures):
  1. data: the synthetic MMBench / SEED-Bench splits (`moex.data.synthetic`), or the given files;
  2. models: the family's presets trained on the synthetic training split (`moex.train_vlm`,
     orbax checkpoints under runs/vlm), or the given moex checkpoints (e.g. converted LLaVA);
  3. accuracy of each model on the benchmark split: MMBench CircularEval and plain accuracy,
     SEED-Bench likelihood ranking and generated letter (`moex.eval`), per category;
  4. throughput and memory over batch x sequence length (the jitted model: prefill tokens/s,
     decode tokens/s, multiple-choice questions/s = B / prefill time (the answer is read from the
     prefill's last logits), parameter bytes (experts / rest), KV-cache bytes, XLA's compiled
     prefill peak or the allocator's peak where the backend reports one); warm-up, >= 5 repeats,
     medians with min / max;
  5. expert offloading for models with hard-MoE decoders: the live engine
     (`moex.offload.engine`) under each policy and budget, at the offload grid points.

Output under --out: results.csv / results.json (one row per (model, batch, seq_len, policy,
budget); `policy` "resident-jit" = the whole jitted model, every expert resident), accuracy.json, report.md with the
tables, and PNG plots: throughput vs batch size per sequence length, memory vs batch size,
throughput vs device-memory budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

import jax
import numpy as np

JIT = "resident-jit"    # policy label of the whole jitted model (no offload engine)

GRIDS = {   # (batch sizes, sequence lengths incl. image tokens, max B x T per point)
    "cpu": ((1, 4, 16), (256, 1024, 2048), 16384),
    "full": ((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), 1 << 30),
    "tiny": ((1, 2), (64,), 1 << 30),
}


@dataclasses.dataclass(frozen=True)
class EfficiencyConfig:
    family: str = "small"                       # presets {family}-dense / -hard / -soft
    checkpoints: tuple[str, ...] = ()           # moex checkpoints instead of the family's presets
    train: bool = True                          # train the family's presets (cached) first
    train_steps: int = 400
    grid: str = "auto"                          # GRIDS key; auto: cpu on CPU, else full
    batch_sizes: tuple[int, ...] = ()           # override the grid's
    seq_lens: tuple[int, ...] = ()
    max_tokens: int = 0                         # override the grid's cap on B x T (0: grid's)
    decode_steps: int = 8
    warmup: int = 1
    repeats: int = 5
    policies: tuple[str, ...] = ("lru", "pregated")
    budgets: tuple[str, ...] = ("50%", "25%")
    offload_batches: tuple[int, ...] = (1, 4)
    offload_seq: int = 256
    offload_repeats: int = 3
    mmbench: str | None = None                  # MMBench TSV (default: synthetic dev split)
    seed_json: str | None = None                # SEED-Bench JSON + image folder (default: synthetic)
    seed_images: str | None = None
    tokenizer: str | None = None                # tokenizer.json for converted checkpoints
    template: str = "{prompt}"                  # chat template, e.g. "USER: {prompt} ASSISTANT:"
    style: str = "compact"                      # prompt style (moex.data.prompts.STYLES)
    image_mode: str = "crop"                    # "crop" (CLIP) or "pad" (LLaVA-1.5)
    eval_questions: int = 100                   # per benchmark (0: all)
    eval_batch: int = 16
    data: str = "runs/data/synthetic"
    runs: str = "runs/vlm"
    seed: int = 0
    out: str = "results/vlm_efficiency"

    def grid_points(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        name = self.grid if self.grid != "auto" else ("cpu" if jax.default_backend() == "cpu"
                                                      else "full")
        if name not in GRIDS:
            raise ValueError(f"unknown grid {name!r}; expected one of {sorted(GRIDS)} or auto")
        b, s, cap = GRIDS[name]
        return self.batch_sizes or b, self.seq_lens or s, self.max_tokens or cap


# -- models and data ------------------------------------------------------------------------------

def models(ec: EfficiencyConfig, progress: bool = True):
    """[(name, cfg, params, tokenizer)]: the given checkpoints (with the checkpoint's
    tokenizer.json, or --tokenizer), or the family's presets (trained, cached; byte tokenizer)."""
    from moex import checkpoint
    from moex.config import get_config
    from moex.model import init_params
    if ec.checkpoints:
        out = []
        for path in ec.checkpoints:
            cfg, params, _ = checkpoint.load(path)
            out.append((cfg.name, cfg, params, tokenizer_for(ec, cfg, pathlib.Path(path))))
        return out
    out = []
    for kind in ("dense", "hard", "soft"):
        name = f"{ec.family}-{kind}"
        if ec.train:
            from moex.train_vlm import VLMTrainConfig, trained_model
            cfg, params = trained_model(VLMTrainConfig(preset=name, data=ec.data,
                                                       steps=ec.train_steps, out=ec.runs,
                                                       seed=ec.seed), progress)
        else:
            cfg = get_config(name)
            params = init_params(cfg, ec.seed)
        out.append((name, cfg, params, tokenizer_for(ec, cfg)))
    return out


def benchmark_questions(ec: EfficiencyConfig):
    """(MMBench questions, SEED questions, description): the given files or the synthetic dev
    splits, the first `eval_questions` of each."""
    from moex.data import SyntheticSpec, read_mmbench, read_seedbench, write_synthetic
    paths = None
    if ec.mmbench is None or ec.seed_json is None:
        paths = write_synthetic(ec.data, SyntheticSpec(seed=ec.seed))
    mm_file = ec.mmbench or paths["mmbench/dev"]
    seed_file = ec.seed_json or paths["seed/dev"]
    seed_images = ec.seed_images or (paths["seed/images"] if paths else None)
    if seed_images is None:
        raise ValueError("--seed-json needs --seed-images (the SEED-Bench image folder)")
    mm, seed = read_mmbench(mm_file), read_seedbench(seed_file, seed_images)
    n = ec.eval_questions or None
    return mm[:n], seed[:n], {"mmbench": str(mm_file), "seed": str(seed_file)}


def tokenizer_for(ec: EfficiencyConfig, cfg, checkpoint_dir: pathlib.Path | None = None):
    """--tokenizer, else the checkpoint's tokenizer.json, else the byte tokenizer (tiny / small
    presets). HF tokenizers get BOS = "<s>" where the vocabulary has it (Llama / Mistral)."""
    from moex.tokenizer import ByteTokenizer
    path = ec.tokenizer or (checkpoint_dir / "tokenizer.json" if checkpoint_dir is not None
                            and (checkpoint_dir / "tokenizer.json").is_file() else None)
    if path is None:
        if cfg.decoder.vocab_size < ByteTokenizer().num_tokens:
            raise ValueError(f"{cfg.name}: vocabulary {cfg.decoder.vocab_size} is smaller than the "
                             "byte tokenizer's and no tokenizer.json was found; pass --tokenizer")
        return ByteTokenizer()
    from moex.data import HFTextTokenizer
    tok = HFTextTokenizer(path, cfg.image_token_id, pad_id=cfg.pad_token_id,
                          eos_id=cfg.eos_token_id)
    tok.bos_id = tok.tokenizer.token_to_id("<s>")
    return tok


def accuracy(ec: EfficiencyConfig, name, cfg, params, tokenizer, mm, seed) -> dict:
    from moex.eval import ScoreConfig, Scorer, chance, evaluate_mmbench, evaluate_seed
    scorer = Scorer(cfg, params, tokenizer,
                    ScoreConfig(style=ec.style, template=ec.template, batch_size=ec.eval_batch,
                                mode=ec.image_mode, max_new_tokens=12))
    got = evaluate_mmbench(scorer, mm)
    s = evaluate_seed(scorer, seed)
    tables = {**got["tables"], **s["tables"]}
    return {"model": name, "tables": tables,
            "questions_per_s": {**got["questions_per_s"], **s["questions_per_s"]},
            "chance": {"mmbench_circular": chance(mm, circular=True),
                       "mmbench_plain": chance(mm), "seed": chance(seed)}}


# -- throughput and memory -----------------------------------------------------------------------

def resident_row(gen, params, cfg, batch: int, seq_len: int, ec: EfficiencyConfig) -> dict:
    from moex.bench.compare import CompareConfig, run_point
    cc = CompareConfig(decode_steps=ec.decode_steps, warmup=ec.warmup, repeats=ec.repeats,
                       seed=ec.seed)
    r = run_point(gen, params, cfg, batch, seq_len, cc)
    device_peak = r.pop("device_peak_bytes")
    peak = device_peak if device_peak > 0 else r["prefill_peak_bytes"]
    return {**_keys(cfg, batch, seq_len, JIT, "100%"),
            "prefill_tokens_per_s": r["prefill_tokens_per_s"],
            "prefill_s_median": r["prefill_s_median"], "prefill_s_min": r["prefill_s_min"],
            "prefill_s_max": r["prefill_s_max"],
            "decode_tokens_per_s": r["decode_tokens_per_s"],
            "decode_step_s_median": r["decode_step_s_median"],
            "decode_step_s_min": r["decode_step_s_min"],
            "decode_step_s_max": r["decode_step_s_max"],
            "mc_questions_per_s": batch / r["prefill_s_median"],
            "param_bytes_experts": r["param_bytes_experts"],
            "param_bytes_rest": r["param_bytes_rest"],
            "device_param_bytes": r["param_bytes_experts"] + r["param_bytes_rest"],
            "kv_cache_bytes": r["kv_cache_bytes"], "peak_device_bytes": peak,
            "peak_source": "allocator" if device_peak > 0 else "xla-prefill",
            "hit_rate": 1.0, "bytes_moved": 0, "stall_fraction": 0.0}


def _keys(cfg, batch, seq_len, policy, budget) -> dict:
    kind = cfg.decoder.moe.kind
    return {"model": cfg.name, "kind": kind, "batch": batch, "seq_len": seq_len,
            "policy": policy, "budget": budget}


def offload_rows(cfg, params, ec: EfficiencyConfig, progress_bar=None) -> list[dict]:
    """The live offload engine at (offload batch, offload_seq) x (all-resident, policies x
    budgets): prefill and decode tokens/s (medians of cold-pool repeats), device bytes."""
    from moex.bench.compare import make_batch
    from moex.bench.memory import tree_bytes
    from moex.offload.bench import parse_budget
    from moex.offload.engine import OffloadEngine
    from moex.offload.store import ExpertStore
    from moex.nn.decoder import init_cache
    store = ExpertStore.from_params(cfg, params)
    total, rest = store.total_bytes, tree_bytes(store.dense_params)
    rows = []
    specs = [("all-resident", "100%")] + [(p, b) for b in ec.budgets for p in ec.policies]
    for batch in ec.offload_batches:
        ids, mask, images = make_batch(cfg, batch, ec.offload_seq, np.random.default_rng(ec.seed))
        kv = tree_bytes(jax.eval_shape(lambda: init_cache(   # shapes only, as in resident rows
            cfg.decoder, batch, ec.offload_seq + ec.decode_steps, np.dtype(cfg.dtype)))["layers"])
        warm = set()
        for policy, label in specs:
            if progress_bar is not None:
                progress_bar.set_postfix_str(f"{cfg.name} offload B={batch} {policy} {label}")
            budget = parse_budget(label, total)
            pre, dec, stall, hits, moved, eng = [], [], [], [], [], None
            slots = budget // store.expert_bytes
            for i in range(ec.offload_repeats + (slots not in warm)):
                eng = OffloadEngine(cfg, None, policy, budget, store=store)
                eng.generate(ids, mask, images, max_new_tokens=ec.decode_steps, stop_tokens=())
                t = eng.timings
                if i < (slots not in warm):
                    continue
                pre.append(t["prefill_s"])
                dec.append(t["decode_s"] / max(1, t["decode_steps"]))
                stall.append(t["decode_stall_s"] / t["decode_s"] if t["decode_s"] else 0.0)
                hits.append(eng.core.stats.hit_rate)
                moved.append(eng.pool.bytes_loaded)
            warm.add(slots)
            pool = eng.pool.pool_bytes
            rows.append({**_keys(cfg, batch, ec.offload_seq, policy, label),
                         "prefill_tokens_per_s": batch * ec.offload_seq / statistics.median(pre),
                         "prefill_s_median": statistics.median(pre), "prefill_s_min": min(pre),
                         "prefill_s_max": max(pre),
                         "decode_tokens_per_s": batch / statistics.median(dec),
                         "decode_step_s_median": statistics.median(dec),
                         "decode_step_s_min": min(dec), "decode_step_s_max": max(dec),
                         "mc_questions_per_s": batch / statistics.median(pre),
                         "param_bytes_experts": pool, "param_bytes_rest": rest,
                         "device_param_bytes": rest + pool, "kv_cache_bytes": kv,
                         "peak_device_bytes": rest + pool + kv, "peak_source": "accounted",
                         "hit_rate": statistics.median(hits),
                         "bytes_moved": int(statistics.median(moved)),
                         "stall_fraction": statistics.median(stall)})
    return rows


def run(ec: EfficiencyConfig, progress: bool = True):
    """(rows, accuracy per model, grid points skipped, the benchmark files used)."""
    from tqdm import tqdm
    from moex.generate import Generator
    from moex.model import build
    batch_sizes, seq_lens, cap = ec.grid_points()
    ms = models(ec, progress)
    mm, seed, data = benchmark_questions(ec)
    points = [(b, s) for s in seq_lens for b in batch_sizes if b * s <= cap]
    skipped = [f"B={b} T={s} (B x T > {cap})" for s in seq_lens for b in batch_sizes
               if b * s > cap]
    n_off = sum(len(ec.offload_batches) * (1 + len(ec.policies) * len(ec.budgets))
                for _, cfg, _, _ in ms if cfg.decoder.moe.kind == "hard")
    bar = tqdm(total=len(ms) * (1 + len(points)) + n_off, desc="vlm_efficiency",
               disable=not progress)
    rows, acc = [], []
    for name, cfg, params, tokenizer in ms:
        bar.set_postfix_str(f"{name} accuracy")
        acc.append(accuracy(ec, name, cfg, params, tokenizer, mm, seed))
        bar.update()
        gen = Generator(build(cfg))
        for b, s in points:
            bar.set_postfix_str(f"{name} B={b} T={s}")
            rows.append(resident_row(gen, params, cfg, b, s, ec))
            bar.update()
        if cfg.decoder.moe.kind == "hard" and ec.policies:
            before = len(rows)
            rows += offload_rows(cfg, params, ec, bar)
            bar.update(len(rows) - before)
    bar.close()
    scores = {a["model"]: a for a in acc}
    for r in rows:
        t = scores[r["model"]]["tables"]
        for k, v in t.items():
            r[f"acc_{k}"] = v["overall"]
    return rows, acc, skipped, data


# -- outputs and command line ---------------------------------------------------------------------

def write_results(rows, acc, skipped, ec: EfficiencyConfig, data: dict) -> pathlib.Path:
    from moex.bench.efficiency_report import report_md, write_plots
    from moex.bench.output import write_outputs

    def extra(tmp: pathlib.Path):
        (tmp / "accuracy.json").write_text(json.dumps(acc, indent=2))
        write_plots(rows, tmp)
    return write_outputs(ec.out, rows, {**dataclasses.asdict(ec), "skipped": skipped,
                                        "data": data},
                         report_md(rows, acc, skipped, ec, data), extra)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EfficiencyConfig()
    p.add_argument("--family", default=d.family, help="presets FAMILY-dense/-hard/-soft")
    p.add_argument("--checkpoint", action="append", default=[], dest="checkpoints",
                   help="a moex checkpoint (e.g. a converted LLaVA) instead of the family; "
                        "repeat for several")
    p.add_argument("--no-train", action="store_true",
                   help="random weights instead of trained presets (accuracy is then chance)")
    p.add_argument("--train-steps", type=int, default=d.train_steps)
    p.add_argument("--grid", default=d.grid, help=f"{sorted(GRIDS)} or auto")
    p.add_argument("--batch", type=int, nargs="+", default=[])
    p.add_argument("--seq", type=int, nargs="+", default=[])
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap on B x T per point")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--policies", nargs="*", default=list(d.policies),
                   help="offload policies (none: no offloading)")
    p.add_argument("--budgets", nargs="+", default=list(d.budgets))
    p.add_argument("--offload-batch", type=int, nargs="+", default=list(d.offload_batches))
    p.add_argument("--offload-seq", type=int, default=d.offload_seq)
    p.add_argument("--offload-repeats", type=int, default=d.offload_repeats)
    p.add_argument("--mmbench", help="MMBench TSV (default: the synthetic dev split)")
    p.add_argument("--seed-json", help="SEED-Bench v1 JSON")
    p.add_argument("--seed-images", help="SEED-Bench image folder")
    p.add_argument("--tokenizer", help="tokenizer.json (converted checkpoints)")
    p.add_argument("--template", default=d.template,
                   help="chat template, e.g. 'USER: {prompt} ASSISTANT:' for LLaVA-1.5")
    p.add_argument("--style", default=d.style, help="prompt style: compact, mmbench, seed")
    p.add_argument("--image-mode", default=d.image_mode, help="crop (CLIP) or pad (LLaVA-1.5)")
    p.add_argument("--eval-questions", type=int, default=d.eval_questions)
    p.add_argument("--eval-batch", type=int, default=d.eval_batch)
    p.add_argument("--data", default=d.data)
    p.add_argument("--runs", default=d.runs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)


def config_from_args(a: argparse.Namespace) -> EfficiencyConfig:
    return EfficiencyConfig(
        family=a.family, checkpoints=tuple(a.checkpoints), train=not a.no_train,
        train_steps=a.train_steps, grid=a.grid, batch_sizes=tuple(a.batch),
        seq_lens=tuple(a.seq), max_tokens=a.max_tokens, decode_steps=a.decode_steps,
        warmup=a.warmup, repeats=a.repeats, policies=tuple(p for p in a.policies if p != "none"),
        budgets=tuple(a.budgets), offload_batches=tuple(a.offload_batch),
        offload_seq=a.offload_seq, offload_repeats=a.offload_repeats, mmbench=a.mmbench,
        seed_json=a.seed_json, seed_images=a.seed_images, tokenizer=a.tokenizer,
        template=a.template, style=a.style, image_mode=a.image_mode, eval_questions=a.eval_questions,
        eval_batch=a.eval_batch, data=a.data, runs=a.runs, seed=a.seed, out=a.out)


def main(args: argparse.Namespace) -> int:
    from moex.bench.efficiency_report import accuracy_md, relative_md, throughput_md
    ec = config_from_args(args)
    rows, acc, skipped, data = run(ec)
    out = write_results(rows, acc, skipped, ec, data)
    print(accuracy_md(acc).split("\n\n")[0], throughput_md(rows), relative_md(rows), sep="\n\n")
    print(f"\nwrote {out}/results.csv, results.json, accuracy.json, report.md and "
          "throughput_vs_batch.png, memory_vs_batch.png, throughput_vs_memory.png")
    return 0
