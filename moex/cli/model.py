"""`moex info | presets | generate | upcycle | convert | compare-hf | make-tiny-hf`: one model at
a time."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from PIL import Image

from checkpoints_convert.convert import convert as convert_hf
from checkpoints_convert.export import to_hf
from checkpoints_convert.reader import CheckpointError
from moex import checkpoint
from moex.cli.args import add_fields, from_args
from moex.config import PRESETS, EncDecConfig, get_config
from moex.data.images import preprocess
from moex.data.qwen_images import preprocess as qwen_preprocess, spec_for
from moex.experiments import tiny_hf
from moex.experiments.tiny_hf import TinyHFConfig
from moex.generate import Sampling, generator_for
from moex.seq2seq import Seq2SeqGenerator
from moex.model import shard_params
from moex.nn import sharding
from moex.info import format_info, model_info
from moex.offload.engine import OffloadEngine
from moex.offload.misses import MissRule, parse_misses
from moex.offload.spec import parse_budget, parse_policy
from moex.offload.store import ExpertStore
from moex.offload.seq2seq_engine import Seq2SeqOffloadEngine
from moex.predict.forecast import forecaster_for, make_lookahead
from moex.tokenizer import IMAGE_TAG, left_pad
from moex.upcycle import UpcycleSpec, upcycle_checkpoint


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter and memory summary of a preset, from shapes")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=info)
    sub.add_parser("presets", help="list presets").set_defaults(fn=presets)
    _generate_parser(sub)
    _upcycle_parser(sub)
    _convert_parsers(sub)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a preset (random weights) or a "
                       "moex checkpoint (trained or converted), optionally offloaded")
    p.add_argument("model", metavar="PRESET_OR_CHECKPOINT",
                   help="a preset name, or a moex checkpoint folder (its weights and "
                        "tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat for a batch; '<image>' marks where an image goes")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image file for the next prompt with '<image>' (a VLM); repeat in "
                        "prompt order. Without it a preset gets random images")
    p.add_argument("--image-mode", default=None, choices=["crop", "pad", "native"],
                   help="resize then centre-crop (CLIP), pad to square first (LLaVA-1.5), or "
                        "native: the model's own dynamic resolution (Qwen3-VL's processor, "
                        "its pixel budget; the default for such towers, crop otherwise)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="a tokenizer.json to use instead of the model's")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and a preset's weights)")
    p.add_argument("--offload", metavar="POLICY",
                   help="experts in host memory under this policy (all-resident, on-demand, "
                        "lru, lfu, pregated, predictive:prior, predictive:oracle, "
                        "predictive:PREDICTOR_DIR); offload stats go to stderr as JSON")
    p.add_argument("--expert-budget", default="25%",
                   help="device budget for experts with --offload: '25%%', '0.25' or '64MB'")
    p.add_argument("--expert-dtype", default="native",
                   help="with --offload, how host memory keeps experts (what a load moves): "
                        "native, int8, int4 or int4:G (dequantized on the device)")
    p.add_argument("--quantized-slots", action="store_true",
                   help="with --offload and an int8 / int4 --expert-dtype: device slots keep "
                        "the quantized copies (more experts per budget, dequantized at use)")
    p.add_argument("--misses", default="load",
                   help="with --offload, what a miss may do: load, low[:int4|int8][+upgrade], "
                        "host, joined by '+' (a cost model measured here decides per miss)")
    p.add_argument("--mesh", help="generate sharded over a device mesh, e.g. data=2,expert=4 "
                   "(README: Choosing a mesh; not with --offload, whose slot pool is one device)")
    p.set_defaults(fn=generate)


def _upcycle_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="sparse upcycling: a dense moex checkpoint -> hard- or "
                       "soft-MoE (experts start from the dense FFN)")
    p.add_argument("src", help="dense moex checkpoint folder")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--like", metavar="PRESET",
                   help="take the MoE layout from a preset with the same shapes "
                        "(e.g. llava-1.5-7b-hard on a converted LLaVA-1.5-7B)")
    p.add_argument("--seed", type=int, default=0)
    add_fields(p, UpcycleSpec, defaults={"to": None}, skip=("renormalize",), help={
        "to": "what to upcycle to (or --like PRESET)",
        "experts": "decoder experts (soft: the dense FFN splits into this many)",
        "layers": "decoder blocks: all, none, even, odd, or indices / ranges (0,2,5-9, 13-23:2)",
        "vision_layers": "vision blocks, the same way",
        "vision_experts": "experts in the vision tower (default: --experts)",
        "slots": "Soft MoE slots per expert (default: tokens / experts, rounded up)",
        "projector": "upcycle the projector MLP too",
        "noise": "hard routers: logit noise (|x| / sqrt(D) units) that breaks the tie",
        "name": "name of the new config (default: SRC's name -hard / -soft)"})
    p.set_defaults(fn=upcycle)


def _convert_parsers(sub) -> None:
    p = sub.add_parser("convert", help="a HuggingFace checkpoint -> a moex checkpoint, or back "
                       "with --to-hf (= python -m checkpoints_convert)")
    p.add_argument("src", help="HF model folder (or, with --to-hf, a moex checkpoint)")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="param dtype of the moex checkpoint (default: the source's)")
    p.add_argument("--to-hf", action="store_true", help="export a moex checkpoint to HF format")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=convert)

    p = sub.add_parser("compare-hf", help="logit parity of a HF checkpoint: moex vs transformers")
    p.add_argument("src", help="HuggingFace model folder (config.json + weights)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=compare_hf)

    p = sub.add_parser("make-tiny-hf", help="a tiny random transformers Qwen3-VL (dense) or "
                       "Qwen3-VL-MoE folder in the synthetic benchmark's vocabulary (demos)")
    add_fields(p, TinyHFConfig, positional=("arch", "out"), help={
        "arch": "qwen3-vl (dense) or qwen3-vl-moe; the same seed gives a pair with equal "
                "vision towers and matched active FFN width",
        "out": "output folder (must not exist; written atomically)",
        "seed": "torch.manual_seed of the random weights",
        "size": "demo (the study in minutes on 2 cores) or test (smaller)"})
    p.set_defaults(fn=make_tiny_hf)


def info(args) -> int:
    result = model_info(args.preset)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_info(result))
    return 0


def presets(args) -> int:
    for name in sorted(PRESETS):
        print(f"{name:<22} {get_config(name).description}")
    return 0


def prompt_images(cfg, prompts: list[str], files: list[str], mode: str | None, seed: int,
                  folder=None):
    """(B, H, W, C) images for the prompts with '<image>' (zeros for the others), from `files`
    in prompt order, or random for a preset run without files; None for a text-only batch.
    mode native (a dynamic-resolution tower): each file through the model's processor
    (`folder`'s preprocessor_config.json, else Qwen3-VL's), all of one batch at one size."""
    wants = [IMAGE_TAG in p for p in prompts]
    if not any(wants):
        if files:
            raise ValueError(f"{len(files)} --image given but no prompt has {IMAGE_TAG}")
        return None
    if cfg.vision is None:
        raise ValueError(f"{cfg.name} is a text model; its prompts cannot hold {IMAGE_TAG}")
    v = cfg.vision
    shape = (len(prompts), v.image_size, v.image_size, v.channels)
    if not files:
        images = np.asarray(jax.random.normal(jax.random.key(seed), shape))
        return images * np.asarray(wants, np.float32)[:, None, None, None]
    if len(files) != sum(wants):
        raise ValueError(f"{sum(wants)} prompts hold {IMAGE_TAG} but {len(files)} --image "
                         "files were given; give one per such prompt, in order")
    mode = mode or ("native" if v.dynamic else "crop")
    if mode == "native":
        return native_images(cfg, wants, files, folder)
    images, it = np.zeros(shape, np.float32), iter(files)
    for i, w in enumerate(wants):
        if w:
            path = next(it)
            try:
                picture = Image.open(path)
            except OSError as e:
                raise ValueError(f"--image {path}: not a readable image ({e})") from e
            images[i] = preprocess(picture, v.image_size, v.image_mean, v.image_std, mode)
    return images


def native_images(cfg, wants: list[bool], files: list[str], folder=None) -> np.ndarray:
    """(B, H', W', C): each file at the size the model's own processor gives it (moex.data.
    qwen_images), zeros for prompts without an image; one size per batch (the tower runs the
    batch's images together)."""
    if not cfg.vision.dynamic:
        raise ValueError(f"--image-mode native needs a dynamic-resolution tower (Qwen3-VL); "
                         f"{cfg.name}'s takes {cfg.vision.image_size} px squares: use crop or pad")
    spec = spec_for(cfg.vision, folder)
    pixels = {}
    for path in files:
        try:
            pixels[path] = qwen_preprocess(Image.open(path), spec)[0]
        except OSError as e:
            raise ValueError(f"--image {path}: not a readable image ({e})") from e
    sizes = {p: a.shape[:2] for p, a in pixels.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the images of one batch must share a size after preprocessing, "
                         f"found {sizes}; generate them in separate calls, or use --image-mode "
                         f"crop / pad ({cfg.vision.image_size} px squares)")
    images, it = np.zeros((len(wants),) + next(iter(pixels.values())).shape, np.float32), iter(files)
    for i, w in enumerate(wants):
        if w:
            images[i] = pixels[next(it)]
    return images


def generate(args) -> int:
    loaded = checkpoint.load_model(args.model, args.seed, args.tokenizer)
    cfg, tok = loaded.cfg, loaded.tokenizer
    if isinstance(cfg, EncDecConfig):
        return generate_seq2seq(args, loaded)
    images = prompt_images(cfg, args.prompt, args.image, args.image_mode, args.seed,
                           loaded.checkpoint)
    n_img = 0 if cfg.vision is None else (cfg.vision.num_image_tokens if images is None else
                                          cfg.vision.tokens_for(*images.shape[1:3]))
    seqs = [tok.encode(p, num_image_tokens=n_img) for p in args.prompt]
    ids, mask = left_pad(seqs, tok.pad_id)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    engine = None
    if args.offload and args.mesh:
        raise ValueError("--offload runs the engine on one device; drop --mesh (README: "
                         "Choosing a mesh, offloading beside sharding)")
    if args.offload:
        spec, misses = parse_policy(args.offload), parse_misses(args.misses)
        store = ExpertStore.from_params(cfg, loaded.params, expert_dtype=args.expert_dtype,
                                        low_dtype=misses.low)
        forecaster = forecaster_for(spec, cfg, store, (ids, mask, images), args.max_new_tokens)
        budget = parse_budget(args.expert_budget, store.total_bytes)
        rule = None
        if not misses.plain:
            probe = OffloadEngine(cfg, None, "on-demand", store.expert_bytes, store=store)
            rule = MissRule(misses, probe.miss_costs())
        engine = OffloadEngine(cfg, None, spec.policy, budget, forecaster=forecaster, store=store,
                               lookahead=make_lookahead(spec), misses=rule,
                               quantized_slots=args.quantized_slots)
        out = engine.generate(ids, mask, images, max_new_tokens=args.max_new_tokens,
                              sampling=sampling)
    else:
        plan = sharding.plan_for(args.mesh)
        out = generator_for(cfg, plan)(shard_params(cfg, loaded.params, plan), ids, mask, images,
                                       max_new_tokens=args.max_new_tokens, sampling=sampling)
    extra = None if engine is None else {"forecast": getattr(engine.forecaster, "name", None),
                                         "lookahead": spec.lookahead,
                                         "miss_option": misses.label}
    return print_completions(args.prompt, out, tok, engine, extra)


def print_completions(prompts, out, tok, engine=None, extra=None) -> int:
    """One JSON line per prompt on stdout; with an offload engine its report (+ `extra`) and
    timings as one JSON line on stderr."""
    for p, row, n in zip(prompts, out.tokens, out.num_generated):
        print(json.dumps({"prompt": p, "completion": tok.decode(row[:n]),
                          "tokens": row[:n].tolist()}))
    if engine is not None:
        engine.calibrate_copy()
        report = engine.report()
        report.pop("per_layer")
        print(json.dumps({"offload": {**report, **(extra or {})}, **engine.timings}),
              file=sys.stderr)
    return 0


def generate_seq2seq(args, loaded) -> int:
    """An encoder-decoder: each prompt is the encoder's input (with EOS, right-padded, as T5
    tokenizers write it); the completion is what the decoder generates."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    for flag, value in (("--image", args.image), ("--mesh", args.mesh),
                        ("--misses", args.misses != "load"),
                        ("--expert-dtype", args.expert_dtype not in (None, "native")),
                        ("--quantized-slots", args.quantized_slots)):
        if value:
            raise ValueError(f"{flag} is not available for the encoder-decoder {cfg.name}")
    seqs = [tok.encode(p, bos=False) + [cfg.eos_token_id] for p in args.prompt]
    ids, mask = left_pad(seqs, cfg.pad_token_id, right=True)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    engine = None
    if args.offload:                   # encoder and decoder experts from host memory
        spec = parse_policy(args.offload)
        store = ExpertStore.from_params(cfg, loaded.params)
        engine = Seq2SeqOffloadEngine(cfg, None, spec.policy,
                                      parse_budget(args.expert_budget, store.total_bytes),
                                      forecaster=forecaster_for(spec, cfg, store,
                                                                (ids, mask, None),
                                                                args.max_new_tokens),
                                      store=store)
        out = engine.generate(ids, mask, max_new_tokens=args.max_new_tokens, sampling=sampling)
    else:
        out = Seq2SeqGenerator(cfg)(loaded.params, ids, mask,
                                    max_new_tokens=args.max_new_tokens, sampling=sampling)
    return print_completions(args.prompt, out, tok, engine)


def upcycle(args) -> int:
    if args.like:
        if args.to:
            raise ValueError("--like takes the whole MoE layout from a preset; drop --to")
        out = upcycle_checkpoint(args.src, args.out, like=get_config(args.like), seed=args.seed)
    else:
        if not args.to:
            raise ValueError("say what to upcycle to: --to hard or --to soft (or --like PRESET)")
        out = upcycle_checkpoint(args.src, args.out, from_args(UpcycleSpec, args),
                                 seed=args.seed)
    print(format_info(model_info(checkpoint.load_config(out))))
    print(f"wrote {out}")
    return 0


def convert(args) -> int:
    try:
        if args.to_hf:
            out = to_hf(args.src, args.out)
        else:
            out = convert_hf(args.src, args.out, args.dtype, progress=not args.quiet)
    except (CheckpointError, FileExistsError) as e:
        raise ValueError(str(e)) from e
    print(f"wrote {out}")
    return 0


def make_tiny_hf(args) -> int:
    try:
        return tiny_hf.main(from_args(TinyHFConfig, args))
    except FileExistsError as e:
        raise ValueError(str(e)) from e


def compare_hf(args) -> int:
    from checkpoints_convert.parity import main as parity_main   # needs torch + transformers
    return parity_main(args)
