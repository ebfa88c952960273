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
