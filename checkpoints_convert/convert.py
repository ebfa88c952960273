"""HF folder -> moex checkpoint, streamed one tensor at a time.

    python -m checkpoints_convert SRC OUT [--dtype bf16|fp32]

The arrays of the output are the only thing accumulated; each source tensor is read (memory-
mapped), transformed and cast, then dropped. OUT is written to a temp dir beside it and renamed
only when everything succeeded.
"""

from __future__ import annotations

import pathlib
import re
import shutil

import jax
import numpy as np

from moex import checkpoint
from moex.model import abstract_params

from checkpoints_convert.archs import architecture_of, fused_expert_rules
from checkpoints_convert.mapping import Rule
from checkpoints_convert.reader import CheckpointError, CheckpointReader

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}


def open_source(src) -> tuple:
    """(reader, architecture, moex config) for a HF folder, with canonical key aliases."""
    src = pathlib.Path(src)
    probe = CheckpointReader(src)
    where = probe.config.file
    probe.config["architectures"]          # missing, null or not a list of names: named here
    arch = architecture_of(probe.config, where)
    reader = CheckpointReader(src, arch.aliases) if arch.aliases else probe
    reader.config.purpose = arch.name      # named in the message of a missing field
    try:
        cfg = arch.to_moex(reader.config).replace(name=src.name)
    except CheckpointError as e:           # the tables' own checks name the field, not the file
        if where in str(e):
            raise
        raise CheckpointError(f"{where}: {e}") from e
    except ValueError as e:                # moex's config checks (e.g. top_k > num_experts)
        raise CheckpointError(f"{where}: no valid {arch.name} model: {e}") from e
    return reader, arch, cfg


def resolve_rules(rules: list[Rule], reader: CheckpointReader) -> list[Rule]:
    """Pick the per-expert or the fused layout for each expert group, by what the files hold."""
    out, skip = [], set()
    for r in rules:
        if r.moex[0] in skip:
            continue
        if r.alt and not all(k in reader for k in r.hf) and \
                all(k in reader for a in r.alt for k in a.hf):
            out += r.alt
            continue
        if r.moex[0].endswith("experts/w_gate") and r.hf[0] not in reader:
            fused = fused_expert_rules(r)
            if fused and all(k in reader for f in fused for k in f.hf):
                out += fused
                base = r.moex[0].rsplit("/", 1)[0]
                skip |= {base + "/w_up", base + "/w_down"}
                continue
        out.append(r)
    return out


def check_keys(rules: list[Rule], reader: CheckpointReader, ignore: tuple[str, ...]) -> None:
    wanted = [k for r in rules for k in r.hf]
    missing = [k for k in wanted if k not in reader]
    if missing:
        files = ", ".join(f.name for f in reader.files)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more}: not found in {files} "
                              f"under {reader.src}")
    extra = sorted(k for k in reader.keys() - set(wanted)
                   if not any(re.match(p, k) for p in ignore))
    if extra:
        raise CheckpointError(f"{len(extra)} tensors in {reader.src} map to no moex parameter, "
                              f"e.g. {extra[:3]} in {reader.file_of(extra[0]).name}; the config "
                              "and the weights disagree")


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, a in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = a
    return tree


def flat_shapes(tree) -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def convert_params(reader, arch, cfg, dtype: str, progress: bool = False) -> dict:
    """Read, transform and cast every tensor; returns the nested numpy params."""
    from tqdm import tqdm
    rules = resolve_rules(arch.rules(cfg), reader)
    expected = flat_shapes(abstract_params(cfg))
    covered = {p for r in rules for p in r.moex}
    if covered != set(expected):
        raise CheckpointError(f"internal mapping error for {arch.name}: moex params without a "
                              f"rule {sorted(set(expected) - covered)[:3]}, rules without a "
                              f"param {sorted(covered - set(expected))[:3]}")
    check_keys(rules, reader, arch.ignore)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    flat = {}
    for rule in tqdm(rules, desc="convert", disable=not progress, unit="tensor"):
        try:
            arrays = rule.transform.to_moex(reader.get, rule.hf)
        except CheckpointError as e:
            where = reader.file_of(rule.hf[0])
            raise (e if str(where) in str(e) else CheckpointError(f"{where}: {e}")) from None
        for path, a in zip(rule.moex, arrays):
            want = tuple(expected[path].shape)
            if a.shape != want:
                key = rule.hf[0]
                raise CheckpointError(
                    f"{key} in {reader.file_of(key).name}: shape mismatch for moex {path}: "
                    f"config.json implies {want}, the checkpoint gives {tuple(a.shape)} "
                    f"(stored tensor shape {reader.shape(key)})")
            # one copy into a jax array now, so that saving needs no second copy of the tree
            flat[path] = jax.numpy.asarray(a, dtype=np_dtype)
        del arrays
    return unflatten(flat)


def convert(src, out, dtype: str | None = None, progress: bool = True) -> pathlib.Path:
    """Convert HF folder SRC into moex checkpoint OUT. OUT does not exist afterwards on failure."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    reader, arch, cfg = open_source(src)
    dtype = DTYPES.get(dtype or reader.dtype(), "float32")
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = convert_params(reader, arch, cfg, dtype, progress)
    meta = {"source": str(src.resolve()), "architecture": arch.name, "hf_config": reader.config,
            "dtype": dtype}
    if arch.options is not None:
        meta["rules_options"] = arch.options(reader, cfg)
    tmp = checkpoint.staging_dir(out)
    try:
        checkpoint.write(tmp, cfg, params, meta, src)
        checkpoint.publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
