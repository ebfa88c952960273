"""Bad config.json fields fail clearly, for every architecture of tests.hf_models.ARCHS.

Each field of the tiny model's config.json (every key path, nested ones too) is dropped, set to
null and set to values of the wrong type, and the folder is opened with `open_source`. Allowed
outcomes: a CheckpointError whose message names the field path and the config.json file; or
success, where a mistyped value must leave the moex config unchanged (the field is not read) --
never KeyError / TypeError / AttributeError, never a silently misread value.
"""

import json
import shutil

import pytest

from checkpoints_convert.convert import convert, open_source
from checkpoints_convert.hfconfig import FIELDS
from checkpoints_convert.reader import CheckpointError
from tests.hf_models import ARCHS

# fields every decoder needs (at the top level, or under text_config)
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size")
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")
ALTERNATIVE = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}
MISSING = object()


def key_paths(cfg, prefix=()):
    for k, v in cfg.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from key_paths(v, prefix + (k,))


def lookup(cfg, path):
    for k in path:
        cfg = cfg[k]
    return cfg


def with_value(cfg, path, value):
    """A deep copy of cfg with `path` set to value (MISSING: dropped)."""
    out = json.loads(json.dumps(cfg))
    parent = lookup(out, path[:-1])
    if value is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def wrong_values(value):
    """Values of the wrong type for a field holding `value`."""
    if isinstance(value, bool):
        return [1, "true"]
    if isinstance(value, int):
        return [str(value), 2.5, True]
    if isinstance(value, float):
        return [str(value), True]
    if isinstance(value, str):
        return [5]
    if isinstance(value, list):
        return ["x", [True]]
    if isinstance(value, dict):
        return ["x", []]
    return []


def required_paths(cfg):
    base = ("text_config",) if "text_config" in cfg else ()
    text = lookup(cfg, base)
    names = REQUIRED + tuple(k for k in EXPERT_COUNTS if k in text
                             and ALTERNATIVE.get(k) not in text)
    out = {base + (k,) for k in names if k in text} | {("architectures",)}
    if base:
        out |= {("text_config",), ("vision_config",), ("vision_config", "hidden_size")}
    return out


@pytest.fixture
def folder(tmp_path):
    """folder(name) -> (tmp copy of hf_model(name) with the weights symlinked, its config)."""
    def make(src):
        dst = tmp_path / "src"
        dst.mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (dst / f.name).symlink_to(f)
        return dst, json.loads((src / "config.json").read_text())
    return make


def outcome(src, cfg):
    (src / "config.json").write_text(json.dumps(cfg))
    try:
        return open_source(src)[2]
    except CheckpointError as e:
        return e


@pytest.mark.parametrize("name", ARCHS)
def test_every_missing_or_mistyped_field_is_named(name, hf_model, folder):
    src, cfg = folder(hf_model(name))
    config_json = str(src / "config.json")
    reference = outcome(src, cfg)
    assert not isinstance(reference, Exception), reference
    required = required_paths(cfg)
    failures, checked = [], 0

    def check(path, value, must_raise):
        nonlocal checked
        dotted = ".".join(path)
        what = "dropped" if value is MISSING else f"= {json.dumps(value)}"
        try:
            got = outcome(src, with_value(cfg, path, value))
        except Exception as e:              # KeyError, TypeError, ...: not a clear error
            failures.append(f"{dotted} {what}: {type(e).__name__}: {e}")
            return
        checked += 1
        if isinstance(got, CheckpointError):
            msg = str(got)
            if f"'{dotted}'" not in msg or config_json not in msg:
                failures.append(f"{dotted} {what}: message does not name the field and the "
                                f"file: {msg}")
        elif must_raise:
            failures.append(f"{dotted} {what}: accepted")
        elif value is not MISSING and value is not None and got != reference:
            failures.append(f"{dotted} {what}: accepted and changed the config")

    for path in key_paths(cfg):
        value = lookup(cfg, path)
        req = path in required
        check(path, MISSING, req)
        check(path, None, req)
        for wrong in wrong_values(value):
            # a number field (rope_theta) may legitimately hold 2.5 where the file has an int
            float_ok = wrong == 2.5 and path[-1] in FIELDS and FIELDS[path[-1]].check(2.5)
            if not float_ok:
                check(path, wrong, req)
        if req and isinstance(value, int) and not isinstance(value, bool):
            check(path, 0, True)
    assert not failures, f"{name}: {len(failures)} of {checked} cases:\n" + "\n".join(failures)
    assert checked > 4 * len(required)


def test_convert_of_a_broken_config_leaves_no_output(hf_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model("mixtral"), src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_local_experts"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        convert(src, tmp_path / "out", "fp32", progress=False)
    msg = str(err.value)
    assert "missing field 'num_local_experts'" in msg and str(src / "config.json") in msg
    assert "MixtralForCausalLM" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]     # no out, no .out.tmp-*
