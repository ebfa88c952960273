"""`moex bench quant`: what quantized experts do to a trained model's outputs, measured.

    moex bench quant                            # runs/vlm/mini-hard/model + runs/lm/small-hard
    moex bench quant --formats int8 int4 int4:32 mixed --questions 100 --out /tmp/quant
    python experiments/quant_quality.py

Each format replaces the routed experts of the decoder's hard-MoE layers
(`moex.offload.store.moe_layers`) by their round trip dequantize(quantize(w)), computed as the
offload engine's slot pool does it (`moex.offload.quant.quantized_params`), so the model measured
is bitwise the model the engine runs on a quantized store. Everything else (attention, routers,
dense FFNs, a vision tower's experts) stays at full precision, as the engine keeps it.

  int8, int4, int4:G   every routed expert in that format (`moex.offload.quant.parse_expert_dtype`)
  mixed                the steady state of a low-precision-miss cache (HOBBIT-style): per MoE
                       layer the most-used experts -- the top `mixed_keep` fraction of the layer's
                       E experts, floor(mixed_keep x E) and at least 1, ranked by the full model's
                       routing counts (token x top-k choices, padding excluded) on the evaluation
                       prompts themselves, ties to the lower expert id -- stay at full precision;
                       the rest are int4

Measured against the full-precision model, per format:
  logits      max and mean |logit difference| over every vocabulary entry at every real
              (unpadded) position of the evaluation prompts, and top-1 agreement (the fraction of
              those positions whose argmax is the full model's); the model's own jitted forward
  VLM         (the trained hard-MoE VLM; prompts: the synthetic MMBench dev questions -- all
              of them by default, else the first `questions` -- with their images, compact
              style) MMBench CircularEval and plain accuracy (generated answers), and SEED-Bench
              likelihood ranking / generated letter on as many SEED dev questions -- the main
              experiment's scorer, settings and scores (`moex.experiments.efficiency.scorer`,
              as its `accuracy` uses them) -- and the drop in points from full
  LM          (the stdlib byte-level LM of `moex lm train`; prompts: its held-out windows,
              `eval_windows` per domain of `seq_len` bytes, as its run.json recorded them)
              held-out next-byte loss per domain (`moex.predict.lm.heldout_loss`, the inference
              config: dropless routing)

Shape letters: B batch, T tokens, V vocabulary, K experts per token, E experts per layer, P real
positions. Outputs under --out: results.csv / results.json (one row per (model, format)) and
report.md.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from moex.checkpoint import load_model
from moex.data import (SyntheticSpec, batches, encode_batch, read_mmbench, read_seedbench,
                       write_synthetic)
from moex.eval import evaluate_mmbench, evaluate_seed
from moex.experiments import efficiency
from moex.experiments.efficiency import EfficiencyConfig
from moex.measure import md_table, write_outputs
from moex.model import build, forward
from moex.offload import quant
from moex.offload.store import moe_layers
from moex.predict.corpus import DOMAINS, samples
from moex.predict.lm import LMTrainConfig, heldout_loss

FULL, MIXED = "full", "mixed"
MIXED_LOW = "int4"                                      # a mixed model's other experts
TARGETS = {"int8": 1.0, "int4": 3.0, MIXED: 3.0}        # max accuracy drop in points (issue 17)
ACCURACY = ("mmbench_circular", "mmbench_plain", "seed_likelihood", "seed_generate")
VLM_COMMAND = "python experiments/vlm_efficiency.py (moex efficiency: trains runs/vlm/mini-*)"
LM_COMMAND = "moex lm train small-hard --steps 400 (or moex predictor study)"


@dataclasses.dataclass(frozen=True)
class QuantQualityConfig:
    vlm: str = "runs/vlm/mini-hard/model"       # trained hard-MoE VLM checkpoint ("" : skip)
    lm: str = "runs/lm/small-hard"              # `moex lm train` run folder ("" : skip)
    formats: tuple[str, ...] = ("int8", "int4", MIXED)
    mixed_keep: float = 0.25                    # fraction of each layer's experts kept full
    questions: int = 0                          # MMBench and SEED dev questions (0: all)
    lm_windows: int = 0                         # held-out windows per domain (0: the run's)
    eval_batch: int = 50
    data: str = "runs/data/synthetic"
    out: str = "results/quant_quality"
    seed: int = 0

    @property
    def variants(self) -> tuple[str, ...]:
        """full (the reference, always first), then each format once."""
        return tuple(dict.fromkeys((FULL,) + tuple(self.formats)))

    def check(self) -> None:
        for name in self.formats:
            if name not in (FULL, MIXED):
                quant.parse_expert_dtype(name)
        if not 0 < self.mixed_keep <= 1:
            raise ValueError(f"mixed_keep is a fraction of each layer's experts: expected 0 < "
                             f"mixed_keep <= 1, found {self.mixed_keep}")
        if not (self.vlm or self.lm):
            raise ValueError("nothing to measure: give --vlm and / or --lm")


# -- formats ---------------------------------------------------------------------------------------

def mixed_keep(counts: dict[int, np.ndarray], fraction: float) -> frozenset:
    """{(layer, expert)} kept at full precision: per layer the floor(fraction x E) (at least 1)
    experts with the most routing counts (E,), ties to the lower expert id."""
    keep = set()
    for layer, c in counts.items():
        k = max(1, int(fraction * len(c)))
        keep |= {(layer, int(e)) for e in np.argsort(-np.asarray(c), kind="stable")[:k]}
    return frozenset(keep)


def low_format(name: str) -> quant.QuantFormat | None:
    """The format of a variant's quantized experts (None: full)."""
    return None if name == FULL else quant.parse_expert_dtype(MIXED_LOW if name == MIXED else name)


