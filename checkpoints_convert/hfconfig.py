"""config.json as the converters read it: a dict that names its file and key path in errors.

`HFConfig` is a `dict` (JSON-serialisable; `dict(cfg)`, `.get`, `in` work as usual) whose nested
objects are HFConfig views too, each knowing the file and its key path (`text_config`,
`text_config.rope_parameters`). Reading a field checks it:

    cfg["hidden_size"]           missing or null          -> CheckpointError (field, file)
    cfg["hidden_size"], .get()   value of the wrong type  -> CheckpointError (field, file, the
                                                             expected type, the value found)

against FIELDS, the types HF writes for the fields the architecture tables read (a field not in
FIELDS is returned unchecked). Counts that cannot be 0 (sizes, layers, heads, experts) must be
>= 1; a bool is never accepted as a number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Callable


class CheckpointError(ValueError):
    """A checkpoint cannot be converted; the message names the file, key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Field:
    what: str                          # "an integer >= 1": the expected type, for messages
    accepts: Callable[[object], bool]
    null: bool = False                 # JSON null allowed (HF writes it; the reader has a default)

    def describe(self) -> str:
        return self.what + (" or null" if self.null else "")

    def check(self, value) -> bool:
        return (value is None and self.null) or (value is not None and self.accepts(value))


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def count(null: bool = False) -> Field:
    """Sizes, layers, heads, experts: 0 makes no sense."""
    return Field("an integer >= 1", lambda v: _int(v) and v >= 1, null)


def index(null: bool = False) -> Field:
    return Field("an integer >= 0", lambda v: _int(v) and v >= 0, null)


def integer(null: bool = False) -> Field:
    return Field("an integer", _int, null)


def positive(null: bool = False) -> Field:
    return Field("a number > 0", lambda v: _num(v) and v > 0, null)


def nonnegative(null: bool = False) -> Field:
    return Field("a number >= 0", lambda v: _num(v) and v >= 0, null)


def flag(null: bool = False) -> Field:
    return Field("true or false", lambda v: isinstance(v, bool), null)


def text(null: bool = False) -> Field:
    return Field("a string", lambda v: isinstance(v, str), null)


def obj(null: bool = False) -> Field:
    return Field("an object", lambda v: isinstance(v, dict), null)


def indices(length: int | None = None, null: bool = False) -> Field:
    n = f"{length} " if length else ""
    return Field(f"a list of {n}integers >= 0",
                 lambda v: isinstance(v, list) and (length is None or len(v) == length)
                 and all(_int(x) and x >= 0 for x in v), null)


def int_or_ints(null: bool = False) -> Field:
    return Field("an integer or a list of integers",
                 lambda v: _int(v) or (isinstance(v, list) and all(_int(x) for x in v)), null)


NAMES = Field("a non-empty list of strings",
              lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v))

# Field name (at any nesting) -> what HF writes there. null where HF writes it and the
# architecture tables fall back to a default (`_get(hf, key, default)`, `bool(...)`, `or`).
FIELDS: dict[str, Field] = {
    # the decoder (top level, or text_config)
    "hidden_size": count(), "num_hidden_layers": count(), "num_attention_heads": count(),
    "num_key_value_heads": count(null=True), "intermediate_size": count(),
    "vocab_size": count(), "head_dim": count(null=True),
    "max_position_embeddings": count(), "sliding_window": count(null=True),
    "rms_norm_eps": positive(), "layer_norm_eps": positive(),
    "rope_theta": positive(), "rope_parameters": obj(null=True), "rope_scaling": obj(null=True),
    "rope_type": text(), "type": text(),
    "mrope_section": indices(length=3), "mrope_interleaved": flag(),
    "tie_word_embeddings": flag(null=True), "attention_bias": flag(null=True),
    "mlp_bias": flag(null=True), "qkv_bias": flag(), "use_sliding_window": flag(null=True),
    "clip_qkv": positive(null=True), "hidden_act": text(), "model_type": text(),
    "architectures": NAMES, "dtype": text(null=True), "torch_dtype": text(null=True),
    "pad_token_id": integer(null=True), "bos_token_id": int_or_ints(null=True),
    "eos_token_id": int_or_ints(null=True),
    # MoE blocks
    "num_local_experts": count(), "num_experts": count(null=True),
    "num_experts_per_tok": count(), "moe_intermediate_size": count(),
    "shared_expert_intermediate_size": count(), "decoder_sparse_step": count(null=True),
    "mlp_only_layers": indices(null=True), "norm_topk_prob": flag(null=True),
    # DeepSeek-V2: MLA and grouped routing
    "n_routed_experts": count(), "n_shared_experts": index(null=True),
    "first_k_dense_replace": index(null=True), "routed_scaling_factor": positive(null=True),
    "topk_method": text(), "n_group": count(null=True), "topk_group": count(null=True),
    "q_lora_rank": count(null=True), "kv_lora_rank": count(), "qk_rope_head_dim": count(),
    "qk_nope_head_dim": count(), "v_head_dim": count(),
    # vision-language models: the parts, the vision tower (CLIP; Qwen3-VL), token ids
    "text_config": obj(), "vision_config": obj(),
    "image_size": count(), "patch_size": count(), "num_channels": count(),
    "depth": count(), "num_heads": count(), "in_channels": count(),
    "temporal_patch_size": count(), "spatial_merge_size": count(), "out_hidden_size": count(),
    "num_position_embeddings": count(), "deepstack_visual_indexes": indices(),
    "vision_feature_layer": int_or_ints(), "vision_feature_select_strategy": text(),
    "projector_hidden_act": text(), "multimodal_projector_bias": flag(),
    "image_token_index": index(), "image_token_id": index(), "video_token_id": index(),
    "vision_start_token_id": index(), "vision_end_token_id": index(),
    # encoder-decoders (Switch Transformers / T5): sizes, stacks, relative positions, routers
    "d_model": count(), "d_kv": count(), "d_ff": count(), "num_layers": count(),
    "num_decoder_layers": count(null=True), "num_sparse_encoder_layers": index(),
    "num_sparse_decoder_layers": index(), "expert_capacity": count(),
    "router_bias": flag(), "router_jitter_noise": nonnegative(), "router_dtype": text(),
    "router_z_loss_coef": nonnegative(), "router_aux_loss_coef": nonnegative(),
    "relative_attention_num_buckets": count(), "relative_attention_max_distance": count(),
    "layer_norm_epsilon": positive(), "dense_act_fn": text(),
    "decoder_start_token_id": integer(null=True),
}

