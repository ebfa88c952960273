"""Synthetic benchmark data, written in MMBench's and SEED-Bench's official formats.

Scenes are 1-4 coloured shapes (circle, square, triangle) on a plain light background, drawn with
PIL at `image_size` px (default 64; shapes 22-31% of the side, 14-20 px at 64). Each question is
about one scene, in one of four categories, with 2-4 options of which exactly one is right:

  color     "What color is the shape?"            one shape; options are colour names
  shape     "Which shape is in the image?"        one shape; options are shape names
  count     "How many shapes are in the image?"   1-4 shapes; options "1".."4"
  position  "Where is the red circle?"            2 shapes, split clearly left/right or top/bottom;
                                                  options from left, right, top, bottom

Shapes in a scene sit in distinct cells of a 2x2 grid, so they never overlap. Question i of
`generate_questions(n, seed)` depends only on (seed, i) and categories take turns, so any prefix is
balanced and stable. The same readers and scorers then run offline:

    paths = write_synthetic("data/synthetic", SyntheticSpec(seed=0))
    dev = read_mmbench(paths["mmbench/dev"])
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from moex.data.mmbench import write_mmbench
from moex.data.records import LETTERS, MAX_OPTIONS, MIN_OPTIONS, Question
from moex.data.seedbench import write_seedbench
from moex.data.prompts import STYLES, build_prompt, likelihood_prompt

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 135, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")
POSITIONS = ("left", "right", "top", "bottom")
CATEGORIES = ("color", "shape", "count", "position")
QUESTION_TYPES = {c: i for i, c in enumerate(CATEGORIES, 1)}   # SEED's question_type ids
BACKGROUND = (245, 245, 240)
HINTS = ("The image shows simple shapes.", "Look at the shapes on the plain background.")
HINT_RATE = 0.3
SIZE_RANGE = (0.22, 0.31)       # shape side as a fraction of the image side
SPEC_FILE = "spec.json"         # written last: its presence (and match) marks a complete folder
FORMAT_VERSION = 1
FRESH_STREAM = 7919
CAPTION_PROMPT = "Describe the image."             # first seed word of `fresh_questions`' stream


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What `write_synthetic` builds: question counts per split, image size and the base seed.

    Split k (train, dev, test) uses seed `seed * 10 + k`, so splits never share a question stream
    (nor a qid). Splits with 0 questions are not written.
    """

    seed: int = 0
    image_size: int = 64
    n_train: int = 4000
    n_dev: int = 500
    n_test: int = 0

    def splits(self) -> dict[str, tuple[int, int]]:
        """split name -> (number of questions, seed), for the non-empty splits."""
        counts = {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}
        return {name: (n, self.seed * 10 + k) for k, (name, n) in enumerate(counts.items()) if n}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str      # one of SHAPES
    color: str     # one of COLORS
    cx: int        # centre, px
    cy: int
    size: int      # side of the bounding square, px


