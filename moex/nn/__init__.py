"""Functional flax.linen modules: params are plain pytrees passed to `apply`."""

from moex.nn.vlm import VLM, check_placeholders, splice_image_tokens  # noqa: F401
from moex.nn.decoder import Decoder, init_cache, kv_bytes_per_token  # noqa: F401