def variant_params(cfg, params, name: str, keep: frozenset):
    """The params of format `name`; `keep` applies to mixed only."""
    return quant.quantized_params(params, moe_layers(cfg), cfg.decoder.moe.num_experts,
                                  low_format(name), keep if name == MIXED else frozenset())


def expert_cells(cfg, params, name: str, keep: frozenset) -> dict:
    """Routed experts at full precision and the bytes all routed experts take in this format."""
    layers, e = moe_layers(cfg), cfg.decoder.moe.num_experts
    stack = params["decoder"][f"layer_{layers[0]}"]["ffn"]["experts"]
    one = {w: np.asarray(a[0]) for w, a in stack.items()}
    full_bytes = sum(a.nbytes for a in one.values())
    fmt, total = low_format(name), len(layers) * e
    n_full = total if fmt is None else (len(keep) if name == MIXED else 0)
    low_bytes = quant.stored_bytes(quant.quantize_expert(one, fmt)) if fmt else full_bytes
    return {"experts_full": n_full, "experts_total": total,
            "expert_mb": (n_full * full_bytes + (total - n_full) * low_bytes) / 1e6}


# -- forwards and logit differences --------------------------------------------------------------

def forward_fn(cfg):
    """Jitted (params, ids, mask, images) -> (logits (B, T, V) float32, [expert ids (B, T, K) per
    MoE layer])."""
    model, layers = build(cfg), moe_layers(cfg)

    @jax.jit
    def fwd(params, ids, mask, images):
        logits, _, aux = forward(model, params, ids, mask, images)
        return logits.astype(jnp.float32), [aux["decoder"][i]["expert_ids"] for i in layers]
    return fwd


def run_forward(cfg, fwd, params, data) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """Per batch (ids, mask, images or None, real rows n): the real positions' logits (P, V), and
    the routing counts per MoE layer (E,) over them."""
    e = cfg.decoder.moe.num_experts
    counts = {i: np.zeros(e, np.int64) for i in moe_layers(cfg)}
    out = []
    for ids, mask, images, n in data:
        logits, ids_per_layer = fwd(params, jnp.asarray(ids), jnp.asarray(mask),
                                    None if images is None else jnp.asarray(images))
        real = np.asarray(mask)[:n] > 0
        out.append(np.asarray(logits)[:n][real])
        for layer, got in zip(counts, ids_per_layer):
            counts[layer] += np.bincount(np.asarray(got)[:n][real].reshape(-1), minlength=e)[:e]
    return out, counts


