"""Command-line arguments generated from a run's frozen dataclass, and the dataclass read back.

    add_fields(parser, OffloadBenchConfig, help={"preset": "..."}, flags={"batch_sizes": "--batch"})
    grid = from_args(OffloadBenchConfig, args)

Each field becomes one option (or a positional, with `positional`), named `--field-name` unless
`flags` renames it, with the field's default:
    int / float / str          type and default
    X | None                   type X, default None
    tuple[X, ...]              nargs "+" (or `nargs[field]`, or repeated with `append`), each
                               value an X; read back as a tuple
    bool, default False        --flag sets it; default True: --no-flag clears it
    Literal["a", "b"]          choices
Help texts live with the command (they describe the command line); defaults live in one place,
the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _unwrap(tp):
    """(base type, optional) of an annotation: `int | None` -> (int, True)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_fields(p: argparse.ArgumentParser, cls, *, help: dict | None = None,
               flags: dict | None = None, nargs: dict | None = None,
               positional: tuple[str, ...] = (), skip: tuple[str, ...] = (),
               defaults: dict | None = None, append: tuple[str, ...] = ()) -> None:
    """One argument per field of dataclass `cls` (see the module docstring). `defaults` overrides
    a field's default on this command line only (e.g. a field the dataclass requires); a tuple
    field in `append` is given once per value (--checkpoint A --checkpoint B)."""
    help, flags, nargs, defaults = help or {}, flags or {}, nargs or {}, defaults or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base, optional = _unwrap(hints[f.name])
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = None
        kw = {"help": help.get(f.name, "")}
        if not (default is None or isinstance(default, bool) or default in ((), "")):
            kw["help"] = (kw["help"] + " " if kw["help"] else "") + "(default: %(default)s)"
        name = f.name if f.name in positional else flags.get(
            f.name, "--" + f.name.replace("_", "-"))
        if f.name not in positional:
            kw["metavar"] = name.lstrip("-").replace("-", "_").upper()
        if base is bool:
            if f.name in positional:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool cannot be positional")
            if default:
                name = flags.get(f.name, "--no-" + f.name.replace("_", "-"))
            kw.pop("metavar")
            p.add_argument(name, dest=f.name, action="store_false" if default else "store_true",
                           **kw)
            continue
        if typing.get_origin(base) is tuple and f.name in append:
            p.add_argument(name, dest=f.name, action="append", type=typing.get_args(base)[0],
                           default=[], **kw)
            continue
        if typing.get_origin(base) is tuple:
            kw["nargs"] = nargs.get(f.name, "+")
            base = typing.get_args(base)[0]
            default = list(default) if default is not None else None
        if typing.get_origin(base) is typing.Literal:
            kw["choices"] = list(typing.get_args(base))
            kw.pop("metavar", None)
            base = type(kw["choices"][0])
        if f.name in positional:
            if default is not None or optional:
                kw["nargs"] = kw.get("nargs", "?")
            p.add_argument(name, type=base, default=default, **kw)
        else:
            p.add_argument(name, dest=f.name, type=base, default=default,
                           required=default is None and not optional and
                           f.default is dataclasses.MISSING, **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass `cls` from parsed arguments (tuple fields back to tuples)."""
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            v = getattr(args, f.name)
            base, _ = _unwrap(hints[f.name])
            values[f.name] = tuple(v) if typing.get_origin(base) is tuple and v is not None else v
    return cls(**values)
