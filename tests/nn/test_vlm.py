"""Image tokens land exactly at the placeholders; text-only input works; bad input is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.config import get_config
from moex.model import build, forward, init_params
from moex.nn.vlm import check_placeholders, splice_image_tokens
from moex.tokenizer import ByteTokenizer
from tests.helpers import TINY, jitted_forward, random_images, tiny


def test_splice_puts_kth_image_token_at_kth_placeholder():
    x = jnp.zeros((2, 7, 3))
    is_image = jnp.asarray([[0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]], bool)
    image_tokens = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
    y = np.asarray(splice_image_tokens(x, is_image, image_tokens))
    np.testing.assert_array_equal(y[0, 1:4], image_tokens[0])
    np.testing.assert_array_equal(y[1, 4:7], image_tokens[1])
    np.testing.assert_array_equal(y[0, [0, 4, 5, 6]], 0)
    np.testing.assert_array_equal(y[1, :4], 0)


def test_vlm_embeds_projected_image_tokens_at_placeholders():
    cfg, model, params = tiny("tiny-dense")
    tok = ByteTokenizer()
    n = cfg.vision.num_image_tokens
    ids = np.asarray([tok.encode("ab<image>cd", num_image_tokens=n)], np.int32)
    images = random_images(cfg, 1)
    image_tokens, _, _ = model.apply({"params": params}, images, method="encode_images")
    embedded = model.apply({"params": params}, jnp.asarray(ids),
                           method=lambda m, t: m.decoder.embed(t))
    spliced = splice_image_tokens(embedded, jnp.asarray(ids) == cfg.image_token_id, image_tokens)
    where = np.nonzero(ids[0] == cfg.image_token_id)[0]
    assert where.tolist() == list(range(3, 3 + n))                  # BOS a b, then placeholders
    np.testing.assert_allclose(spliced[0, where], image_tokens[0], atol=1e-6)
    np.testing.assert_allclose(spliced[0, :3], embedded[0, :3])
    # The model's logits before the image do not depend on the image; after, they do.
    fwd = jitted_forward("tiny-dense")
    mask = np.ones_like(ids)
    a = fwd(params, ids, mask, images)
    b = fwd(params, ids, mask, random_images(cfg, 1, seed=5))
    np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)
    assert not np.allclose(a[0, 3:], b[0, 3:], atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_text_only_input(name):
    cfg, model, params = tiny(name)
    ids, mask = ByteTokenizer().batch(["hello", "a longer text row"])
    logits, _, _ = forward(model, params, ids, mask)
    assert logits.shape == (2, ids.shape[1], cfg.decoder.vocab_size)
    assert bool(jnp.isfinite(logits).all())
    # A text-only row is unaffected by images given for other rows.
    with_images = jitted_forward(name)(params, ids, mask, random_images(cfg, 2))
    np.testing.assert_allclose(with_images, logits, atol=1e-5)


def test_placeholder_count_is_checked():
    with pytest.raises(ValueError, match=r"0 or 16 image placeholders.*\(0, 3\)"):
        check_placeholders(np.asarray([[1, 259, 259, 259]]), 259, 16, True)
    with pytest.raises(ValueError, match="no images were given"):
        check_placeholders(np.asarray([[259] * 16]), 259, 16, False)
    with pytest.raises(ValueError, match="num_image_tokens"):
        ByteTokenizer().encode("<image>")


def test_text_only_model_refuses_images():
    cfg = get_config("tiny-dense").replace(name="lm", vision=None, projector=None)
    params = init_params(cfg)
    assert set(params) == {"decoder"}
    with pytest.raises(ValueError, match="text-only"):
        forward(build(cfg), params, np.ones((1, 2), np.int32), np.ones((1, 2), np.int32),
                jnp.zeros((1, 32, 32, 3)))


def test_wrong_image_shape_is_named():
    cfg, model, params = tiny("tiny-dense")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 32, 32, 3\)"):
        model.apply({"params": params}, jnp.zeros((1, 16, 16, 3)), method="encode_images")


def test_spatial_merge_concatenates_neighbouring_patches():
    import dataclasses
    from moex.nn.vision import merge_patches
    x = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)   # a 4 x 4 patch grid
    y = np.asarray(merge_patches(x, 4, 4, 2))
    assert y.shape == (2, 4, 12)
    for block, patches in enumerate(([0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                     [10, 11, 14, 15])):
        np.testing.assert_array_equal(y[1, block], np.asarray(x[1, patches]).reshape(-1))
    cfg = get_config("mini-dense")
    merged = cfg.replace(vision=dataclasses.replace(cfg.vision, spatial_merge=2)).validate()
    assert merged.vision.num_image_tokens == cfg.vision.num_image_tokens // 4 == 9
    params = init_params(merged)
    assert params["projector"]["fc1"]["kernel"].shape[0] == 4 * cfg.vision.d_model
    tokens, _, _ = build(merged).apply({"params": params}, random_images(merged, 2),
                                    method="encode_images")
    assert tokens.shape == (2, 9, merged.decoder.d_model)
    with pytest.raises(ValueError, match="spatial_merge 4 must divide the patch grid side 6"):
        cfg.replace(vision=dataclasses.replace(cfg.vision, spatial_merge=4)).validate()
    with pytest.raises(ValueError, match="drop the class token"):
        get_config("tiny-dense").replace(vision=dataclasses.replace(
            get_config("tiny-dense").vision, spatial_merge=2, drop_class_token=False)).validate()