def logit_stats(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Max / mean |logit difference| and top-1 agreement over all positions (P, V)."""
    r, g = np.concatenate(ref), np.concatenate(got)
    diff = np.abs(g - r)
    return {"logit_max_abs": float(diff.max()), "logit_mean_abs": float(diff.mean()),
            "top1_agreement": float(np.mean(g.argmax(-1) == r.argmax(-1))),
            "positions": int(r.shape[0])}


# -- the VLM ---------------------------------------------------------------------------------------

def dev_questions(run: QuantQualityConfig):
    """The first `questions` MMBench and SEED dev questions of the synthetic benchmark under
    `data` (built with the default spec when missing; an existing folder keeps its own spec)."""
    root = pathlib.Path(run.data)
    spec = SyntheticSpec(seed=run.seed)
    if (root / "spec.json").is_file():
        found = json.loads((root / "spec.json").read_text())
        spec = SyntheticSpec(**{k: v for k, v in found.items() if k != "format_version"})
    paths = write_synthetic(root, spec)
    if "mmbench/dev" not in paths:
        raise FileNotFoundError(f"{root} has no dev split (its spec: {spec}); expected "
                                f"mmbench/dev.tsv and seed/dev.json")
    n = run.questions or None
    return (read_mmbench(paths["mmbench/dev"])[:n],
            read_seedbench(paths["seed/dev"], paths["seed/images"])[:n])


def vlm_batches(cfg, tokenizer, questions, study: EfficiencyConfig) -> list[tuple]:
    """The questions' prompts as the scorer encodes them, in groups of eval_batch (the last
    padded by repeating its last question: one compiled shape per prompt length bucket)."""
    out = []
    for group in batches(questions, study.eval_batch):
        n = len(group)
        b = encode_batch(list(group) + [group[-1]] * (study.eval_batch - n), tokenizer,
                         cfg.vision, study.style, mode=study.image_mode, template=study.template,
                         bucket=32)
        out.append((b.ids, b.mask, b.images, n))
    return out


def vlm_rows(run: QuantQualityConfig, progress: bool = True) -> tuple[list[dict], dict]:
    path = pathlib.Path(run.vlm)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained VLM checkpoint at {path} (expected "
                                f"{path / 'config.json'}); create it with {VLM_COMMAND}")
    loaded = load_model(path)
    cfg = loaded.cfg
    _check_hard(cfg, path)
    mm, seed = dev_questions(run)
    study = EfficiencyConfig(eval_questions=run.questions, eval_batch=run.eval_batch,
                             data=run.data, seed=run.seed)
    fwd = forward_fn(cfg)
    data = vlm_batches(cfg, loaded.tokenizer, mm, study)
    ref, counts = run_forward(cfg, fwd, loaded.params, data)
    keep = mixed_keep(counts, run.mixed_keep)
    scorer = efficiency.scorer(study, efficiency.Model(cfg.name, cfg, loaded.params,
                                                       loaded.tokenizer, str(path)))
    rows = []
    for name in run.variants:
        _say(progress, f"vlm {cfg.name} {name}")
        params = variant_params(cfg, loaded.params, name, keep)
        got = ref if name == FULL else run_forward(cfg, fwd, params, data)[0]
        rows.append({"model": cfg.name, "kind": "vlm", "checkpoint": str(path), "format": name,
                     **expert_cells(cfg, loaded.params, name, keep), **logit_stats(ref, got),
                     **accuracy(scorer, params, mm, seed),
                     "mmbench_questions": len(mm), "seed_questions": len(seed)})
    for r in rows:
        r.update({f"drop_{k}": 100 * (rows[0][k] - r[k]) for k in ACCURACY})
    return rows, _kept(keep, counts)


def accuracy(scorer, params, mm, seed) -> dict:
    """The main experiment's scores (`moex.experiments.efficiency.accuracy`: MMBench circular and
    plain, SEED likelihood and generated) with `params`; one Scorer serves every format (its
    jitted functions take the params as an argument, so no format recompiles them)."""
    scorer.params = params
    tables = {**evaluate_mmbench(scorer, mm)["tables"], **evaluate_seed(scorer, seed)["tables"]}
    return {k: tables[k]["overall"] for k in ACCURACY}


# -- the LM ----------------------------------------------------------------------------------------

def lm_run_of(path: pathlib.Path, windows: int) -> LMTrainConfig:
    """The LM's training config from its run.json (held-out windows: `windows` if given)."""
    record = path / "run.json"
    if not record.is_file() or not (path / "model" / "config.json").is_file():
        raise FileNotFoundError(f"no trained LM run at {path} (expected {record} and "
                                f"{path / 'model'}/config.json); create it with {LM_COMMAND}")
    fields = {f.name for f in dataclasses.fields(LMTrainConfig)}
    lm_run = LMTrainConfig(**{k: v for k, v in json.loads(record.read_text()).items()
                              if k in fields})
    return dataclasses.replace(lm_run, eval_windows=windows) if windows else lm_run


