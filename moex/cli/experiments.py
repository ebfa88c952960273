"""`moex efficiency | compare` and `moex bench offload | engine | expertflow | offload-hf |
forward | convert | sharding`: the
experiments (`moex.experiments`), each reading its options into its run's dataclass."""

from __future__ import annotations

from moex.cli.args import add_fields, from_args
from moex.experiments import (convert_cost, efficiency, engine_speed, expertflow, gpu_check,
                              moe_forward, offload_grid, offload_hf, sharding_bench)
from moex.experiments.efficiency import GRIDS, EfficiencyConfig
from moex.experiments.gpu_check import GpuCheckConfig
from moex.experiments.offload_grid import OffloadBenchConfig
from moex.experiments import quant_quality
from moex.experiments.quant_quality import QuantQualityConfig
from moex.experiments.throughput import CompareConfig, compare

RENAMED = {"batch_sizes": "--batch", "seq_lens": "--seq"}


def register(sub) -> None:
    p = sub.add_parser("efficiency", help="the main experiment (experiments/vlm_efficiency.py)")
    add_fields(p, EfficiencyConfig, append=("checkpoints",), nargs={"policies": "*"},
               flags={**RENAMED, "checkpoints": "--checkpoint",
                      "offload_batches": "--offload-batch"}, help={
        "family": "presets FAMILY-dense/-hard/-soft: trained, then accuracy, routing, offloading",
        "grid_family": "presets of the throughput / memory grid (random weights; '' = the "
                       "family's own models)",
        "checkpoints": "a moex checkpoint (e.g. a converted LLaVA) instead of the families; "
                       "repeat for several",
        "train": "random weights instead of trained presets (accuracy is then chance)",
        "train_steps": "dense training steps of the recipe",
        "finetune_steps": "fine-tuning steps of the upcycled hard / soft models",
        "grid": f"{sorted(GRIDS)} or auto", "max_tokens": "cap on B x T per point",
        "policies": "offload policies (none: no offloading)",
        "mmbench": "MMBench TSV (default: the synthetic dev split)",
        "seed_json": "SEED-Bench v1 JSON", "seed_images": "SEED-Bench image folder",
        "tokenizer": "tokenizer.json (converted checkpoints)",
        "template": "chat template, e.g. 'USER: {prompt} ASSISTANT:' for LLaVA-1.5",
        "style": "prompt style: compact, mmbench, seed",
        "image_mode": "crop (CLIP) or pad (LLaVA-1.5)",
        "project": "hardware specs (h200, rtx4090, ...): print and plot the PROJECTED 7B "
                   "tables (moex.perf) instead of running the measured study",
        "project_trace": "routing trace for the offload projection (default: the trained "
                         "hard model's)",
        "mesh": "run the throughput / memory grid sharded, e.g. data=2,expert=4 (README: "
                "Choosing a mesh); offloading stays on one device"})
    p.set_defaults(fn=lambda a: efficiency.main(from_args(
        EfficiencyConfig, a, policies=tuple(x for x in a.policies if x != "none"))))

    p = sub.add_parser("compare", help="dense vs hard-MoE vs soft-MoE throughput and memory")
    add_fields(p, CompareConfig, flags=RENAMED, help={"family": "preset family: tiny or small"})
    p.set_defaults(fn=lambda a: (compare(from_args(CompareConfig, a)), 0)[1])

    p = sub.add_parser("gpu-check", help="the GPU check: 7B-class grid and a Mixtral-shaped "
                       "offload bench beside the performance model (experiments/gpu_check.py)")
    add_fields(p, GpuCheckConfig, flags=RENAMED, help={
        "layers": "decoder layers kept of each 7B preset (0: all)",
        "hardware": "the spec the predictions use (moex perf hardware)",
        "offload_layers": "layers of the Mixtral-shaped offload model (0: all)",
        "tiny": "CPU smoke test: tiny presets and a small grid",
        "time_limit_s": "points left after this many seconds are reported as skipped"})
    p.set_defaults(fn=lambda a: (gpu_check.check(from_args(GpuCheckConfig, a)), 0)[1])
    _bench_parsers(sub)


