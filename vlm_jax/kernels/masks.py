"""Attention masks described by structure instead of a dense T x S array, so kernels can evaluate any block.

Kinds, combined with AND unless said otherwise: full (bidirectional), causal, prefix-LM (a per-example prefix
length: prefix tokens see each other, the rest is causal: PaliGemma / SimVLM), packed prefix-LM (a prefix end
per query, OR'ed with causal: each packed example's prefix is bidirectional, its suffix causal), segment ids
for key padding or packed sequences (a query sees keys of its own segment; segment id 0 marks padding), and a
sliding window (Gemma 2 / 3 local layers: a query at q sees keys k > q - window; it limits looking back only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["causal"],
                   data_fields=["prefix_len_B", "q_segment_ids_BxT", "kv_segment_ids_BxS", "q_prefix_end_BxT",
                                "window"])
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    causal: bool = False
    prefix_len_B: jax.Array | None = None     # prefix-LM: positions < prefix_len see each other (implies causal)
    q_segment_ids_BxT: jax.Array | None = None
    kv_segment_ids_BxS: jax.Array | None = None
    q_prefix_end_BxT: jax.Array | None = None  # packed prefix-LM: keys < this are visible too (implies causal)
    window: jax.Array | int | None = None      # sliding window (scalar, may be traced): keys k > q - window

    @property
    def is_causal(self) -> bool:
        """Whether keys after the query are hidden (except prefix keys): causal, or implied by a prefix."""
        return self.causal or self.prefix_len_B is not None or self.q_prefix_end_BxT is not None

    def visible(self, q_positions_T: jax.Array, k_positions_N: jax.Array) -> jax.Array:
        """bool [B or 1, T, N]: which keys each query may attend to (positions index the full sequence; the
        per-query arrays are indexed by query number, so `q_positions_T` is 0..T-1)."""
        q, k = q_positions_T[:, None], k_positions_N[None, :]
        visible = jnp.ones((1, q.shape[0], k.shape[1]), bool)
        if self.is_causal:
            visible = visible & (k <= q)[None]
        if self.prefix_len_B is not None:
            in_prefix = (k[None] < self.prefix_len_B[:, None, None]) & (q[None] < self.prefix_len_B[:, None, None])
            visible = visible | in_prefix
        if self.q_prefix_end_BxT is not None:
            visible = visible | (k[None] < self.q_prefix_end_BxT[:, :, None])
        if self.window is not None:
            visible = visible & (k > q - self.window)[None]
        if self.q_segment_ids_BxT is not None:
            last = self.kv_segment_ids_BxS.shape[1] - 1
            kv_ids = jnp.take(self.kv_segment_ids_BxS, jnp.minimum(k_positions_N, last), axis=1)
            same = self.q_segment_ids_BxT[:, :, None] == kv_ids[:, None, :]
            visible = visible & same & (kv_ids[:, None, :] > 0)
        return visible

    def dense(self, length_q: int, length_k: int) -> jax.Array:
        """bool [B or 1, T, S] for sequences of these lengths."""
        return self.visible(jnp.arange(length_q), jnp.arange(length_k))


def unmatchable_padding(kv_segment_ids: jax.Array) -> jax.Array:
    """Key segment ids with padding (0) replaced by -1, which no query carries: kernels that only test equal ids
    then never let a query (not even a padding one) see a padding key."""
    return jnp.where(kv_segment_ids > 0, kv_segment_ids, -1).astype(jnp.int32)
