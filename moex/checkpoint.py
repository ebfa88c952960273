"""moex checkpoints on disk: an orbax params tree plus the moex config, written atomically.

    OUT/
      config.json      moex VLMConfig (dataclasses as JSON)
      params/          the params pytree as orbax checkpoints, one per second-level subtree
                       (decoder/layer_0, decoder/embed, vision/..., listed in params/index.json):
                       saved one after another, so saving never holds a second copy of the
                       whole tree
      moex.json        metadata: source architecture, original HF config, dtype
      tokenizer.json   ... (copied from the source, if it had them)

    cfg, params, tokenizer = load(OUT)     # tokenizer: tokenizers.Tokenizer or None
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from moex.config import VLMConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.json", "preprocessor_config.json", "processor_config.json")


def staging_dir(out: pathlib.Path) -> pathlib.Path:
    """A temp dir beside OUT (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def write(tmp: pathlib.Path, cfg: VLMConfig, params, metadata: dict | None = None,
          copy_from: pathlib.Path | None = None) -> None:
    """Write a checkpoint into an (empty) staging dir."""
    import orbax.checkpoint as ocp
    (tmp / "config.json").write_text(cfg.to_json())
    (tmp / "moex.json").write_text(json.dumps(metadata or {}, indent=2))
    root = (tmp / "params").absolute()
    root.mkdir()
    chunks = []
    ckpt = ocp.StandardCheckpointer()
    for top, sub in params.items():
        for name, leaf in (sub.items() if isinstance(sub, dict) else [("", sub)]):
            chunk = f"{top}.{name}" if name else top
            ckpt.save(root / chunk, {"value": leaf})
            ckpt.wait_until_finished()
            chunks.append(chunk)
    (root / "index.json").write_text(json.dumps({"format": "moex-params-v1", "chunks": chunks}))
    if copy_from is not None:
        for name in TOKENIZER_FILES:
            if (copy_from / name).is_file():
                shutil.copy2(copy_from / name, tmp / name)


def publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    os.replace(tmp, out)


@contextlib.contextmanager
def staged(out, replace: bool = False):
    """Yield a staging dir beside OUT; when the block succeeds it becomes OUT (an existing OUT is
    replaced if `replace`, else refused), when it fails it is removed: OUT is never half-written."""
    out = pathlib.Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    tmp = staging_dir(out)
    try:
        yield tmp
        if replace and out.exists():
            shutil.rmtree(out)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(out, cfg: VLMConfig, params, metadata: dict | None = None, copy_from=None) -> pathlib.Path:
    with staged(out) as tmp:
        write(tmp, cfg, params, metadata, copy_from and pathlib.Path(copy_from))
    return pathlib.Path(out)


def load_config(path) -> VLMConfig:
    path = pathlib.Path(path)
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path}: not a moex checkpoint (expected config.json and params/)")
    return VLMConfig.from_json((path / "config.json").read_text())


def load(path, as_numpy: bool = False):
    """(cfg, params, tokenizer or None). Params come back as numpy (as_numpy) or jax arrays."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(path)
    cfg = load_config(path)
    root = (path / "params").absolute()
    index = json.loads((root / "index.json").read_text())
    ckpt, params = ocp.StandardCheckpointer(), {}
    for chunk in index["chunks"]:
        value = ckpt.restore(root / chunk)["value"]
        top, _, name = chunk.partition(".")
        if name:
            params.setdefault(top, {})[name] = value
        else:
            params[top] = value
    params = jax.tree.map(np.asarray, params) if as_numpy else jax.tree.map(jax.numpy.asarray, params)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return cfg, params, tokenizer


def metadata(path) -> dict:
    return json.loads((pathlib.Path(path) / "moex.json").read_text())
