"""Conversion cost: `checkpoints_convert` vs `transformers.from_pretrained` + state dict to numpy.

    python experiments/bench_convert.py                      # = moex bench convert; ~1.6 GB fp32 Mixtral-shaped checkpoint
    python experiments/bench_convert.py --hidden 512 --layers 4   # smaller
    python experiments/bench_convert.py --arch qwen3-vl-moe --hidden 2048 --layers 6 \\
        --experts 16 --ffn 768 --vision-depth 27          # ~6.9 GB fp32 Qwen3-VL-MoE-shaped

Generates a random HF checkpoint (sharded safetensors, as `save_pretrained` writes it) in a child
process, then runs each contender in its own child process and reports wall time and the child's
peak RSS (`os.wait4` rusage). The baseline and moex are measured in the same run, alternating,
`--repeats` times each; medians are reported. The generator's own cost (one run) is reported
beside them; it is not part of the contest. Writes results.json and report.md under --out.

--arch mixtral: MixtralForCausalLM (per-expert hub layout; 16 heads, 4 KV heads, top-2, vocab
32000); the moex child is `python -m checkpoints_convert SRC OUT --dtype fp32`; the baseline loads
with AutoModelForCausalLM.

--arch qwen3-vl-moe: Qwen3VLMoeForConditionalGeneration with the published structure of
Qwen3-VL-30B-A3B at chosen sizes -- text: 32 heads, 4 KV heads, head_dim 128, interleaved MRoPE
sections [24, 20, 20], every layer MoE, top-min(8, E), untied embeddings, vocab 151936; experts
fused as transformers saves them, gate_up_proj (E, 2F, D) and down_proj (E, D, F). Vision: 16 px
patches x 2 frames, 2 x 2 merge, a 48 x 48 learned position grid, MLP 4304 / 1152 of the width,
DeepStack mergers at blocks k * depth * 8 // 27 (k = 1..3; 8, 16, 24 at the published 27),
out_hidden_size = text hidden. The model is built on the meta device and materialised one
parameter at a time (normal_, std 0.02), so the generator holds the weights once. The moex child
calls checkpoints_convert.convert.convert(SRC, OUT, "fp32"); the baseline loads with
AutoModelForImageTextToText.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Literal

from tqdm import tqdm

HF_CHILD = """
import sys, numpy as np, torch, transformers
cls = getattr(transformers, sys.argv[2])
model, info = cls.from_pretrained(sys.argv[1], dtype=torch.float32, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info   # every tensor loaded
arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
print(sum(a.nbytes for a in arrays.values()))
"""
HF_CLASS = {"mixtral": "AutoModelForCausalLM", "qwen3-vl-moe": "AutoModelForImageTextToText"}

MOEX_CONVERT_CHILD = """
import sys
from checkpoints_convert.convert import convert
print(convert(sys.argv[1], sys.argv[2], "fp32", progress=False))
"""

GENERATOR_CHILD = """
import json, sys
from moex.experiments.convert_cost import ConvertCostConfig, make_checkpoint
print(json.dumps(make_checkpoint(sys.argv[1], ConvertCostConfig(**json.loads(sys.argv[2])))))
"""

QWEN3_VL_VOCAB, QWEN3_HEAD_DIM, QWEN3_MROPE = 151936, 128, [24, 20, 20]


@dataclasses.dataclass(frozen=True)
class ConvertCostConfig:
    arch: Literal["mixtral", "qwen3-vl-moe"] = "mixtral"
    hidden: int = 1024
    layers: int = 8
    experts: int = 8
    ffn: int = 2048
    vocab: int = 0
    vision_depth: int = 8
    vision_width: int = 1152
    vision_heads: int = 16
    shard: str = "400MB"
    repeats: int = 3
    out: str = "results/bench_convert"

    def __post_init__(self):
        if self.arch == "qwen3-vl-moe":
            w, h = self.vision_width, self.vision_heads
            if h < 1 or w % h or (w // h) % 4:
                raise ValueError(f"--vision-width {w} / --vision-heads {h} must give a head "
                                 "width that is a multiple of 4 (2D rotary embedding)")
            if self.vision_depth < 1:
                raise ValueError("--vision-depth must be at least 1")

    def describe(self) -> str:
        text = (f"hidden {self.hidden}, {self.layers} layers, {self.experts} experts x "
                f"{self.ffn}, vocab {self.vocab or _default_vocab(self.arch)}")
        if self.arch == "mixtral":
            return f"Mixtral-shaped, {text}"
        return (f"Qwen3-VL-MoE-shaped, {text}, head_dim {QWEN3_HEAD_DIM}; vision depth "
                f"{self.vision_depth}, width {self.vision_width}, {self.vision_heads} heads, "
                f"DeepStack at {deepstack_indexes(self.vision_depth)}")


def _default_vocab(arch: str) -> int:
    return 32000 if arch == "mixtral" else QWEN3_VL_VOCAB


def deepstack_indexes(depth: int) -> list[int]:
    """The published [8, 16, 24] of 27 blocks, scaled to `depth` (always below it)."""
    return sorted({k * depth * 8 // 27 for k in (1, 2, 3)})


def qwen3_vl_moe_config(args: ConvertCostConfig):
    import transformers
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": QWEN3_MROPE,
            "mrope_interleaved": True}
    assert sum(QWEN3_MROPE) == QWEN3_HEAD_DIM // 2
    text = dict(vocab_size=args.vocab or QWEN3_VL_VOCAB, hidden_size=args.hidden,
                intermediate_size=args.ffn, num_hidden_layers=args.layers,
                num_attention_heads=32, num_key_value_heads=4, head_dim=QWEN3_HEAD_DIM,
                num_experts=args.experts, num_experts_per_tok=min(8, args.experts),
                moe_intermediate_size=args.ffn, decoder_sparse_step=1, mlp_only_layers=[],
                rms_norm_eps=1e-6, max_position_embeddings=262144, rope_parameters=rope)
    vision = dict(depth=args.vision_depth, hidden_size=args.vision_width,
                  intermediate_size=args.vision_width * 4304 // 1152,
                  num_heads=args.vision_heads, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=args.hidden,
                  num_position_embeddings=2304,
                  deepstack_visual_indexes=deepstack_indexes(args.vision_depth))
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision,
                                         tie_word_embeddings=False)


def make_checkpoint(path, args: ConvertCostConfig) -> dict:
    """Write the random checkpoint of `args` to `path`; its parameter count and bytes."""
    import torch
    import transformers
    torch.manual_seed(0)
    if args.arch == "mixtral":
        cfg = transformers.MixtralConfig(vocab_size=args.vocab or 32000, hidden_size=args.hidden,
                                         intermediate_size=args.ffn,
                                         num_hidden_layers=args.layers, num_attention_heads=16,
                                         num_key_value_heads=4, num_local_experts=args.experts,
                                         num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        # built on the meta device, then each parameter allocated and filled once: the weights
        # exist once (no default init followed by a copy)
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(
                qwen3_vl_moe_config(args), dtype=torch.float32)
        model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(path, max_shard_size=args.shard)
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params)}


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
        if status != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{argv[:3]} exited with status {status}:\n{tail}")
    return wall, usage.ru_maxrss / 1024, out     # ru_maxrss is in KB on Linux


def contenders(args: ConvertCostConfig, src: pathlib.Path) -> dict:
    """name -> argv builder (output folder -> argv) of each contender; None: no output."""
    if args.arch == "mixtral":
        def moex(out):
            return [sys.executable, "-m", "checkpoints_convert", str(src), str(out), "--dtype",
                    "fp32", "--quiet"]
    else:
        def moex(out):
            return [sys.executable, "-c", MOEX_CONVERT_CHILD, str(src), str(out)]
    return {"moex checkpoints_convert": moex,
            "transformers from_pretrained + numpy":
                lambda out: [sys.executable, "-c", HF_CHILD, str(src), HF_CLASS[args.arch]]}


def measure(args: ConvertCostConfig, work: pathlib.Path) -> dict:
    """Generate the checkpoint, then the contenders alternating; the numbers of results.json."""
    src = work / "hf"
    gen_wall, gen_rss, out = run_child([sys.executable, "-c", GENERATOR_CHILD, str(src),
                                        json.dumps(dataclasses.asdict(args))])
    made = json.loads(out.strip().splitlines()[-1])
    shards = sorted(src.glob("*.safetensors"))
    disk = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
    print(f"checkpoint: {disk / 1e9:.2f} GB on disk in {len(shards)} shards, "
          f"{made['params'] / 1e9:.3f}B params (generated in {gen_wall:.1f} s, peak RSS "
          f"{gen_rss:.0f} MB)")
    argvs = contenders(args, src)
    runs = {name: [] for name in argvs}
    for i in tqdm(range(args.repeats), desc="repeats"):
        for name, argv in argvs.items():
            out = work / f"out-{i}"
            runs[name].append(run_child(argv(out))[:2])
            shutil.rmtree(out, ignore_errors=True)
    rows = [{"contender": name, "wall_s_median": statistics.median(w for w, _ in r),
             "wall_s_min": min(w for w, _ in r), "wall_s_max": max(w for w, _ in r),
             "peak_rss_mb_median": statistics.median(m for _, m in r),
             "peak_rss_mb_max": max(m for _, m in r), "runs": r}
            for name, r in runs.items()]
    return {"checkpoint_bytes": made["param_bytes"], "disk_bytes": disk,
            "params": made["params"], "shards": len(shards),
            "generator": {"wall_s": gen_wall, "peak_rss_mb": gen_rss}, "rows": rows}


def main(args: ConvertCostConfig) -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="moex-bench-convert-"))
    try:
        result = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| contender | wall s (median, min-max) | peak RSS MB (median) |", "|---|---|---|"]
    table += [f"| {r['contender']} | {r['wall_s_median']:.1f} ({r['wall_s_min']:.1f}-"
              f"{r['wall_s_max']:.1f}) | {r['peak_rss_mb_median']:.0f} |" for r in result["rows"]]
    g = result["generator"]
    report = (f"checkpoint {result['checkpoint_bytes'] / 1e6:.0f} MB fp32 "
              f"({result['params'] / 1e6:.1f}M params; {result['disk_bytes'] / 1e6:.0f} MB on "
              f"disk in {result['shards']} shards; {args.describe()}); {args.repeats} repeats\n\n"
              + "\n".join(table) + f"\n\ngenerator (not in the contest): {g['wall_s']:.1f} s, "
              f"peak RSS {g['peak_rss_mb']:.0f} MB")
    print(report)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**result, "args": dataclasses.asdict(args)},
                                                 indent=2))
    (out / "report.md").write_text(report + "\n")
    return 0
