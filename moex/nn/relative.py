"""T5 relative position buckets and the attention bias they index.

A query at position i and a key at position j are apart by r = j - i. Bidirectional stacks (the
encoder) give half the buckets to r > 0; causal ones (the decoder) only see r <= 0. Of each half,
the first `exact` = half / 2 buckets are the distances 0 .. exact - 1, the rest grow
logarithmically up to `max_distance`, beyond which every distance shares the last bucket.

The buckets are a static table over r in [-R, R] (R >= max_distance: farther distances saturate),
computed in float32 on the host with the steps of transformers' `_relative_position_bucket`, so
the bias is the same bit for bit and a jitted decode step only gathers from it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def relative_bucket(relative, bidirectional: bool, num_buckets: int, max_distance: int):
    """relative positions (any int array, key - query) -> bucket ids in [0, num_buckets)."""
    relative = np.asarray(relative, np.int64)
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    exact = num_buckets // 2
    small = distance < exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / np.float32(exact))
                  / np.float32(math.log(max_distance / exact))
                  * np.float32(num_buckets - exact))
    large = exact + np.where(small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(small, distance, large)


def bucket_table(bidirectional: bool, num_buckets: int, max_distance: int, reach: int):
    """(2 * R + 1,) int32 buckets of r = -R .. R, R = max(reach, max_distance)."""
    r = max(reach, max_distance)
    return relative_bucket(np.arange(-r, r + 1), bidirectional, num_buckets,
                           max_distance).astype(np.int32)


def position_bias(table_values, query_pos, key_pos, bidirectional: bool, num_buckets: int,
                  max_distance: int):
    """The additive attention bias (1, H, T, S) float32 of queries at `query_pos` (T,) and keys
    at `key_pos` (S,) (traced ints are fine), from the learned (num_buckets, H) values."""
    table = bucket_table(bidirectional, num_buckets, max_distance, max_distance)
    reach = (table.shape[0] - 1) // 2
    relative = jnp.clip(key_pos[None, :] - query_pos[:, None], -reach, reach) + reach
    buckets = jnp.asarray(table)[relative]                              # (T, S)
    bias = jnp.take(table_values.astype(jnp.float32), buckets, axis=0)  # (T, S, H)
    return jnp.transpose(bias, (2, 0, 1))[None]