# The tables read some fields under either of two names (`get(a) or cfg[b]`); the message of a
# missing field names both when the other was looked for too.
ALTERNATIVES = {"num_local_experts": "num_experts", "num_experts": "num_local_experts",
                "image_token_index": "image_token_id", "image_token_id": "image_token_index",
                "rope_parameters": "rope_scaling", "rope_scaling": "rope_parameters"}


def _json(value) -> str:
    kind = {bool: "a boolean", str: "a string", int: "an integer", float: "a number",
            list: "a list", type(None): "null"}.get(type(value), "an object")
    shown = json.dumps(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({kind})"


class HFConfig(dict):
    """A config.json object that names its file and key path when a field is missing or
    mistyped (see the module docstring). `purpose` (e.g. the architecture) is added to the
    message of a missing field; it is shared by the nested views of one file."""

    def __init__(self, data: dict, file, path: str = "", _shared: dict | None = None):
        self._shared = _shared if _shared is not None else {"file": str(file), "purpose": None}
        self.path = path
        self._absent: set = set()          # keys `get` found missing or null
        super().__init__((k, HFConfig(v, file, self.where(k), self._shared)
                          if isinstance(v, dict) else v) for k, v in data.items())

    @classmethod
    def load(cls, file) -> "HFConfig":
        try:
            data = json.loads(pathlib.Path(file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable JSON file ({e})") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: expected a JSON object, found {_json(data)}")
        return cls(data, file)

    @property
    def file(self) -> str:
        return self._shared["file"]

    @property
    def purpose(self) -> str | None:
        return self._shared["purpose"]

    @purpose.setter
    def purpose(self, value: str | None) -> None:
        self._shared["purpose"] = value

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def __getitem__(self, key):
        value = dict.get(self, key)
        if value is None:
            if key in self:
                need = f" for {self.purpose}" if self.purpose else ""
                raise CheckpointError(f"{self.file}: field {self.where(key)!r} is null; a value "
                                      f"is needed{need}")
            # the other spelling, if the reader looked for it first (`get(a) or cfg[b]`)
            other = ALTERNATIVES.get(key)
            also = f" or {self.where(other)!r}" if other in self._absent else ""
            need = f" (needed for {self.purpose})" if self.purpose else ""
            raise CheckpointError(f"{self.file}: missing field {self.where(key)!r}{also}{need}")
        return self._checked(key, value)

    def get(self, key, default=None):
        if dict.get(self, key) is None:
            self._absent.add(key)
        if key not in self:
            return default
        return self._checked(key, dict.__getitem__(self, key))

    def _checked(self, key, value):
        field = FIELDS.get(key)
        if field is not None and not field.check(value):
            raise CheckpointError(f"{self.file}: field {self.where(key)!r} must be "
                                  f"{field.describe()}, found {_json(value)}")
        return value
