"""moex checkpoints on disk: an orbax params tree plus the moex config, written atomically.

    OUT/
      config.json      moex VLMConfig or EncDecConfig (dataclasses as JSON; `kind` tells)
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
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from moex.config import PRESETS, EncDecConfig, VLMConfig, config_from_dict, get_config
from moex.data.vocab import tokenizer_for
from moex.model import init_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json")


def staging_dir(out: pathlib.Path) -> pathlib.Path:
    """A temp dir beside OUT (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def write(tmp: pathlib.Path, cfg: VLMConfig, params, metadata: dict | None = None,
          copy_from: pathlib.Path | None = None) -> None:
    """Write a checkpoint into an (empty) staging dir."""
    put = _chunk_writer(tmp, cfg, metadata, copy_from)
    for top, sub in params.items():
        for name, leaf in (sub.items() if isinstance(sub, dict) else [("", sub)]):
            put(f"{top}.{name}" if name else top, leaf)
    put.close()


class _chunk_writer:
    """Writes config.json, moex.json, tokenizer files and then params chunks one at a time;
    `close()` writes params/index.json."""

    def __init__(self, tmp: pathlib.Path, cfg: VLMConfig, metadata: dict | None,
                 copy_from: pathlib.Path | None):
        import orbax.checkpoint as ocp
        (tmp / "config.json").write_text(cfg.to_json())
        (tmp / "moex.json").write_text(json.dumps(metadata or {}, indent=2))
        self.root = (tmp / "params").absolute()
        self.root.mkdir()
        self.chunks, self.ckpt = [], ocp.StandardCheckpointer()
        if copy_from is not None:
            for name in TOKENIZER_FILES:
                if (copy_from / name).is_file():
                    shutil.copy2(copy_from / name, tmp / name)

    def __call__(self, chunk: str, value) -> None:
        """Save params chunk `chunk` ("decoder.layer_0"; "top" for a leaf at the top level)."""
        if chunk in self.chunks:
            raise ValueError(f"params chunk {chunk!r} written twice")
        self.ckpt.save(self.root / chunk, {"value": value})
        self.ckpt.wait_until_finished()
        self.chunks.append(chunk)

    def close(self) -> None:
        (self.root / "index.json").write_text(json.dumps({"format": "moex-params-v1",
                                                          "chunks": self.chunks}))


@contextlib.contextmanager
def writer(out, cfg: VLMConfig, metadata: dict | None = None, copy_from=None):
    """Write checkpoint OUT chunk by chunk (for models too big to hold twice): yields
    `write(chunk, value)`; OUT appears, complete, only when the block succeeds."""
    with staged(out) as tmp:
        put = _chunk_writer(tmp, cfg, metadata, copy_from and pathlib.Path(copy_from))
        yield put
        put.close()


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


def load_config(path) -> VLMConfig | EncDecConfig:
    path = pathlib.Path(path)
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path}: not a moex checkpoint (expected config.json and params/)")
    return config_from_dict(json.loads((path / "config.json").read_text()))


def chunk_names(path) -> list[str]:
    """The params chunks of checkpoint `path`, in the order they were written."""
    index = pathlib.Path(path).absolute() / "params" / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path}: not a moex checkpoint (no params/index.json)")
    return json.loads(index.read_text())["chunks"]


def load_chunk(path, chunk: str):
    """One params chunk of checkpoint `path` (numpy arrays)."""
    import orbax.checkpoint as ocp
    value = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute() / "params" / chunk)
    return jax.tree.map(np.asarray, value["value"])


def load(path, as_numpy: bool = False):
    """(cfg, params, tokenizer or None). Params come back as numpy (as_numpy) or jax arrays."""
    path = pathlib.Path(path)
    cfg = load_config(path)
    params = {}
    for chunk in chunk_names(path):
        value = load_chunk(path, chunk)
        top, _, name = chunk.partition(".")
        if name:
            params.setdefault(top, {})[name] = value
        else:
            params[top] = value
    if not as_numpy:
        params = jax.tree.map(jax.numpy.asarray, params)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return cfg, params, tokenizer


def metadata(path) -> dict:
    return json.loads((pathlib.Path(path) / "moex.json").read_text())


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: its config, params, tokenizer, and where it came from."""

    cfg: VLMConfig
    params: dict
    tokenizer: object                # moex.tokenizer ByteTokenizer / HFTextTokenizer
    source: str                      # "random weights (seed S)" or the checkpoint folder
    checkpoint: pathlib.Path | None = None


def load_model(source, seed: int = 0, tokenizer=None) -> LoadedModel:
    """A moex checkpoint folder (its weights and tokenizer.json), or a preset name (random
    weights from `seed`, the tokenizer its config names). `tokenizer`: a tokenizer.json to use
    instead (converted checkpoints saved without one)."""
    path = pathlib.Path(source)
    if (path / "config.json").is_file():
        cfg, params, _ = load(path)
        return LoadedModel(cfg, params, tokenizer_for(cfg, path, tokenizer), str(path), path)
    if str(source) in PRESETS:
        cfg = get_config(str(source))
        return LoadedModel(cfg, init_params(cfg, seed), tokenizer_for(cfg, None, tokenizer),
                           f"random weights (seed {seed})")
    raise FileNotFoundError(f"{source!r} is neither a moex checkpoint folder (no "
                            f"{path / 'config.json'}) nor a preset (`moex presets` lists them)")


def save_small(out, files: dict, params) -> pathlib.Path:
    """A small trained model (a predictor, a head set): OUT/<name> for each of `files`
    {name: text} + OUT/params (orbax, one item), staged in a temp dir and renamed into place."""
    import orbax.checkpoint as ocp
    with staged(out, replace=True) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save((tmp / "params").absolute(), params)
        ckpt.wait_until_finished()
    return pathlib.Path(out)


def load_small(path, marker: str, what: str, hint: str, parse, init):
    """(config, params) of a folder `save_small` wrote: `marker` names its config file, parsed
    by `parse(text)`; `init(config)` gives the params' structure (shapes only are used)."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(path)
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{path}: not a {what} (no {marker}; {hint})")
    cfg = parse((path / marker).read_text())
    like = jax.eval_shape(lambda: init(cfg))
    return cfg, ocp.StandardCheckpointer().restore((path / "params").absolute(), like)
