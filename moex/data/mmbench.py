"""MMBench's official TSV format (the files of VLMEvalKit / OpenCompass, e.g. mmbench_dev_en.tsv).

One row per question, tab-separated, header first:

    index  question  hint  A  B  C  D  answer  category  image  [source l2-category comment split]

`image` is the base64 of the encoded image, or, to save space, another row's `index` (a short digit
string) whose image this row reuses. Options are the non-empty cells among A..D, contiguous from A;
empty or "nan" cells (pandas' NaN) count as empty. Rows are numbered from 1 after the header in
error messages.

    questions = read_mmbench("mmbench_dev_en.tsv")
    write_mmbench("out.tsv", questions)
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import sys

from moex.data.records import LETTERS, MAX_OPTIONS, MIN_OPTIONS, DataError, Question, row_error, \
    write_atomic

REQUIRED = ("index", "question", "A", "B", "image", "category")
WRITTEN = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
           "l2-category", "split")
OPTION_COLUMNS = LETTERS + "E"   # E..: never valid here, but checked so a 5-option file is named
MAX_REFERENCE_LEN = 64           # an image cell this short and all digits is another row's index


def _set_field_limit() -> None:
    """Base64 image cells are far longer than csv's default 128 KiB field limit."""
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:   # C long is 32 bits on some platforms
        csv.field_size_limit(2**31 - 1)


def _empty(cell: str | None) -> bool:
    return cell is None or cell.strip() == "" or cell.strip().lower() == "nan"


def _is_reference(cell: str) -> bool:
    return cell.isdigit() and len(cell) <= MAX_REFERENCE_LEN


def _read_rows(path) -> tuple[list[str], list[list[str]]]:
    _set_field_limit()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as a UTF-8 tab-separated MMBench file ({e})") from e
    if not rows:
        raise DataError(f"{path}: empty file, expected a header row with columns {REQUIRED}")
    return rows[0], rows[1:]


def _options(path, n, qid, row) -> tuple[str, ...]:
    present = [c for c in OPTION_COLUMNS if not _empty(row.get(c))]
    if not MIN_OPTIONS <= len(present) <= MAX_OPTIONS:
        raise row_error(path, n, "index", qid,
                        f"expected {MIN_OPTIONS}-{MAX_OPTIONS} options in columns A-D, found "
                        f"{len(present)} ({', '.join(present) or 'none'})")
    if "".join(present) != LETTERS[: len(present)]:
        raise row_error(path, n, "index", qid,
                        f"options must fill columns from A without gaps, expected "
                        f"{', '.join(LETTERS[: len(present)])}, found {', '.join(present)}")
    return tuple(row[c].strip() for c in present)


def _answer(path, n, qid, row, letters, require_answer) -> int | None:
    cell = row.get("answer")
    if _empty(cell):
        if require_answer:
            raise row_error(path, n, "index", qid, "empty answer; expected one of "
                            f"{', '.join(letters)} (pass require_answer=False for a test split)")
        return None
    cell = cell.strip()
    if cell not in letters:
        raise row_error(path, n, "index", qid, f"answer {cell!r} is not among the option letters "
                        f"{', '.join(letters)}")
    return letters.index(cell)


def _decode(path, n, qid, cell) -> bytes:
    if not cell:
        raise row_error(path, n, "index", qid, "empty image cell; expected the base64 of an "
                        "encoded image or another row's index")
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as e:
        raise row_error(path, n, "index", qid, f"image cell is not valid base64 ({e}); expected "
                        "the base64 of an encoded image or another row's index") from e


def read_mmbench(path, require_answer: bool = True) -> list[Question]:
    """Read an official MMBench TSV into Questions (file order, rotation 0, source "mmbench").

    Base64 images are decoded here (so a bad cell fails at read time, naming its row); image
    references to another row's index are resolved to that row's bytes.
    """
    header, rows = _read_rows(path)
    header = [h.strip() for h in header]
    required = REQUIRED + (("answer",) if require_answer else ())
    for name in required:
        if name not in header:
            raise DataError(f"{path}: missing column {name!r}; found columns {header}; the "
                            f"MMBench format needs {list(required)}")
    id_col = header.index("index")
    seen: dict[str, int] = {}
    parsed = []  # (row number, qid, fields, image cell)
    for n, cells in enumerate(rows, start=1):
        if cells == [] or cells == [""]:
            continue                         # a blank line (e.g. a trailing newline)
        qid = cells[id_col].strip() if id_col < len(cells) else ""
        if len(cells) != len(header):
            raise row_error(path, n, "index", qid, f"expected {len(header)} tab-separated fields "
                            f"(one per header column), found {len(cells)}")
        row = dict(zip(header, cells))
        qid = row["index"].strip()
        if not qid:
            raise row_error(path, n, "index", qid, "empty index")
        if qid in seen:
            raise row_error(path, n, "index", qid,
                            f"duplicate index, first seen on row {seen[qid]}")
        seen[qid] = n
        options = _options(path, n, qid, row)
        answer = _answer(path, n, qid, row, LETTERS[: len(options)], require_answer)
        hint = "" if _empty(row.get("hint")) else row["hint"].strip()
        fields = dict(qid=qid, question=row["question"].strip(), options=options, answer=answer,
                      category=row["category"].strip(), hint=hint, source="mmbench")
        parsed.append((n, qid, fields, row["image"].strip()))

    images = {qid: _decode(path, n, qid, cell) for n, qid, _, cell in parsed
              if not _is_reference(cell)}
    questions = []
    for n, qid, fields, cell in parsed:
        if _is_reference(cell):
            if cell not in images:
                raise row_error(path, n, "index", qid, f"image cell {cell!r} refers to another "
                                "row's index, but no row with that index holds a base64 image")
            image = images[cell]
        else:
            image = images[qid]
        questions.append(Question(image_bytes=image, **fields))
    return questions


def write_mmbench(path, questions, split: str = "dev") -> None:
    """Write Questions as an official MMBench TSV (atomically: temp file, then rename).

    Every row carries its own base64 image (no references); `answer` is empty for None;
    `l2-category` repeats `category`. Options are written in their current (possibly rotated) order.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(WRITTEN)
    for q in questions:
        options = list(q.options) + [""] * (len(LETTERS) - len(q.options))
        image = base64.b64encode(q.encoded_image()).decode("ascii")
        writer.writerow([q.qid, q.question, q.hint, *options, q.answer_letter or "", q.category,
                         image, q.category, split])
    write_atomic(os.fspath(path), buf.getvalue().encode("utf-8"))
