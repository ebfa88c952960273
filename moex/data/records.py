"""The one record every benchmark reader returns: a multiple-choice `Question` with its image.

A question has 2-4 options in letter order A, B, C, D and (except on splits without answers) the
index of the correct one. The image is either held encoded in memory (`image_bytes`, MMBench's
base64 cells decoded) or named by a file (`image_path`, SEED-Bench's image folder);
`load_image()` gives an RGB PIL image either way.

Every reader error is a `DataError` whose message names the file, the row and what was expected
versus found, so a bad row in a 4000-row benchmark file can be fixed without a debugger.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile

from PIL import Image

LETTERS = "ABCD"
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)


class DataError(ValueError):
    """A benchmark file (or one of its rows) is not in the expected format."""


def write_atomic(path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then `os.replace` it into place.

    Readers never see a half-written file: `path` is either the old file or the complete new one.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; match what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def row_error(path, row: int, id_name: str, qid, message: str) -> DataError:
    """DataError for one row: "<file>, row <n> (<id_name> '<qid>'): <message>"."""
    return DataError(f"{path}, row {row} ({id_name} {str(qid)!r}): {message}")


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question about one image.

    `answer` indexes `options` (None on splits without answers, e.g. MMBench test). `rotation` is
    how many places the options were rotated left from the file's order (CircularEval, see
    `moex.data.prompts.rotate`); readers always return rotation 0.
    """

    qid: str
    question: str
    options: tuple[str, ...]
    answer: int | None
    category: str
    hint: str = ""
    image_bytes: bytes | None = None
    image_path: str | None = None
    source: str = ""
    rotation: int = 0

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))
        n = len(self.options)
        if not MIN_OPTIONS <= n <= MAX_OPTIONS:
            raise DataError(f"question {self.qid!r}: expected {MIN_OPTIONS}-{MAX_OPTIONS} options, "
                            f"found {n}")
        if self.answer is not None and not 0 <= self.answer < n:
            raise DataError(f"question {self.qid!r}: answer index {self.answer} is not one of the "
                            f"{n} options")

    @property
    def letters(self) -> tuple[str, ...]:
        """("A", "B", ...) for the options, in order."""
        return tuple(LETTERS[: len(self.options)])

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]

    def load_image(self) -> Image.Image:
        """The decoded image, converted to RGB. Raises DataError naming the question and file."""
        if self.image_bytes is not None:
            where, opener = "its image_bytes", lambda: io.BytesIO(self.image_bytes)
        elif self.image_path is not None:
            where, opener = f"image file {self.image_path}", lambda: self.image_path
        else:
            raise DataError(f"question {self.qid!r} ({self.source or 'no source'}) has no image: "
                            "both image_bytes and image_path are None")
        try:
            with Image.open(opener()) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"question {self.qid!r}: cannot decode {where} as an image "
                            f"({type(e).__name__}: {e})") from e

    def encoded_image(self) -> bytes:
        """The encoded image: `image_bytes`, or the bytes of `image_path`."""
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image_path is not None:
            try:
                with open(self.image_path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise DataError(f"question {self.qid!r}: cannot read image file "
                                f"{self.image_path} ({e})") from e
        raise DataError(f"question {self.qid!r} has no image: both image_bytes and image_path "
                        "are None")