def render(shapes, image_size: int) -> Image.Image:
    """The RGB scene: `shapes` drawn on BACKGROUND."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0 = s.cx - s.size // 2, s.cy - s.size // 2
        x1, y1 = x0 + s.size - 1, y0 + s.size - 1
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _in_cell(rng, col: int, row: int, size: int, image_size: int) -> tuple[int, int]:
    """A centre inside grid cell (col, row) of the 2x2 grid, so the shape stays in the cell."""
    cell = image_size // 2
    lo, hi = size // 2 + 1, cell - (size - size // 2) - 1
    return (col * cell + int(rng.integers(lo, hi + 1)), row * cell + int(rng.integers(lo, hi + 1)))


def _scene(rng, n: int, image_size: int, kinds=None, colors=None) -> list[Shape]:
    """n shapes in distinct random cells of the 2x2 grid."""
    lo, hi = (round(f * image_size) for f in SIZE_RANGE)
    cells = rng.permutation(4)[:n]
    shapes = []
    for i, c in enumerate(cells):
        size = int(rng.integers(lo, hi + 1))
        cx, cy = _in_cell(rng, int(c) % 2, int(c) // 2, size, image_size)
        kind = kinds[i] if kinds else str(rng.choice(SHAPES))
        color = colors[i] if colors else str(rng.choice(list(COLORS)))
        shapes.append(Shape(kind, color, cx, cy, size))
    return shapes


def _options(rng, correct: str, vocabulary) -> tuple[tuple[str, ...], int]:
    """2-4 options (as many as the vocabulary allows): `correct` plus distractors, shuffled."""
    n = int(rng.integers(MIN_OPTIONS, min(MAX_OPTIONS, len(vocabulary)) + 1))
    others = [v for v in vocabulary if v != correct]
    options = [correct] + [str(v) for v in rng.choice(others, n - 1, replace=False)]
    order = rng.permutation(n)
    options = tuple(options[i] for i in order)
    return options, options.index(correct)


def _position_scene(rng, image_size: int) -> tuple[list[Shape], Shape, str]:
    """Two shapes of different colours, one per half along a random axis, centred on the other."""
    horizontal = bool(rng.integers(2))
    colors = [str(c) for c in rng.choice(list(COLORS), 2, replace=False)]
    kinds = [str(k) for k in rng.choice(SHAPES, 2)]
    lo, hi = (round(f * image_size) for f in SIZE_RANGE)
    jitter = image_size // 16
    shapes = []
    for i in range(2):
        size = int(rng.integers(lo, hi + 1))
        along, _ = _in_cell(rng, i, 0, size, image_size)
        across = image_size // 2 + int(rng.integers(-jitter, jitter + 1))
        cx, cy = (along, across) if horizontal else (across, along)
        shapes.append(Shape(kinds[i], colors[i], cx, cy, size))
    target = int(rng.integers(2))
    where = (("left", "right") if horizontal else ("top", "bottom"))[target]
    return shapes, shapes[target], where


def _make(category: str, rng, image_size: int) -> tuple[list[Shape], str, str, tuple]:
    """(shapes, question, correct answer, vocabulary) for one question of `category`."""
    if category == "color":
        shapes = _scene(rng, 1, image_size)
        return shapes, "What color is the shape?", shapes[0].color, tuple(COLORS)
    if category == "shape":
        shapes = _scene(rng, 1, image_size)
        return shapes, "Which shape is in the image?", shapes[0].kind, SHAPES
    if category == "count":
        shapes = _scene(rng, int(rng.integers(1, 5)), image_size)
        return shapes, "How many shapes are in the image?", str(len(shapes)), COUNTS
    shapes, target, where = _position_scene(rng, image_size)
    return shapes, f"Where is the {target.color} {target.kind}?", where, POSITIONS


def _check_size(image_size: int) -> None:
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px for shapes to stay visible, found "
                         f"{image_size}")


def make_question(rng: np.random.Generator, category: str, image_size: int, qid: str = ""):
    """(Question without its image, the scene's shapes): one question of `category` drawn from
    `rng`; `render(shapes, image_size)` draws its image."""
    shapes, text, correct, vocabulary = _make(category, rng, image_size)
    options, answer = _options(rng, correct, vocabulary)
    hint = str(rng.choice(HINTS)) if rng.random() < HINT_RATE else ""
    return Question(qid=qid, question=text, options=options, answer=answer, category=category,
                    hint=hint, source="synthetic"), shapes


def generate_questions(n: int, seed: int, image_size: int = 64) -> list[Question]:
    """n synthetic questions (PNG images in `image_bytes`), deterministic in (seed, i).

    qids are `seed * 1_000_000 + i` as strings, so different seeds never share a qid.
    """
    if not 0 <= n < 1_000_000:
        raise ValueError(f"n must be in [0, 1_000_000), found {n}")
    _check_size(image_size)
    questions = []
    for i in range(n):
        q, shapes = make_question(np.random.default_rng([seed, i]), CATEGORIES[i % len(CATEGORIES)],
                                  image_size, qid=str(seed * 1_000_000 + i))
        questions.append(dataclasses.replace(q, image_bytes=_png(render(shapes, image_size))))
    return questions


def fresh_questions(seed: int, step: int, n: int, image_size: int = 64, weights=None):
    """n new questions for training step `step`, with their rendered images and scenes:
    [(Question, PIL image, shapes)], deterministic in (seed, step, i) and drawn from a stream no
    split uses (split seeds are scalars; these are (FRESH_STREAM, seed, step, i)).

    Categories take turns from a random start, so every batch is balanced; `weights` (one per
    CATEGORIES entry) draws them in those proportions instead (a curriculum)."""
    _check_size(image_size)
    rng = np.random.default_rng([FRESH_STREAM, seed, step])
    if weights is None:
        start = int(rng.integers(len(CATEGORIES)))
        cats = [CATEGORIES[(start + i) % len(CATEGORIES)] for i in range(n)]
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(CATEGORIES),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights: one non-negative weight per category {CATEGORIES}, not "
                             f"all zero; found {tuple(weights)}")
        cats = [CATEGORIES[i] for i in rng.choice(len(CATEGORIES), n, p=w / w.sum())]
    out = []
    for i, category in enumerate(cats):
        rng = np.random.default_rng([FRESH_STREAM, seed, step, i])
        q, shapes = make_question(rng, category, image_size, qid=f"fresh-{seed}-{step}-{i}")
        out.append((q, render(shapes, image_size), shapes))
    return out


def caption(shapes, category: str, image_size: int) -> str:
    """A scene description for caption training (LLaVA's stage-1 alignment task, on the synthetic
    scenes): " N shapes : COLOR KIND WHERE , ...". WHERE is the 2x2 grid cell ("top left") for
    grid scenes; for a position scene, the side along its axis ("left" / "right" or "top" /
    "bottom"), as its question asks."""
    half = image_size / 2
    if category == "position":
        a, b = shapes
        horizontal = abs(a.cx - b.cx) > abs(a.cy - b.cy)
        where = [(("left" if s.cx < half else "right") if horizontal else
                  ("top" if s.cy < half else "bottom")) for s in shapes]
    else:
        shapes = sorted(shapes, key=lambda s: (s.cy >= half, s.cx >= half))
        where = [f"{'top' if s.cy < half else 'bottom'} {'left' if s.cx < half else 'right'}"
                 for s in shapes]
    parts = [f"{s.color} {s.kind} {w}" for s, w in zip(shapes, where)]
    return f" {len(shapes)} shapes : " + " , ".join(parts)


def question_texts():
    """Every question text `_make` can ask."""
    yield "What color is the shape?"
    yield "Which shape is in the image?"
    yield "How many shapes are in the image?"
    for color in COLORS:
        for kind in SHAPES:
            yield f"Where is the {color} {kind}?"


def corpus():
    """Every text the synthetic benchmark can show a model: questions (each colour and shape of
    the position questions), hints, option words, and the scaffolding of each prompt style and of
    the likelihood prompt: what the task-sized tokenizer is built from (`moex.data.vocab`)."""
    scaffold = Question("0", "?", tuple(LETTERS), 0, "color", hint=HINTS[0])
    yield from (build_prompt(scaffold, style, image_tag="") for style in STYLES)
    yield likelihood_prompt(scaffold, image_tag="")
    yield from question_texts()
    yield from HINTS
    yield " ".join((*COLORS, *SHAPES, *COUNTS, *POSITIONS))
    yield " ".join(f"({letter})" for letter in LETTERS)      # "text (B)" answers
    yield CAPTION_PROMPT
    yield caption([Shape(k, c, 0, 0, 1) for k, c in zip(SHAPES, COLORS)], "count", 64)


def _paths(root: Path, spec: SyntheticSpec) -> dict[str, Path]:
    paths = {"root": root, "spec": root / SPEC_FILE, "seed/images": root / "seed" / "images"}
    for split in spec.splits():
        paths[f"mmbench/{split}"] = root / "mmbench" / f"{split}.tsv"
        paths[f"seed/{split}"] = root / "seed" / f"{split}.json"
    return paths


def _spec_record(spec: SyntheticSpec) -> dict:
    return {"format_version": FORMAT_VERSION, **dataclasses.asdict(spec)}


def _cached(root: Path, spec: SyntheticSpec) -> dict[str, Path] | None:
    """The paths of a complete folder built from `spec`; None if `root` does not exist.

    Raises FileExistsError if `root` exists but holds something else.
    """
    if not root.exists():
        return None
    try:
        found = json.loads((root / SPEC_FILE).read_text())
    except (OSError, ValueError):
        found = None
    if found != _spec_record(spec):
        raise FileExistsError(f"{root} exists but was not built from {spec} (its {SPEC_FILE}: "
                              f"{found}); delete it or choose another out_dir")
    return _paths(root, spec)


def write_synthetic(out_dir, spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Path]:
    """Build (or reuse) the synthetic benchmark folder; returns its paths.

    Layout: mmbench/{split}.tsv, seed/{split}.json, seed/images/, spec.json. Keys of the result:
    "root", "spec", "seed/images", and "mmbench/<split>", "seed/<split>" per non-empty split.
    Everything is built in a temp folder beside `out_dir`, then renamed into place, so `out_dir`
    is either absent or complete; a complete one whose spec.json matches is returned as is.
    """
    root = Path(out_dir)
    if (paths := _cached(root, spec)) is not None:
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        tmp.chmod(0o755)   # mkdtemp makes 0700
        built = _paths(tmp, spec)
        built["seed/images"].mkdir(parents=True)
        built["root"].joinpath("mmbench").mkdir()
        for split, (n, seed) in spec.splits().items():
            questions = generate_questions(n, seed, spec.image_size)
            write_mmbench(built[f"mmbench/{split}"], questions, split=split)
            write_seedbench(built[f"seed/{split}"], built["seed/images"], questions,
                            QUESTION_TYPES)
        built["spec"].write_text(json.dumps(_spec_record(spec), indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if _cached(root, spec) is None:   # lost a race to a builder of the same spec: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root, spec)
