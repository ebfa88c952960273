"""Text that exists on every machine with Python, in two domains, as byte sequences.

  code   the Python standard library's source: each module with its docstrings and comments
         removed (what is left is code)
  prose  the English of the same modules' docstrings and comments

Files come from the running interpreter's stdlib directory (`sysconfig` "stdlib"), sorted, without
tests, idlelib, site-packages or encodings; each file goes to the held-out split when a hash of
its relative path says so (10%), so both splits are stable across runs and machines with the same
Python. `samples(domain, split, n, length, seed)` draws byte windows deterministically from the
seed: the same seed gives the same batch.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import pathlib
import sysconfig
import tokenize

import numpy as np

DOMAINS = ("code", "prose")
SKIP = ("test", "tests", "idlelib", "site-packages", "encodings", "lib2to3", "turtledemo",
        "__pycache__", "pydoc_data", "ensurepip")


def stdlib_files(limit: int | None = None) -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in SKIP for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}")
    return files[:limit] if limit else files


def split_of(path: pathlib.Path) -> str:
    rel = path.as_posix().split("/lib/")[-1]
    return "heldout" if hashlib.sha1(rel.encode()).digest()[0] < 26 else "train"  # ~10 %


def split_source(source: str) -> tuple[str, str]:
    """(code without docstrings and comments, the docstrings and comments as prose)."""
    prose, drop = [], set()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source, ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and node.body and isinstance(node.body[0], ast.Expr):
                prose.append(doc)
                first = node.body[0]
                drop.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines = source.splitlines(keepends=True)
    comments: dict[int, int] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith("!"):
                    prose.append(text)
                comments[tok.start[0]] = tok.start[1]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    code = []
    for i, line in enumerate(lines, start=1):
        if i in drop:
            continue
        if i in comments:
            line = line[:comments[i]].rstrip() + "\n"
            if not line.strip():
                continue
        code.append(line)
    return "".join(code), "\n".join(prose) + "\n"


@functools.lru_cache(maxsize=4)
def _split_texts(split: str, limit: int | None) -> dict:
    parts = {d: [] for d in DOMAINS}
    for path in stdlib_files(limit):
        if split_of(path) != split:
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        code, prose = split_source(source)
        parts["code"].append(code)
        parts["prose"].append(prose)
    return {d: "\n\n".join(p).encode("utf-8") for d, p in parts.items()}


def corpus(domain: str, split: str, limit: int | None = None) -> bytes:
    """All of one domain's text in one split, UTF-8, files joined by blank lines (`limit`: only
    the first files of the sorted list, for tests)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    return _split_texts(split, limit)[domain]


def samples(domain: str, split: str, n: int, length: int, seed: int,
            limit: int | None = None) -> np.ndarray:
    """(n, length) int32 byte windows at offsets drawn from `seed`."""
    text = np.frombuffer(corpus(domain, split, limit), np.uint8)
    if len(text) <= length:
        raise ValueError(f"{domain}/{split} has {len(text)} bytes, fewer than a window of {length}")
    starts = np.random.default_rng(seed).integers(0, len(text) - length, n)
    return np.stack([text[s:s + length] for s in starts]).astype(np.int32)
