"""Arguments generated from a run dataclass read back into the same dataclass."""

import argparse
import dataclasses
from typing import Literal

import pytest

from moex.cli.args import add_fields, from_args


@dataclasses.dataclass(frozen=True)
class Run:
    preset: str = "small-hard"
    batch_sizes: tuple[int, ...] = (1, 4)
    checkpoints: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    train: bool = True
    verbose: bool = False
    mode: Literal["crop", "pad"] = "crop"
    limit: int | None = None
    lr: float = 1e-3


def parse(argv, **kw):
    p = argparse.ArgumentParser()
    add_fields(p, Run, **kw)
    return from_args(Run, p.parse_args(argv))


def test_defaults_round_trip():
    assert parse([]) == Run()


def test_every_kind_of_field():
    got = parse(["big", "--batch", "2", "8", "--checkpoint", "a", "--checkpoint", "b",
                 "--weights", "0.5", "1.5", "--no-train", "--verbose", "--mode", "pad",
                 "--limit", "3", "--lr", "0.1"], positional=("preset",),
                flags={"batch_sizes": "--batch", "checkpoints": "--checkpoint"},
                append=("checkpoints",))
    assert got == Run("big", (2, 8), ("a", "b"), (0.5, 1.5), False, True, "pad", 3, 0.1)


def test_bad_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse(["--mode", "stretch"])
    assert "invalid choice: 'stretch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--batch-sizes", "two"])
    assert "invalid int value: 'two'" in capsys.readouterr().err


def test_overrides_and_skipped_fields():
    p = argparse.ArgumentParser()
    add_fields(p, Run, skip=("lr",), defaults={"limit": 7})
    args = p.parse_args([])
    assert not hasattr(args, "lr") and args.limit == 7
    assert from_args(Run, args, mode="pad") == Run(limit=7, mode="pad")
