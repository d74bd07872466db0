"""Text decoder that cross-attends to image tokens (captioning, CapPa, CoCa's multimodal layers), with a KV cache.

Pre-LN blocks: causal self-attention, cross-attention to every image token, MLP. Learned positions, an untied
output projection (zero-initialised by default, as CapPa). The input table has one extra row, [MASK] (id =
vocab size), for CapPa's parallel prediction (those rows attend to every position: full, not causal), and is
padded to a multiple of 128 rows so that tensor parallelism can split it.

Decoding uses a functional cache (a dict of arrays, batch on axis 0, layers on axis 1): `init_cache` projects the
image tokens' keys and values once per layer, `extend` appends T tokens at the cache's position. The
`vlm_jax.decoding` module drives it. The cache pieces (`cached_self_attention`, `empty_self_cache`,
`stacked_image_kv`, `extend_stack`) also serve CoCa's unimodal and multimodal stacks (models/coca.py).

Shape key: B batch, L tokens, N image tokens, D width, E image width, V vocabulary, S cache length,
Y layers, H heads, K head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.kernels.attention import dot_product_attention
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.models.layers import (RESIDUAL_AXES, Encoder, EncoderSpec, MlpBlock, MultiHeadAttention, TowerOptions,
                                   dense, layer_norm, partitioned)
from vlm_jax.parallel.sharding import constrain

Cache = dict[str, jax.Array]
ROW_MULTIPLE = 128  # the input table's rows are padded to this, so the vocabulary axis splits over devices


def input_rows(vocab_size: int) -> int:
    """Rows of the input embedding: the vocabulary and [MASK], rounded up to a multiple of ROW_MULTIPLE."""
    return -(-(vocab_size + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


@dataclasses.dataclass(frozen=True)
class DecoderConfig(TowerOptions):
    size: str = "B"
    vocab_size: int = 32_000
    max_len: int = 64
    image_width: int = 768  # the width of the image tokens attended to
    zero_init_head: bool = True

    def encoder_spec(self) -> EncoderSpec:
        return self.spec_for(self.size)

    @property
    def mask_id(self) -> int:
        """The [MASK] token of parallel prediction: one past the vocabulary."""
        return self.vocab_size


class DecoderBlock(nnx.Module):
    """x + self_attn(ln(x)); x + cross_attn(ln(x), image); x + mlp(ln(x))."""

    def __init__(self, spec: EncoderSpec, image_width: int, rngs: nnx.Rngs):
        self.ln_self = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.self_attn = MultiHeadAttention(spec.width, spec.num_heads, spec.dtype, rngs, spec.attention_impl)
        self.ln_cross = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.cross_attn = MultiHeadAttention(spec.width, spec.num_heads, spec.dtype, rngs, spec.attention_impl,
                                             kv_width=image_width)
        self.ln_mlp = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.mlp = MlpBlock(spec.width, spec.mlp_dim, spec.dtype, rngs, spec.act)

    def __call__(self, x_BxLxD: jax.Array, image_BxNxE: jax.Array, mask: MaskSpec) -> jax.Array:
        x_BxLxD = x_BxLxD + self.self_attn(self.ln_self(x_BxLxD), mask=mask)
        x_BxLxD = x_BxLxD + self.cross_attn(self.ln_cross(x_BxLxD), image_BxNxE)
        return x_BxLxD + self.mlp(self.ln_mlp(x_BxLxD))

    def image_kv(self, image_BxNxE: jax.Array) -> dict[str, jax.Array]:
        """This block's cross-attention keys and values of the image tokens (computed once per decode)."""
        return {"cross_k": self.cross_attn.key(image_BxNxE), "cross_v": self.cross_attn.value(image_BxNxE)}

    def extend(self, x_BxTxD: jax.Array, layer_cache: Cache, position: jax.Array) -> tuple[jax.Array, Cache]:
        """The block on T new tokens at `position`, reading and updating this layer's cache."""
        y_BxTxD, layer_cache = cached_self_attention(self.self_attn, self.ln_self(x_BxTxD), layer_cache, position)
        x_BxTxD = x_BxTxD + y_BxTxD
        cross = self.cross_attn
        y = dot_product_attention(cross.query(self.ln_cross(x_BxTxD)), layer_cache["cross_k"],
                                  layer_cache["cross_v"], impl="xla")
        x_BxTxD = x_BxTxD + cross.out(y)
        return x_BxTxD + self.mlp(self.ln_mlp(x_BxTxD)), layer_cache