def _bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench",
                                                                        required=True)
    p = bench.add_parser("offload", help="offload policies x expert budgets x batch sizes")
    add_fields(p, OffloadBenchConfig, flags=RENAMED, help={
        "checkpoint": "a moex checkpoint dir (e.g. converted) instead of a randomly initialised "
                      "preset",
        "policies": "policies; predictive:prior / predictive:oracle / predictive:PREDICTOR_DIR "
                    "pick its forecaster",
        "budgets": "expert budgets: '25%%', '0.25' or bytes ('64MB')",
        "expert_dtype": "how the store keeps experts (what a load moves): native, int8 (per "
                        "output channel), int4 (groups of 64) or int4:G",
        "misses": "what a miss may do: load (the stored copy), low[:int4|int8] (its "
                  "low-precision copy when that stalls less; +upgrade: the stored copy "
                  "follows in the background), host (compute it on the host CPU), joined by "
                  "'+', e.g. low+upgrade+host",
        "domain": "prompts: random tokens, held-out stdlib code / prose (in the model's "
                  "tokenizer), or vlm: synthetic MMBench questions with their images (a VLM "
                  "--checkpoint, trained or converted); auto: vlm for a VLM checkpoint, else "
                  "random",
        "data": "synthetic benchmark root (--domain vlm)",
        "style": "--domain vlm: prompt style, compact, mmbench or seed",
        "template": "--domain vlm: chat template, e.g. "
                    "'<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n'"})
    p.set_defaults(fn=lambda a: (offload_grid.bench(from_args(OffloadBenchConfig, a)), 0)[1])

    p = bench.add_parser("engine", help="the offload engine's decode speed against the "
                         "whole-model jitted decode, with a per-layer breakdown "
                         "(moex/experiments/engine_speed.py)")
    add_fields(p, engine_speed.EngineBenchConfig, flags=RENAMED, help={
        "checkpoint": "a moex checkpoint dir (e.g. results/offload_hf/moex, a converted "
                      "Mixtral) instead of the preset's random weights",
        "policies": "policies timed at every budget (all-resident, fused and layer by layer, "
                    "always runs)",
        "budgets": "expert budgets: '25%%', '0.25' or bytes",
        "breakdown": "POLICY@BUDGET points profiled per layer (e.g. pregated@50%%)"})
    p.set_defaults(fn=lambda a: (engine_speed.bench(from_args(engine_speed.EngineBenchConfig,
                                                               a)), 0)[1])

    p = bench.add_parser("expertflow", help="ExpertFlow's comparison on a Switch "
                         "encoder-decoder: predictive vs per-layer LRU and pre-gating at "
                         "cache sizes of CS experts per layer")
    add_fields(p, expertflow.ExpertFlowConfig, help={
        "checkpoint": "a Switch moex checkpoint (moex lm train small-switch, or converted); "
                      "default: the preset's random weights",
        "predictor": "a routing-path predictor folder (moex predictor train) for "
                     "predictive:PREDICTOR; oracle and prior always run",
        "cache_sizes": "experts per MoE layer the pool holds (budget = CS x MoE layers)",
        "hardware": "the GPU regime's link and memory bandwidth (moex perf hardware)",
        "project": "the preset whose bf16 expert and weight bytes the GPU regime moves"})
    p.set_defaults(fn=lambda a: (expertflow.bench(from_args(expertflow.ExpertFlowConfig, a)),
                                 0)[1])

    p = bench.add_parser("offload-hf", help="the offload grid on a converted random "
                         "transformers Mixtral (extra options go to `moex bench offload`)")
    add_fields(p, offload_hf.HFMixtralConfig)
    add_fields(p, OffloadBenchConfig, flags=RENAMED, skip=("preset", "checkpoint", "out"))
    p.set_defaults(fn=_offload_hf)

    p = bench.add_parser("forward", help="Mixtral-shaped forward: moex vs transformers (torch)")
    add_fields(p, moe_forward.ForwardConfig, flags=RENAMED)
    p.set_defaults(fn=lambda a: moe_forward.main(from_args(moe_forward.ForwardConfig, a)))

    p = bench.add_parser("sharding", help="sharding strategies, all-to-all volumes at 7B shapes, "
                         "step times on a mesh vs one device (experiments/bench_sharding.py)")
    add_fields(p, sharding_bench.ShardingBenchConfig, help={
        "presets": "presets timed (random weights)",
        "meshes": "meshes, e.g. expert=4,data=2 (axes data, fsdp, tensor, expert); on CPU the "
                  "command re-runs itself on enough virtual devices",
        "seq_len": "tokens per row besides the image's (BOS, newline, text)",
        "train": "skip the train-step timing"})
    p.set_defaults(fn=lambda a: sharding_bench.main(from_args(sharding_bench.ShardingBenchConfig,
                                                              a)))

    p = bench.add_parser("convert", help="conversion cost: checkpoints_convert vs "
                         "transformers.from_pretrained (experiments/bench_convert.py)")
    add_fields(p, convert_cost.ConvertCostConfig, help={
        "arch": "the random checkpoint's architecture (mixtral: MixtralForCausalLM; "
                "qwen3-vl-moe: Qwen3VLMoeForConditionalGeneration, head_dim 128, vision tower)",
        "hidden": "text hidden size (qwen3-vl-moe: also the vision out_hidden_size)",
        "experts": "experts per MoE layer", "ffn": "expert FFN width",
        "vocab": "vocabulary (0: the architecture's, 32000 / 151936)",
        "vision_depth": "qwen3-vl-moe: vision blocks (DeepStack at k * depth * 8 // 27)",
        "vision_width": "qwen3-vl-moe: vision hidden size (MLP 4304 / 1152 of it)",
        "vision_heads": "qwen3-vl-moe: vision attention heads",
        "shard": "save_pretrained max_shard_size"})
    p.set_defaults(fn=lambda a: convert_cost.main(from_args(convert_cost.ConvertCostConfig, a)))

    p = bench.add_parser("quant", help="quality of quantized experts (int8 / int4 / mixed) "
                         "against full precision: logits, accuracy, held-out loss "
                         "(experiments/quant_quality.py)")
    add_fields(p, QuantQualityConfig, help={
        "vlm": "trained hard-MoE VLM checkpoint ('' skips the VLM)",
        "lm": "`moex lm train` run folder with run.json and model/ ('' skips the LM)",
        "formats": "int8, int4, int4:G, or mixed (the top --mixed-keep of each layer's "
                   "experts by routing counts at full precision, the rest int4)",
        "mixed_keep": "fraction of each MoE layer's experts mixed keeps at full precision "
                      "(at least 1)",
        "questions": "synthetic MMBench and SEED dev questions (0: all)",
        "lm_windows": "held-out windows per domain (0: the LM run's eval_windows)",
        "data": "synthetic benchmark root"})
    p.set_defaults(fn=lambda a: quant_quality.main(from_args(QuantQualityConfig, a)))


def _offload_hf(args) -> int:
    shape = from_args(offload_hf.HFMixtralConfig, args)
    folder = offload_hf.converted_mixtral(shape)
    offload_grid.bench(from_args(OffloadBenchConfig, args, checkpoint=str(folder),
                                 out=str(folder.parent / "offload")))
    return 0
