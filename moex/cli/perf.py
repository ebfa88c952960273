"""`moex perf`: the performance model (moex.perf).

    moex perf PRESET_OR_CHECKPOINT --hardware h200 --batch 1 8 --seq 1024 [--phase decode]
                                   [--trace TRACE.npz] [--offload 0.5] [--json]
    moex perf calibrate              microbenchmarks -> runs/perf/calibration.json ("cpu")
    moex perf validate               predicted vs measured prefill / decode of the small-* presets
    moex perf offload                offload projected per hardware (moex.experiments.projection)
    moex perf precision              quantized stores, low-precision and host-computed misses
                                     projected per hardware (moex.experiments.precision_projection)
    moex perf hardware               the hardware specs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from moex.checkpoint import load_config
from moex.config import PRESETS, get_config, require_decoder_lm
from moex.measure import write_outputs
from moex.cli.args import add_fields, from_args
from moex.experiments import precision_projection, projection
from moex.experiments.projection import ProjectConfig
from moex.offload.trace import Trace
from moex.perf.calibrate import CalibrationConfig, calibrate, write_calibration
from moex.perf.hardware import NAMES, calibration_path, get_hardware
from moex.perf.model import predict, roofline_table
from moex.perf.routing import routing_for
from moex.experiments.perf_validate import ValidateConfig, validate

SPECIAL = ("calibrate", "validate", "offload", "precision", "hardware")


def register(sub) -> None:
    p = sub.add_parser("perf", help="the performance model: roofline table of a preset on a "
                       "hardware spec; calibrate | validate | offload | hardware",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="PRESET_OR_CHECKPOINT",
                   help=f"a preset or moex checkpoint, or one of {', '.join(SPECIAL)}")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=run)


def config_of(target: str):
    if target in PRESETS:
        return require_decoder_lm(get_config(target), "the performance model")
    if not (pathlib.Path(target) / "config.json").is_file():
        raise ValueError(f"{target!r} is neither a preset nor a moex checkpoint folder; "
                         f"presets: {', '.join(sorted(PRESETS))}")
    return require_decoder_lm(load_config(target), "the performance model")


def _table_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moex perf PRESET")
    p.add_argument("--hardware", nargs="+", default=["h200"],
                   help=f"{', '.join(NAMES)} or a spec JSON file (default: h200)")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--seq", nargs="+", type=int, default=[1024],
                   help="prefill: tokens per row (image tokens included); decode: context")
    p.add_argument("--phase", nargs="+", default=["prefill", "decode"],
                   choices=["prefill", "decode"])
    p.add_argument("--trace", help="routing trace (.npz) for the distinct experts per batch "
                                   "(default: uniform routing)")
    p.add_argument("--offload", type=float, default=0.0,
                   help="fraction of the decoder's expert bytes streamed from the host per step")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    if args.target == "calibrate":
        p = argparse.ArgumentParser(prog="moex perf calibrate")
        add_fields(p, CalibrationConfig, flags={"rows": "--rows"},
                   help={"out": f"calibration file (default: {calibration_path()})"})
        cal = from_args(CalibrationConfig, p.parse_args(args.rest))
        path = write_calibration(calibrate(cal), cal.out or None)
        print(f"wrote {path}")
        return 0
    if args.target == "validate":
        p = argparse.ArgumentParser(prog="moex perf validate")
        add_fields(p, ValidateConfig, flags={"batch_sizes": "--batch", "seq_lens": "--seq"})
        p.add_argument("--hardware", default="cpu", help="calibrated spec (default: cpu)")
        a = p.parse_args(args.rest)
        if a.hardware == "cpu" and not calibration_path().exists():
            write_calibration(calibrate())
        _, report = validate(from_args(ValidateConfig, a), get_hardware(a.hardware))
        print(report)
        return 0
    if args.target == "precision":
        return _precision(args.rest)
    if args.target == "offload":
        p = argparse.ArgumentParser(prog="moex perf offload")
        add_fields(p, ProjectConfig, flags={"offload_hardware": "--hardware",
                                            "offload_batches": "--batch"},
                   skip=("hardware", "presets", "batch_sizes", "seq_lens"),
                   help={"trace": "routing trace (.npz) recorded on a trained hard-MoE model "
                                  "(moex lm trace / moex vlm trace)"})
        cfg = from_args(ProjectConfig, p.parse_args(args.rest))
        if not cfg.trace:
            raise ValueError("moex perf offload needs --trace: a routing trace of a trained "
                             "hard-MoE model (moex vlm trace, moex lm trace)")
        rows = projection.offload_rows(cfg, Trace.load(cfg.trace))
        print(projection.offload_md(rows))
        return 0
    if args.target == "hardware":
        for name in NAMES:
            print(json.dumps(get_hardware(name).as_dict()))
        return 0
    a = _table_parser().parse_args(args.rest)
    cfg = config_of(args.target)
    routing = routing_for(cfg.decoder.moe, Trace.load(a.trace)) if a.trace else None
    out = []
    for hw_name in a.hardware:
        hw = get_hardware(hw_name)
        for phase in a.phase:
            for b in a.batch:
                for s in a.seq:
                    p = predict(cfg, hw, phase, b, s, routing, offload=a.offload)
                    out.append(p.as_dict() if a.json else roofline_table(p))
    print(json.dumps(out, indent=2) if a.json else "\n\n".join(out))
    return 0


def _precision(rest) -> int:
    p = argparse.ArgumentParser(prog="moex perf precision")
    add_fields(p, precision_projection.PrecisionConfig, flags={"batches": "--batch"}, help={
        "trace": "routing trace (.npz) recorded on a trained hard-MoE model (moex vlm trace / "
                 "moex lm trace)",
        "variants": "EXPERT_DTYPE/MISSES: native|int8|int4[:G] / load|low[:FMT][+upgrade]|"
                    "host|low+host"})
    cfg = from_args(precision_projection.PrecisionConfig, p.parse_args(rest))
    if not cfg.trace:
        raise ValueError("moex perf precision needs --trace: a routing trace of a trained "
                         "hard-MoE model (moex vlm trace, moex lm trace)")
    for v in cfg.variants:
        precision_projection.parse_variant(v)
    rows = precision_projection.rows_for(cfg, Trace.load(cfg.trace))
    out = write_outputs(cfg.out, rows, dataclasses.asdict(cfg),
                        "# PROJECTED (performance model, not measured): moving fewer bytes\n\n"
                        f"Routing trace: {cfg.trace}.\n\n" + precision_projection.section(rows))
    print(precision_projection.findings(rows))
    print(f"\nwrote {out}/results.csv, results.json, report.md")
    return 0
