"""Read a HuggingFace checkpoint folder one tensor at a time.

Layouts: `model.safetensors`; sharded `model-0000x-of-0000y.safetensors` with
`model.safetensors.index.json`; `pytorch_model.bin` / sharded `.bin` with
`pytorch_model.bin.index.json` (through torch, memory-mapped, weights only). safetensors files are
memory-mapped by the safetensors library, so a tensor costs memory only once it is read.

`config` is config.json as an `HFConfig` (checkpoints_convert.hfconfig): a dict whose missing or
mistyped fields raise CheckpointError naming the field and the file when read.

`aliases` (regex, replacement) rewrite keys into one canonical spelling (the one `save_pretrained` writes), so
hub checkpoints of older and newer transformers versions map through the same tables.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

# CheckpointError is defined beside HFConfig; import it from here (checkpoints_convert.reader)
from checkpoints_convert.hfconfig import CheckpointError, HFConfig


class CheckpointReader:
    def __init__(self, src: str | pathlib.Path, aliases: tuple[tuple[str, str], ...] = ()):
        self.src = pathlib.Path(src)
        self.aliases = aliases
        if not (self.src / "config.json").is_file():
            raise CheckpointError(f"{self.src}: no config.json; expected a HuggingFace model folder")
        # a dict; a missing or mistyped field read from it raises CheckpointError naming it
        self.config = HFConfig.load(self.src / "config.json")
        self._file_of: dict[str, pathlib.Path] = {}   # canonical key -> file
        self._raw_key: dict[str, str] = {}            # canonical key -> key in the file
        self._open: dict[pathlib.Path, object] = {}
        self._scan()

    # -- discovery --------------------------------------------------------------------------------
    def _scan(self) -> None:
        st = sorted(self.src.glob("*.safetensors"))
        bins = sorted(self.src.glob("pytorch_model*.bin"))
        index = self.src / "model.safetensors.index.json"
        bin_index = self.src / "pytorch_model.bin.index.json"
        if index.is_file():
            self._add_index(index)
        elif st:
            for f in st:
                for k in self._safetensors(f).keys():
                    self._add(k, f)
        elif bin_index.is_file():
            self._add_index(bin_index)
        elif bins:
            for f in bins:
                for k in self._torch(f).keys():
                    self._add(k, f)
        else:
            raise CheckpointError(f"{self.src}: no *.safetensors or pytorch_model*.bin files")
        self.files = sorted(set(self._file_of.values()))

    def _add_index(self, index: pathlib.Path) -> None:
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        for k, f in weight_map.items():
            path = self.src / f
            if not path.is_file():
                raise CheckpointError(f"{index}: tensor {k!r} is mapped to {f}, which does not exist")
            self._add(k, path)

    def _add(self, key: str, path: pathlib.Path) -> None:
        canon = self.canonical(key)
        self._file_of[canon] = path
        self._raw_key[canon] = key

    def canonical(self, key: str) -> str:
        for pattern, repl in self.aliases:
            new, n = re.subn(pattern, repl, key, count=1)
            if n:
                return new
        return key

    # -- file handles -----------------------------------------------------------------------------
    def _safetensors(self, path: pathlib.Path):
        """A fresh memory map of the file. Not cached: dropping it after each tensor unmaps the
        pages read, so the source does not stay resident next to the output."""
        from safetensors import safe_open
        try:
            return safe_open(str(path), framework="np")
        except Exception as e:  # truncated or corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file "
                                  "may be truncated or corrupt -- download it again") from e

    def _torch(self, path: pathlib.Path):
        if path not in self._open:
            import torch
            try:
                self._open[path] = torch.load(str(path), map_location="cpu", mmap=True,
                                              weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
        return self._open[path]

    # -- reading ----------------------------------------------------------------------------------
    def keys(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> pathlib.Path:
        return self._file_of[key]

    def get(self, key: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bf16 via ml_dtypes)."""
        if key not in self._file_of:
            where = ", ".join(f.name for f in self.files)
            raise CheckpointError(f"missing tensor {key!r}: not in {where} (in {self.src})")
        path, raw = self._file_of[key], self._raw_key[key]
        if path.suffix == ".safetensors":
            handle = self._safetensors(path)
            try:
                return handle.get_tensor(raw)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {raw!r} ({e}); the file may "
                                      "be truncated") from e
        t = self._torch(path)[raw]
        import torch
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def shape(self, key: str) -> tuple[int, ...]:
        """One tensor's stored shape, from the file's header (no tensor data is read)."""
        if key not in self._file_of:
            return self.get(key).shape                 # raises the missing-tensor error
        path, raw = self._file_of[key], self._raw_key[key]
        if path.suffix == ".safetensors":
            return tuple(self._safetensors(path).get_slice(raw).get_shape())
        return tuple(self._torch(path)[raw].shape)

    def dtype(self) -> str:
        """The checkpoint's float dtype: config's `dtype` / `torch_dtype`, else the first tensor's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and name in ("float32", "bfloat16", "float16"):
            return name
        return self.get(sorted(self._file_of)[0]).dtype.name