def lm_rows(run: QuantQualityConfig, progress: bool = True) -> tuple[list[dict], dict]:
    path = pathlib.Path(run.lm)
    lm_run = lm_run_of(path, run.lm_windows)
    loaded = load_model(path / "model")
    cfg = loaded.cfg
    _check_hard(cfg, path / "model")
    loss = heldout_loss(build(cfg), cfg, lm_run)          # the inference config: dropless
    data = []
    for d in DOMAINS:        # the windows heldout_loss scores, as inputs (the last byte a target)
        w = samples(d, "heldout", lm_run.eval_windows, lm_run.seq_len + 1, seed=lm_run.seed + 7,
                    limit=lm_run.corpus_limit)[:, :-1]
        data.append((w, np.ones_like(w), None, len(w)))
    fwd = forward_fn(cfg)
    ref, counts = run_forward(cfg, fwd, loaded.params, data)
    keep = mixed_keep(counts, run.mixed_keep)
    rows = []
    for name in run.variants:
        _say(progress, f"lm {cfg.name} {name}")
        params = variant_params(cfg, loaded.params, name, keep)
        got = ref if name == FULL else run_forward(cfg, fwd, params, data)[0]
        held = loss(_Params(params))
        rows.append({"model": cfg.name, "kind": "lm", "checkpoint": str(path), "format": name,
                     **expert_cells(cfg, loaded.params, name, keep), **logit_stats(ref, got),
                     **held, "heldout_mean": float(np.mean(list(held.values()))),
                     "heldout_windows": lm_run.eval_windows, "seq_len": lm_run.seq_len})
    for r in rows:
        r["loss_increase"] = r["heldout_mean"] - rows[0]["heldout_mean"]
    return rows, _kept(keep, counts)


@dataclasses.dataclass(frozen=True)
class _Params:
    params: dict                    # what heldout_loss's evaluate reads of a training state


def _check_hard(cfg, path) -> None:
    if not moe_layers(cfg):
        raise ValueError(f"{path}: {cfg.name} has no hard-MoE decoder layer (decoder moe kind "
                         f"{cfg.decoder.moe.kind!r}); quantized experts need a hard-MoE model")


def _kept(keep: frozenset, counts: dict) -> dict:
    return {f"layer_{i}": {"full_precision": sorted(e for l, e in keep if l == i),
                           "routing_counts": c.tolist()} for i, c in counts.items()}


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[bench quant] {text}", flush=True)


# -- report and command line -----------------------------------------------------------------------

def _target(name: str) -> float | None:
    """The accuracy drop (points) the issue allows a format: int8 1, int4 (and mixed) 3."""
    if name == FULL:
        return None
    return TARGETS[MIXED if name == MIXED else quant.parse_expert_dtype(name).kind]


