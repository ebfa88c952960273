"""moex.data: benchmark readers/writers, prompts, preprocessing, batching, synthetic data."""

import base64
import collections
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from moex.config import get_config
from moex.data import (CATEGORIES, STYLES, DataError, HFTextTokenizer, Question, SyntheticSpec,
                       answer_text, batches, build_prompt, encode_batch, generate_questions,
                       preprocess, read_mmbench, read_seedbench, rotate, write_mmbench,
                       write_seedbench, write_synthetic)
from moex.data.mmbench import WRITTEN
from moex.data.synthetic import BACKGROUND, COLORS
from moex.tokenizer import ByteTokenizer

SPEC = SyntheticSpec(seed=3, n_train=24, n_dev=12)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "out", SPEC)


def _png(color=(10, 20, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _question(**kw) -> Question:
    fields = dict(qid="7", question="What is it?", options=("cat", "dog"), answer=1,
                  category="animals", image_bytes=_png())
    return Question(**{**fields, **kw})


# --- MMBench TSV ------------------------------------------------------------------------------

def _tsv(path, rows, header=WRITTEN):
    """Write rows (dicts over `header`, missing cells empty) as an MMBench TSV."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


def _row(index, **kw):
    return {"index": str(index), "question": "Q?", "A": "x", "B": "y", "answer": "A",
            "category": "c", "image": base64.b64encode(_png()).decode(), **kw}


def _same(read, generated):
    assert len(read) == len(generated)
    for r, g in zip(read, generated):
        assert (r.qid, r.question, r.options, r.answer, r.category, r.hint) == \
               (g.qid, g.question, g.options, g.answer, g.category, g.hint)
        np.testing.assert_array_equal(np.asarray(r.load_image()), np.asarray(g.load_image()))


def test_synthetic_round_trips_through_both_readers(synthetic):
    for split, (n, seed) in SPEC.splits().items():
        generated = generate_questions(n, seed, SPEC.image_size)
        mm = read_mmbench(synthetic[f"mmbench/{split}"])
        seed_qs = read_seedbench(synthetic[f"seed/{split}"], synthetic["seed/images"])
        _same(mm, generated)
        _same(seed_qs, generated)
        assert {q.source for q in mm} == {"mmbench"} and {q.source for q in seed_qs} == {"seed"}
    assert write_synthetic(synthetic["root"], SPEC) == synthetic      # cached, not rebuilt
    with pytest.raises(FileExistsError, match="not built from"):
        write_synthetic(synthetic["root"], SyntheticSpec(seed=4, n_train=2, n_dev=2))


def test_mmbench_quotes_newlines_nan_and_test_split(tmp_path):
    q = _question(question='Say "hi"\tthen\nleave', hint="two\nlines", answer=None)
    write_mmbench(tmp_path / "t.tsv", [q], split="test")
    (r,) = read_mmbench(tmp_path / "t.tsv", require_answer=False)
    assert (r.question, r.hint, r.answer) == (q.question, q.hint, None)
    assert r.image_bytes == q.image_bytes
    with pytest.raises(DataError, match="empty answer"):
        read_mmbench(tmp_path / "t.tsv")
    (r,) = read_mmbench(_tsv(tmp_path / "n.tsv", [_row(1, hint="nan", C="nan")]))
    assert r.hint == "" and r.options == ("x", "y")


def test_mmbench_image_reuse_by_index(tmp_path):
    other = base64.b64encode(_png((200, 0, 0))).decode()
    path = _tsv(tmp_path / "r.tsv", [_row(10, image="11"), _row(11, image=other), _row(12)])
    a, b, c = read_mmbench(path)
    assert a.image_bytes == b.image_bytes != c.image_bytes
    assert a.load_image().getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(DataError, match=r"row 1 \(index '10'\).*'99'"):
        read_mmbench(_tsv(tmp_path / "bad.tsv", [_row(10, image="99")]))


@pytest.mark.parametrize("rows, header, match", [
    ([_row(1)], [h for h in WRITTEN if h != "category"],
     r"missing column 'category'; found columns \['index'"),
    ([_row(1), _row(2, image="not base64!")], WRITTEN, r"row 2 \(index '2'\): image cell is not "
     "valid base64"),
    ([_row(1), _row(5, B="")], WRITTEN,
     r"row 2 \(index '5'\): expected 2-4 options.*found 1 \(A\)"),
    ([_row(6, C="z", D="w", E="v")], WRITTEN + ("E",), r"row 1 \(index '6'\).*found 5"),
    ([_row(4, D="w")], WRITTEN, r"row 1 \(index '4'\): options must fill columns from A without "
     "gaps, expected A, B, C, found A, B, D"),
    ([_row(3, answer="C")], WRITTEN, r"row 1 \(index '3'\): answer 'C' is not among the option "
     "letters A, B"),
    ([_row(8), _row(8)], WRITTEN, r"row 2 \(index '8'\): duplicate index, first seen on row 1"),
])
def test_mmbench_rejections_name_file_and_row(tmp_path, rows, header, match):
    path = _tsv(tmp_path / "bad.tsv", rows, header)
    with pytest.raises(DataError, match=match) as e:
        read_mmbench(path)
    assert str(path) in str(e.value)


# --- SEED-Bench JSON --------------------------------------------------------------------------

def _seed(tmp_path, **changes):
    """A valid 2-question SEED file (one video question) with `changes` applied to question 0."""
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.jpg").write_bytes(_png())
    item = {"answer": "B", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
            "data_id": "a.jpg", "data_type": "image", "question": "Q?", "question_id": "101669",
            "question_type_id": 1}
    item.update(changes)
    item = {k: v for k, v in item.items() if v is not None}
    video = {**item, "question_id": "9", "data_type": "video", "data_id": "v.mp4"}
    data = {"question_type": {"Scene Understanding": 1}, "questions": [item, video]}
    (tmp_path / "s.json").write_text(json.dumps(data))
    return tmp_path / "s.json", tmp_path / "img"


def test_seedbench_reads_official_layout_and_skips_video(tmp_path):
    (q,) = read_seedbench(*_seed(tmp_path))
    assert (q.qid, q.options, q.answer, q.category) == ("101669", ("x", "y", "z", "w"), 1,
                                                        "Scene Understanding")
    assert q.image_path == str(tmp_path / "img" / "a.jpg") and q.load_image().size == (8, 6)


@pytest.mark.parametrize("changes, match", [
    ({"data_id": "gone.jpg"}, r"image file .*gone.jpg not found"),
    ({"answer": "E"}, r"answer 'E' is not among the option letters A, B, C, D"),
    ({"choice_c": "", "choice_d": "", "answer": "C"}, r"answer 'C' is not among .* A, B$"),
    ({"choice_b": None}, r"missing key\(s\) \['choice_b'\]"),
    ({"question_type_id": 5}, r"unknown question_type_id 5"),
    ({"choice_b": "", "choice_c": "", "choice_d": ""}, r"expected 2-4 options.*found 1"),
    ({"choice_c": ""}, r"without gaps"),
])
def test_seedbench_rejections_name_file_and_question(tmp_path, changes, match):
    json_path, image_dir = _seed(tmp_path, **changes)
    with pytest.raises(DataError, match=match) as e:
        read_seedbench(json_path, image_dir)
    assert str(json_path) in str(e.value) and "row 1 (question_id '101669')" in str(e.value)


def test_seedbench_writer_refuses_unsafe_qid(tmp_path):
    with pytest.raises(DataError, match="qid names its image file"):
        write_seedbench(tmp_path / "s.json", tmp_path / "img", [_question(qid="../x")])
    assert not (tmp_path / "s.json").exists()


# --- prompts ----------------------------------------------------------------------------------

def test_rotate_keeps_the_answer_text():
    q = _question(options=("a", "b", "c", "d"), answer=2)
    assert rotate(q, 0) == q and rotate(q, 4) == q
    for k in range(4):
        r = rotate(q, k)
        assert r.options[r.answer] == "c" and r.rotation == k and r.qid == q.qid
        assert r.options[0] == q.options[k]
    assert rotate(rotate(q, 1), 2) == rotate(q, 3)


def test_build_prompt_styles():
    q = _question(question="What is it?", options=("cat", "dog"))
    h = _question(question="What is it?", options=("cat", "dog"), hint="A pet.")
    instr = "Answer with the option's letter from the given choices directly."
    assert build_prompt(q) == ("<image>\nQuestion: What is it?\nOptions:\nA. cat\nB. dog\n" + instr)
    assert build_prompt(h) == ("<image>\nHint: A pet.\nQuestion: What is it?\nOptions:\nA. cat\n"
                               "B. dog\n" + instr)
    assert build_prompt(q, "seed") == "<image>\nWhat is it?\nA. cat\nB. dog\n" + instr
    assert build_prompt(h, "seed") == "<image>\nA pet.\nWhat is it?\nA. cat\nB. dog\n" + instr
    assert build_prompt(q, "compact") == "<image>What is it?\nA. cat\nB. dog\nAnswer:"
    assert build_prompt(h, "compact") == "<image>A pet. What is it?\nA. cat\nB. dog\nAnswer:"
    assert build_prompt(q, "compact", image_tag="") == "What is it?\nA. cat\nB. dog\nAnswer:"
    assert answer_text(q) == "B" and STYLES == ("mmbench", "seed", "compact")
    with pytest.raises(ValueError, match="expected one of"):
        build_prompt(q, "llava")


# --- images and batching ----------------------------------------------------------------------

def test_preprocess_uniform_colour_and_modes():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = preprocess(Image.new("RGB", (40, 30), (100, 150, 200)), 16, mean, std)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    expected = (np.array([100, 150, 200]) / 255 - mean) / std
    np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), atol=1e-5)
    # a wide image: left half black, right half white, 64 x 32
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (32, 0, 64, 32))
    crop = preprocess(wide, 32, (0, 0, 0), (1, 1, 1), "crop")   # the centre 32 x 32 of it
    pad = preprocess(wide, 32, (0.5, 0.5, 0.5), (1, 1, 1), "pad")  # grey bands above and below
    assert crop[:, 0].max() == 0 and crop[:, -1].min() == 1
    np.testing.assert_allclose(pad[0], int(0.5 * 255) / 255 - 0.5, atol=1e-6)
    np.testing.assert_allclose(pad[16, 2], -0.5, atol=0.02)
    assert pad[16, -3, 0] > 0.45
    with pytest.raises(ValueError, match="unknown image mode"):
        preprocess(wide, 32, (0, 0, 0), (1, 1, 1), "stretch")


def test_encode_batch_left_pads_and_counts_image_tokens():
    tok, vision = ByteTokenizer(), get_config("tiny-dense").vision
    qs = [_question(qid="1", question="Short?"), _question(qid="2", question="A longer one?",
                                                           hint="Some hint.")]
    batch = encode_batch(qs, tok, vision, suffix=[" A", " B"])
    assert batch.ids.shape == batch.mask.shape and batch.ids.dtype == np.int32
    assert batch.images.shape == (2, vision.image_size, vision.image_size, 3)
    assert batch.images.dtype == np.float32 and batch.questions == tuple(qs)
    assert (batch.ids == tok.image_id).sum(axis=1).tolist() == [vision.num_image_tokens] * 2
    assert batch.mask[1].all() and not batch.mask[0, 0] and batch.ids[0, 0] == tok.pad_id
    n_pad = int((batch.mask[0] == 0).sum())
    assert batch.ids[0, n_pad] == tok.bos_id and tok.decode(batch.ids[0, -2:]) == " A"
    assert encode_batch(qs, tok, vision, length=600).ids.shape == (2, 600)
    with pytest.raises(ValueError, match="one per question"):
        encode_batch(qs, tok, vision, suffix=["A"])
    assert [len(b) for b in batches(range(7), 3)] == [3, 3, 1]


def test_hf_text_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "<s>": 1, "what": 2, "is": 3, "it": 4, "?": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = HFTextTokenizer(tmp_path / "tokenizer.json", image_token_id=99, bos_id=1)
    assert tok.encode("<image>\nwhat is it?", num_image_tokens=3) == [1, 99, 99, 99, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="num_image_tokens"):
        tok.encode("<image>")


# --- synthetic --------------------------------------------------------------------------------

def _label_from_pixels(q: Question) -> str:
    """Read the answer off the image, independently of the generator's bookkeeping."""
    pixels = np.asarray(q.load_image()).astype(int)
    fg = np.abs(pixels - BACKGROUND).sum(-1) > 30                  # (H, W) shape pixels
    half = pixels.shape[0] // 2
    if q.category == "count":   # shapes sit in distinct cells of the 2x2 grid
        return str(sum(fg[r:r + half, c:c + half].any() for r in (0, half) for c in (0, half)))
    if q.category == "color":
        colour = np.median(pixels[fg], axis=0)
        return min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - colour).sum())
    if q.category == "shape":   # fill ratio of the bounding box: 1, pi/4, 1/2
        ys, xs = np.nonzero(fg)
        ratio = fg.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        return "square" if ratio > 0.9 else "circle" if ratio > 0.65 else "triangle"
    colour = COLORS[q.question.split()[3]]                         # "Where is the red circle?"
    ys, xs = np.nonzero(np.abs(pixels - colour).sum(-1) < 10)
    y, x = ys.mean() - half, xs.mean() - half
    if abs(x) > abs(y):
        return "left" if x < 0 else "right"
    return "top" if y < 0 else "bottom"


def test_synthetic_is_deterministic_balanced_and_correct():
    qs = generate_questions(80, seed=5)
    assert qs == generate_questions(80, seed=5)
    assert qs[:10] == generate_questions(10, seed=5)
    assert [q.image_bytes for q in qs] != [q.image_bytes for q in generate_questions(80, seed=6)]
    assert set(collections.Counter(q.answer_letter for q in qs)) == set("ABCD")
    assert collections.Counter(q.category for q in qs) == {c: 20 for c in CATEGORIES}
    assert {len(q.options) for q in qs} == {2, 3, 4} and any(q.hint for q in qs)
    for q in qs:
        assert len(set(q.options)) == len(q.options) and q.load_image().size == (64, 64)
        assert q.options[q.answer] == _label_from_pixels(q), q
