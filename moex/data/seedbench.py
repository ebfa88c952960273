"""SEED-Bench (v1)'s official format: one JSON file plus a folder of images.

    {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, ...},
     "questions": [{"answer": "A", "choice_a": "...", "choice_b": "...", "choice_c": "...",
                    "choice_d": "...", "data_id": "1454426_2591111986.jpg", "data_type": "image",
                    "question": "...", "question_id": "101669", "question_type_id": 1}, ...]}

The image of a question is `image_dir / data_id` (the official release puts the CC3M images in
SEED-Bench-image/). Video questions (`data_type` other than "image") are skipped; `read_seedbench`
logs how many at INFO level. An optional "hint" key (not in the official files; written by
`write_seedbench` so hints survive a round trip) becomes `Question.hint`. Options are the
non-empty `choice_a`.. `choice_d`, contiguous from A.
Errors name a question by `question_id` and its row: its position in `questions`, from 1.

    questions = read_seedbench("SEED-Bench.json", "SEED-Bench-image")
"""

from __future__ import annotations

import json
import logging
import os
import re

from moex.data.records import LETTERS, MAX_OPTIONS, MIN_OPTIONS, DataError, Question, row_error, \
    write_atomic

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("question_id", "question", "answer", "choice_a", "choice_b", "data_id",
                 "data_type", "question_type_id")
CHOICE_KEYS = tuple(f"choice_{c}" for c in LETTERS.lower() + "e")  # choice_e: named if present
IMAGE_SUFFIXES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"BM": ".bmp"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _empty(value) -> bool:
    return value is None or str(value).strip() == ""


def _load(json_path) -> tuple[dict[int, str], list]:
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: cannot read as SEED-Bench JSON ({e})") from e
    if not isinstance(data, dict) or not {"question_type", "questions"} <= data.keys():
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{json_path}: expected an object with keys 'question_type' and "
                        f"'questions', found {found}")
    types = data["question_type"]
    try:
        if not isinstance(types, dict) or not isinstance(data["questions"], list):
            raise TypeError
        return {int(i): name for name, i in types.items()}, data["questions"]
    except (TypeError, ValueError):
        raise DataError(f"{json_path}: expected 'question_type' to map names to integer ids and "
                        "'questions' to be a list") from None


def _question(json_path, image_dir, n, item, type_names) -> Question:
    qid = str(item.get("question_id", "")) if isinstance(item, dict) else ""
    fail = lambda msg: row_error(json_path, n, "question_id", qid, msg)  # noqa: E731
    if not isinstance(item, dict):
        raise fail(f"expected a JSON object, found {type(item).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        raise fail(f"missing key(s) {missing}; found keys {sorted(item)}")
    type_id = item["question_type_id"]
    try:
        category = type_names[int(type_id)]
    except (KeyError, TypeError, ValueError):
        raise fail(f"unknown question_type_id {type_id!r}; 'question_type' has ids "
                   f"{sorted(type_names)}") from None
    present = [k for k in CHOICE_KEYS if not _empty(item.get(k))]
    letters = LETTERS[: len(present)]
    if not MIN_OPTIONS <= len(present) <= MAX_OPTIONS:
        raise fail(f"expected {MIN_OPTIONS}-{MAX_OPTIONS} options (choice_a..choice_d), found "
                   f"{len(present)} ({', '.join(present) or 'none'})")
    if tuple(present) != CHOICE_KEYS[: len(present)]:
        raise fail(f"options must fill choice_a.. without gaps, expected "
                   f"{', '.join(CHOICE_KEYS[: len(present)])}, found {', '.join(present)}")
    answer = str(item["answer"]).strip()
    if answer not in letters:
        raise fail(f"answer {answer!r} is not among the option letters {', '.join(letters)}")
    image_path = os.path.join(image_dir, str(item["data_id"]))
    if not os.path.isfile(image_path):
        raise fail(f"image file {image_path} not found (data_id {item['data_id']!r} in image "
                   f"folder {image_dir})")
    return Question(qid=qid, question=str(item["question"]).strip(),
                    options=tuple(str(item[k]).strip() for k in present),
                    answer=letters.index(answer), category=category,
                    hint="" if _empty(item.get("hint")) else str(item["hint"]).strip(),
                    image_path=image_path, source="seed")


def read_seedbench(json_path, image_dir) -> list[Question]:
    """Read SEED-Bench v1 image questions (file order, rotation 0, source "seed").

    Images are not opened here, only checked to exist; `Question.load_image` reads them.
    """
    type_names, items = _load(json_path)
    questions, skipped = [], 0
    for n, item in enumerate(items, start=1):
        if isinstance(item, dict) and item.get("data_type", "image") != "image":
            skipped += 1
            continue
        questions.append(_question(json_path, os.fspath(image_dir), n, item, type_names))
    if skipped:
        log.info("%s: skipped %d non-image (video) questions, kept %d", json_path, skipped,
                 len(questions))
    return questions


def _suffix(q: Question, data: bytes) -> str:
    if q.image_bytes is None and q.image_path:
        return os.path.splitext(q.image_path)[1] or ".png"
    return next((s for magic, s in IMAGE_SUFFIXES.items() if data.startswith(magic)), ".png")


def write_seedbench(json_path, image_dir, questions, question_types: dict[str, int] | None = None
                    ) -> None:
    """Write Questions as SEED-Bench v1 JSON plus one image file per question.

    Images go to `image_dir / f"{qid}{ext}"` (ext from the encoded bytes, e.g. ".png") and are all
    written before the JSON is published (temp file, then rename), so a reader never sees a JSON
    that names a missing image. `question_types` maps category -> question_type_id (default: the
    sorted categories numbered from 1); pass the same mapping for every split of a dataset.
    """
    questions = list(questions)
    if question_types is None:
        question_types = {c: i for i, c in enumerate(sorted({q.category for q in questions}), 1)}
    os.makedirs(image_dir, exist_ok=True)
    items = []
    for q in questions:
        if q.category not in question_types:
            raise DataError(f"question {q.qid!r}: category {q.category!r} is not in question_types "
                            f"{sorted(question_types)}")
        if not SAFE_NAME.match(q.qid):
            raise DataError(f"question {q.qid!r}: qid names its image file, so it may only hold "
                            "letters, digits, '_', '.' and '-'")
        if q.answer is None:
            raise DataError(f"question {q.qid!r}: SEED-Bench files need an answer, found None")
        data = q.encoded_image()
        data_id = f"{q.qid}{_suffix(q, data)}"
        write_atomic(os.path.join(image_dir, data_id), data)
        choices = {f"choice_{c.lower()}": o for c, o in zip(LETTERS, q.options)}
        items.append({"answer": q.answer_letter or "", **choices, "data_id": data_id,
                      "data_type": "image", "question": q.question, "question_id": q.qid,
                      "question_type_id": question_types[q.category],
                      **({"hint": q.hint} if q.hint else {})})
    data = {"question_type": dict(question_types), "questions": items}
    write_atomic(json_path, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))
