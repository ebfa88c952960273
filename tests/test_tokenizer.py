import numpy as np
import pytest

from moex.tokenizer import ByteTokenizer, left_pad


def test_round_trip_and_image_expansion():
    tok = ByteTokenizer()
    ids = tok.encode("héllo <image>!", num_image_tokens=3)
    assert ids[0] == tok.bos_id and ids.count(tok.image_id) == 3
    assert tok.decode(ids[1:]) == "héllo <image><image><image>!"


def test_left_pad():
    ids, mask = left_pad([[1, 2], [3, 4, 5]], 0)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="longer than length=2"):
        left_pad([[1, 2, 3]], 0, 2)


def _words(text: str) -> str:
    """Text as the word tokenizer sees it: words and punctuation runs, single-spaced."""
    import re
    return " ".join(re.findall(r"\w+|[^\w\s]+", text))


def test_task_tokenizer_round_trips_the_synthetic_corpus_in_few_tokens(tmp_path):
    from moex.config import get_config
    from moex.data import SyntheticSpec, build_prompt, generate_questions, likelihood_prompt
    from moex.data.synthetic import CAPTION_PROMPT, caption, corpus, fresh_questions
    from moex.data.vocab import synthetic_tokenizer, tokenizer_for, write_tokenizer
    from moex.tokenizer import HFTextTokenizer, UNK_ID
    cfg = get_config("mini-dense")
    tok = tokenizer_for(cfg)
    assert tok.num_tokens <= cfg.decoder.vocab_size
    texts = list(corpus())
    for q in generate_questions(40, seed=5):
        texts += [build_prompt(q, style, image_tag="") for style in ("mmbench", "seed", "compact")]
        texts += [likelihood_prompt(q, image_tag=""), *q.options]
    texts += [caption(shapes, q.category, 64) for q, _, shapes in fresh_questions(0, 3, 12)]
    texts.append(CAPTION_PROMPT)
    for text in texts:
        ids = tok.encode(text, bos=False)
        assert UNK_ID not in ids, text
        assert tok.decode(ids) == _words(text)
    # a question in the compact style with its image: at most ~40 text tokens
    longest = max(len(tok.encode(build_prompt(q, "compact"), num_image_tokens=1)) - 1
                  for q in generate_questions(200, seed=6))
    assert longest <= 40
    # the same ids on every build, and through a saved tokenizer.json (the checkpoint path)
    path = write_tokenizer(synthetic_tokenizer(), tmp_path)
    again = tokenizer_for(cfg, checkpoint_dir=tmp_path)
    assert isinstance(again, HFTextTokenizer) and again.bos_id == tok.bos_id
    assert again.encode("<image>What color is the shape?", num_image_tokens=2) == \
        tok.encode("<image>What color is the shape?", num_image_tokens=2)
    assert path.name == "tokenizer.json"


def test_task_tokenizer_gives_unknown_words_unk():
    from moex.config import get_config
    from moex.data.vocab import tokenizer_for
    from moex.tokenizer import UNK_ID
    tok = tokenizer_for(get_config("mini-dense"))
    ids = tok.encode("What colour is the zebra?", bos=False)
    assert ids.count(UNK_ID) == 2 and len(ids) == 6
    assert tok.decode(ids) == "What <unk> is the <unk> ?"


def test_a_tokenizer_that_does_not_fit_the_model_is_refused():
    from moex.config import get_config
    from moex.data.vocab import check_fits
    cfg = get_config("mini-dense")
    with pytest.raises(ValueError, match="holds 80 ids but the tokenizer"):
        check_fits(cfg, ByteTokenizer())


def test_qwen_vision_markers_enclose_each_image(tmp_path):
    """A VLM whose tokenizer.json has <|vision_start|> / <|vision_end|> (Qwen3-VL) gets them
    around every image's placeholders, as Qwen's processor writes them; without them (the
    word tokenizer, LLaVA) the placeholders stand alone."""
    from moex.config import get_config
    from moex.data.vocab import synthetic_tokenizer, tokenizer_for, write_tokenizer
    from moex.tokenizer import IMAGE_ID
    cfg = get_config("mini-dense")
    words = synthetic_tokenizer()
    plain = tokenizer_for(cfg, write_tokenizer(words, tmp_path).parent)
    assert plain.image_wrap is None
    qwen = words.from_str(words.to_str())             # a copy, with Qwen's two markers added
    qwen.add_special_tokens(["<|vision_start|>", "<|vision_end|>"])
    (tmp_path / "qwen").mkdir()
    tok = tokenizer_for(cfg, write_tokenizer(qwen, tmp_path / "qwen").parent)
    start, end = tok.image_wrap
    ids = tok.encode("<image>What color", bos=False, num_image_tokens=2)
    text = plain.encode("What color", bos=False)
    assert ids == [start, IMAGE_ID, IMAGE_ID, end] + text
    assert tok.decode(ids) == plain.decode([IMAGE_ID, IMAGE_ID] + text)   # markers are special