def vlm_md(rows: list[dict]) -> str:
    head = ["format", "experts full", "expert MB", "max abs dlogit", "mean abs dlogit",
            "top-1 agree", "MMB circular (drop)", "MMB plain (drop)", "SEED lik. (drop)",
            "SEED gen. (drop)", "target: drop <=", "met"]
    body = []
    for r in rows:
        t = _target(r["format"])
        worst = round(max(r[f"drop_{k}"] for k in ACCURACY), 9)      # 100 x (0.705 - 0.695)
        body.append([r["format"], f"{r['experts_full']}/{r['experts_total']}",
                     f"{r['expert_mb']:.2f}", f"{r['logit_max_abs']:.3g}",
                     f"{r['logit_mean_abs']:.3g}", f"{r['top1_agreement']:.4f}",
                     *[f"{100 * r[k]:.1f} ({r[f'drop_{k}']:+.1f})" for k in ACCURACY],
                     "-" if t is None else f"{t:g} pts",
                     "-" if t is None else ("yes" if worst <= t else "NO")])
    return md_table(head, body)


def lm_md(rows: list[dict]) -> str:
    head = ["format", "experts full", "expert MB", "max abs dlogit", "mean abs dlogit",
            "top-1 agree", "held-out code", "held-out prose", "mean (nats/byte)", "increase"]
    return md_table(head, [[r["format"], f"{r['experts_full']}/{r['experts_total']}",
                            f"{r['expert_mb']:.2f}", f"{r['logit_max_abs']:.3g}",
                            f"{r['logit_mean_abs']:.3g}", f"{r['top1_agreement']:.4f}",
                            f"{r['heldout_code']:.4f}", f"{r['heldout_prose']:.4f}",
                            f"{r['heldout_mean']:.4f}", f"{r['loss_increase']:+.4f}"]
                           for r in rows])


def report_md(run: QuantQualityConfig, vlm: list[dict], lm: list[dict], kept: dict) -> str:
    parts = [f"# Quantized experts: quality against full precision\n\nRouted experts of the "
             f"decoder's hard-MoE layers only (what the offload engine stores quantized). mixed = "
             f"per MoE layer the top {run.mixed_keep:g} of experts by the full model's routing "
             f"counts on the evaluation prompts (at least 1) at full precision, the rest "
             f"{MIXED_LOW}; kept: " + "; ".join(
                 f"{kind} " + ", ".join(f"{layer} {v['full_precision']}"
                                        for layer, v in layers.items())
                 for kind, layers in kept.items() if layers) + "."]
    if vlm:
        r = vlm[0]
        parts.append(f"## VLM {r['model']} ({r['checkpoint']})\n\n{r['mmbench_questions']} "
                     f"synthetic MMBench dev questions (CircularEval: every rotation; logits: the "
                     f"un-rotated prompts, {r['positions']} positions), {r['seed_questions']} SEED "
                     f"dev questions; one question = {100 / r['mmbench_questions']:.2g} points. "
                     f"Accuracy in %, drop in points from full (negative: above full); target: "
                     f"every accuracy's drop <= 1 point at int8, <= 3 at int4 (and mixed)."
                     f"\n\n{vlm_md(vlm)}")
    if lm:
        r = lm[0]
        parts.append(f"## LM {r['model']} ({r['checkpoint']})\n\n{r['heldout_windows']} held-out "
                     f"windows of {r['seq_len']} bytes per domain ({r['positions']} positions); "
                     f"next-byte cross-entropy in nats.\n\n{lm_md(lm)}")
    return "\n\n".join(parts)


def main(run: QuantQualityConfig, progress: bool = True) -> int:
    """Measure every format on the VLM and the LM, write results under run.out, print the
    tables."""
    run.check()
    vlm, vlm_kept = vlm_rows(run, progress) if run.vlm else ([], {})
    lm, lm_kept = lm_rows(run, progress) if run.lm else ([], {})
    kept = {"vlm": vlm_kept, "lm": lm_kept}
    report = report_md(run, vlm, lm, kept)
    out = write_outputs(run.out, vlm + lm, {**dataclasses.asdict(run),
                                           "mixed_full_precision": kept}, report)
    print(report)
    print(f"\nwrote {out}/results.csv, results.json, report.md")
    return 0