def cached_self_attention(attn: MultiHeadAttention, h_BxTxD: jax.Array, layer_cache: Cache, position: jax.Array
                          ) -> tuple[jax.Array, Cache]:
    """Causal self-attention of T new (normalised) tokens written at `position`: their keys and values go into
    the layer's "self_k" / "self_v" [B, S, H, K], and each attends to every cached position up to its own.
    Returns the attention output [B, T, D] (after the output projection) and the updated layer cache."""
    layer_cache = dict(layer_cache)
    for name, projection in (("self_k", attn.key), ("self_v", attn.value)):
        layer_cache[name] = jax.lax.dynamic_update_slice_in_dim(
            layer_cache[name], projection(h_BxTxD).astype(layer_cache[name].dtype), position, axis=1)
    length, cache_len = h_BxTxD.shape[1], layer_cache["self_k"].shape[1]
    visible_1xTxS = (jnp.arange(cache_len)[None, :] <= position + jnp.arange(length)[:, None])[None]
    y = dot_product_attention(attn.query(h_BxTxD), layer_cache["self_k"], layer_cache["self_v"],
                              mask_BxTxS=visible_1xTxS, impl="xla")
    return attn.out(y), layer_cache


def empty_self_cache(spec: EncoderSpec, batch: int, cache_len: int, dtype) -> Cache:
    """Zero self-attention keys and values for every layer of a stack: [B, Y, S, H, K] each."""
    empty = jnp.zeros((batch, spec.depth, cache_len, spec.num_heads, spec.width // spec.num_heads), dtype)
    return {"self_k": empty, "self_v": empty}


def stacked_image_kv(stack: Encoder, image_BxNxE: jax.Array) -> Cache:
    """Every DecoderBlock's cross-attention keys and values of the image tokens, layers on axis 1."""
    if stack.spec.scan:
        graphdef, blocks = nnx.split(stack.blocks)
        return jax.vmap(lambda block: nnx.merge(graphdef, block).image_kv(image_BxNxE), out_axes=1)(blocks)
    per_layer = [block.image_kv(image_BxNxE) for block in stack.blocks]
    return {key: jnp.stack([kv[key] for kv in per_layer], axis=1) for key in per_layer[0]}


def extend_stack(stack: Encoder, x_BxTxD: jax.Array, layers: Cache, position: jax.Array) -> tuple[jax.Array, Cache]:
    """`stack` (an Encoder whose blocks have `extend`) on T new tokens at `position` with its cache (layers on
    axis 1), scanned when the stack is; returns the final-LayerNormed outputs and the updated cache.

    The scanned stack runs as split state under `jax.lax.scan` rather than `nnx.scan`: decoding calls this inside
    `jax.lax.while_loop` on a model built outside it, and NNX transforms refuse modules from an outer trace."""
    if stack.spec.scan:
        graphdef, blocks = nnx.split(stack.blocks)

        def run_block(x, inputs):
            block, layer_cache = inputs
            x, layer_cache = nnx.merge(graphdef, block).extend(x, layer_cache, position)
            return constrain(x, RESIDUAL_AXES), layer_cache

        per_layer = {key: jnp.moveaxis(value, 1, 0) for key, value in layers.items()}
        x_BxTxD, per_layer = jax.lax.scan(run_block, x_BxTxD, (blocks, per_layer))
        layers = {key: jnp.moveaxis(value, 0, 1) for key, value in per_layer.items()}
    else:
        updated = []
        for index, block in enumerate(stack.blocks):
            x_BxTxD, layer = block.extend(x_BxTxD, {k: v[:, index] for k, v in layers.items()}, position)
            x_BxTxD = constrain(x_BxTxD, RESIDUAL_AXES)
            updated.append(layer)
        layers = {key: jnp.stack([layer[key] for layer in updated], axis=1) for key in layers}
    return stack.ln_final(x_BxTxD), layers


class TextDecoder(nnx.Module):
    """Token + learned position embeddings, a stack of DecoderBlocks, LayerNorm, output projection -> logits."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        spec = config.encoder_spec()
        self.config, self.spec = config, spec
        self.token_embed = nnx.Embed(
            input_rows(config.vocab_size), spec.width, dtype=config.dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.posemb = nnx.Param(partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
            rngs.params(), (config.max_len, spec.width), jnp.float32))
        self.decoder = Encoder(spec, rngs, make_block=lambda s, r: DecoderBlock(s, config.image_width, r))
        head_init = nnx.initializers.zeros_init() if config.zero_init_head else nnx.initializers.xavier_uniform()
        self.head = dense(spec.width, config.vocab_size, ("embed", "vocab"), config.dtype, rngs, head_init)

    def check_length(self, length: int) -> None:
        if length > self.config.max_len:
            raise ValueError(f"decode length {length} exceeds the decoder's position table of "
                             f"{self.config.max_len} (model.text.max_len)")

    def __call__(self, tokens_BxL: jax.Array, image_BxNxE: jax.Array, parallel_B: jax.Array | None = None
                 ) -> jax.Array:
        """float32 logits [B, L, V] with teacher forcing: causal, except rows where `parallel_B` is true, whose
        inputs become [MASK] and whose positions all see each other (CapPa's parallel prediction)."""
        length = tokens_BxL.shape[1]
        self.check_length(length)
        if parallel_B is None:
            mask = MaskSpec(causal=True)
        else:
            tokens_BxL = jnp.where(parallel_B[:, None], self.config.mask_id, tokens_BxL)
            mask = MaskSpec(prefix_len_B=jnp.where(parallel_B, length, 0).astype(jnp.int32))
        x_BxLxD = self.token_embed(tokens_BxL) + self.posemb[:length].astype(self.config.dtype)
        return self.logits(self.decoder(x_BxLxD, image_BxNxE.astype(self.config.dtype), mask))

    def logits(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.head(x_BxLxD).astype(jnp.float32)

    def init_cache(self, image_BxNxE: jax.Array, cache_len: int, dtype=None) -> Cache:
        """An empty cache of `cache_len` positions holding every layer's image keys and values."""
        self.check_length(cache_len)
        image_BxNxE = image_BxNxE.astype(self.config.dtype)
        cross = stacked_image_kv(self.decoder, image_BxNxE)
        dtype = dtype or self.config.dtype
        return {**empty_self_cache(self.spec, image_BxNxE.shape[0], cache_len, dtype),
                **{k: v.astype(dtype) for k, v in cross.items()}, "position": jnp.zeros((), jnp.int32)}

    def extend(self, tokens_BxT: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """float32 logits [B, T, V] of T new tokens written at the cache's position, and the updated cache."""
        position, length = cache["position"], tokens_BxT.shape[1]
        posemb_TxD = jax.lax.dynamic_slice_in_dim(self.posemb[...], position, length, axis=0)
        x_BxTxD = self.token_embed(tokens_BxT) + posemb_TxD.astype(self.config.dtype)
        layers = {key: value for key, value in cache.items() if key != "position"}
        x_BxTxD, layers = extend_stack(self.decoder, x_BxTxD, layers, position)
        return self.logits(x_BxTxD), {**layers, "position": position + length}
