"""Gemma-architecture decoder-only language model (Gemma 1, 2 and 3 text towers), with a KV cache.

RMSNorm x * (1 + scale) (scale zero-initialised, float32 math); RoPE over split halves with integer positions
given by the caller; multi-head, grouped-query or multi-query attention with a head dim independent of the
width; GeGLU MLP (tanh GELU); embeddings scaled by sqrt(width) and tied to the output projection. Options per
size: attention and final logit softcaps (Gemma 2), post-attention / post-MLP norms (Gemma 2, 3), QK-norm
(Gemma 3), sliding-window local layers in a repeating pattern with their own RoPE base (Gemma 2: LG, Gemma 3:
LLLLLG). Each layer's window and RoPE base are arrays scanned with the stacked parameters, so the depth need
not be a multiple of the pattern.

The caller embeds (`embed`), runs the stack with positions and a MaskSpec (`__call__`: causal, prefix-LM or
packed; local layers add their window to it) and projects (`logits`). Decoding uses a functional cache (a dict
of arrays, batch on axis 0, layers on axis 1, a 0-d "position" write slot shared by all rows) and `extend`.

Shape key: B batch, L tokens, T new tokens, S cache length, D width, M MLP width, H query heads, G key/value
heads, K head dim, V vocabulary, Y layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.kernels.attention import dot_product_attention
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.models.layers import REMAT_POLICIES, TowerOptions, build_stack, partitioned, run_stack
from vlm_jax.parallel.sharded_attention import sharded_attention
from vlm_jax.parallel.sharding import constrain

Cache = dict[str, jax.Array]
EPS = 1e-6
GLOBAL_WINDOW = 1 << 30  # the window of a global layer when some layers are local: sees every earlier key

# Published shapes. layer_pattern repeats over depth: "L" local (sliding window), "G" global.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256,
                 attn_softcap=50.0, final_softcap=30.0, post_norms=True, qk_norm=True, window=16,
                 layer_pattern="LG", rope_base=1_000_000.0, rope_base_local=10_000.0),
    "gemma-2b": dict(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256,
                     vocab_size=256_128, attn_softcap=0.0, final_softcap=0.0, post_norms=False, qk_norm=False,
                     window=0, layer_pattern="G", rope_base=10_000.0, rope_base_local=10_000.0),
    "gemma2-2b": dict(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256,
                      vocab_size=256_128, attn_softcap=50.0, final_softcap=30.0, post_norms=True, qk_norm=False,
                      window=4096, layer_pattern="LG", rope_base=10_000.0, rope_base_local=10_000.0),
    "gemma3-1b": dict(width=1152, depth=26, mlp_dim=6912, num_heads=4, num_kv_heads=1, head_dim=256,
                      vocab_size=262_144, attn_softcap=0.0, final_softcap=0.0, post_norms=True, qk_norm=True,
                      window=512, layer_pattern="LLLLLG", rope_base=1_000_000.0, rope_base_local=10_000.0),
}


@dataclasses.dataclass(frozen=True)
class GemmaSpec:
    """Every hyper-parameter of a Gemma LM, resolved (softcap None: off; window None: every layer global)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    attn_softcap: float | None
    final_softcap: float | None
    post_norms: bool
    qk_norm: bool
    window: int | None
    layer_pattern: str
    rope_base: float
    rope_base_local: float
    dtype: Any = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2 or not self.layer_pattern or set(self.layer_pattern) - set("LG"):
            raise ValueError(f"head_dim {self.head_dim} must be even and layer_pattern {self.layer_pattern!r} "
                             "made of L (local) and G (global)")
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {self.remat!r}; choose from none, {', '.join(REMAT_POLICIES)}")

    def is_local(self, layer: int) -> bool:
        return self.window is not None and self.layer_pattern[layer % len(self.layer_pattern)] == "L"

    def per_layer(self) -> dict[str, np.ndarray]:
        """Each layer's sliding window (GLOBAL_WINDOW for global layers) and RoPE base, layers on axis 0."""
        local = np.array([self.is_local(i) for i in range(self.depth)])
        return {"window": np.where(local, self.window or 0, GLOBAL_WINDOW).astype(np.int32),
                "rope_base": np.where(local, self.rope_base_local, self.rope_base).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class GemmaConfig(TowerOptions):
    """A named size with per-field overrides (None keeps the size's value; a softcap or window of 0 is off)."""

    size: str = "tiny"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    post_norms: bool | None = None
    qk_norm: bool | None = None
    window: int | None = None
    layer_pattern: str | None = None
    rope_base: float | None = None
    rope_base_local: float | None = None

    def spec(self) -> GemmaSpec:
        """The named size with this config's overrides applied."""
        if self.size not in SIZES:
            raise ValueError(f"unknown Gemma size {self.size!r}; known sizes: {', '.join(SIZES)}")
        fields = {key: value if getattr(self, key) is None else getattr(self, key)
                  for key, value in SIZES[self.size].items()}
        for key in ("attn_softcap", "final_softcap", "window"):
            fields[key] = fields[key] or None
        return GemmaSpec(**fields, dtype=self.dtype, scan=self.scan, remat=self.remat,
                         attention_impl=self.attention_impl)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], in_axis=0, out_axis=-1
           ) -> nnx.Param:
    """A float32 (fan-in scaled) kernel with logical axis `names`."""
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
    return nnx.Param(partitioned(init, names)(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale), in float32, returned in the input dtype."""

    def __init__(self, dim: int, names: tuple[str], rngs: nnx.Rngs):
        self.scale = nnx.Param(partitioned(nnx.initializers.zeros_init(), names)(rngs.params(), (dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)
        return (normed * (1 + self.scale[...])).astype(x.dtype)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, base: jax.Array | float) -> jax.Array:
    """Rotary position embedding over split halves (the first half rotates with the second), float32 math."""
    half = x_BxLxHxK.shape[-1] // 2
    timescale_K2 = jnp.asarray(base, jnp.float32) ** (2 * jnp.arange(half, dtype=jnp.float32) / (2 * half))
    angle_BxLx1xK2 = (positions_BxL.astype(jnp.float32)[..., None] / timescale_K2)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    first, second = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


class GemmaAttention(nnx.Module):
    """Projections of multi-head / grouped-query attention: q [D, H, K], k and v [D, G, K], out [H, K, D]."""

    def __init__(self, spec: GemmaSpec, rngs: nnx.Rngs):
        width, heads, kv_heads, dim = spec.width, spec.num_heads, spec.num_kv_heads, spec.head_dim
        kv_axis = "heads" if kv_heads == heads else None  # fewer kv heads than devices: keep them whole
        self.query = _param(rngs, (width, heads, dim), ("embed", "heads", "kv"), 0, (1, 2))
        self.key = _param(rngs, (width, kv_heads, dim), ("embed", kv_axis, "kv"), 0, (1, 2))
        self.value = _param(rngs, (width, kv_heads, dim), ("embed", kv_axis, "kv"), 0, (1, 2))
        self.output = _param(rngs, (heads, dim, width), ("heads", "kv", "embed"), (0, 1), 2)
        self.q_norm = RMSNorm(dim, ("kv",), rngs) if spec.qk_norm else None
        self.k_norm = RMSNorm(dim, ("kv",), rngs) if spec.qk_norm else None
        self.dtype = spec.dtype

    def qkv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, rope_base) -> tuple[jax.Array, ...]:
        """Queries [B, L, H, K], keys and values [B, L, G, K]; queries and keys QK-normed and rotated."""
        def project(kernel):
            return jnp.einsum("bld,dhk->blhk", x_BxLxD, kernel[...].astype(self.dtype))

        q, k, v = project(self.query), project(self.key), project(self.value)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, positions_BxL, rope_base), rope(k, positions_BxL, rope_base), v

    def project_out(self, y_BxLxHxK: jax.Array) -> jax.Array:
        return jnp.einsum("blhk,hkd->bld", y_BxLxHxK, self.output[...].astype(self.dtype))


class GeGLU(nnx.Module):
    """gelu_tanh(x W_gate) * (x W_up), then W_down."""

    def __init__(self, width: int, mlp_dim: int, dtype, rngs: nnx.Rngs):
        self.gate = _param(rngs, (width, mlp_dim), ("embed", "mlp"))
        self.up = _param(rngs, (width, mlp_dim), ("embed", "mlp"))
        self.down = _param(rngs, (mlp_dim, width), ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate_BxLxM = nnx.gelu(x_BxLxD @ self.gate[...].astype(self.dtype), approximate=True)
        hidden_BxLxM = gate_BxLxM * (x_BxLxD @ self.up[...].astype(self.dtype))
        hidden_BxLxM = constrain(hidden_BxLxM, ("activation_batch", "activation_length", "activation_mlp"))
        return hidden_BxLxM @ self.down[...].astype(self.dtype)


# attend(q, k, v) -> (attention output [B, L, H, K], anything the caller wants back, e.g. an updated cache)
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class GemmaBlock(nnx.Module):
    """x + post_norm(attn(pre_norm(x))); x + post_norm(mlp(pre_norm(x))) (post-norms optional)."""

    def __init__(self, spec: GemmaSpec, rngs: nnx.Rngs):
        def norm(enabled=True):
            return RMSNorm(spec.width, ("embed",), rngs) if enabled else None

        self.pre_attn_norm, self.attn, self.post_attn_norm = norm(), GemmaAttention(spec, rngs), norm(spec.post_norms)
        self.pre_mlp_norm, self.mlp = norm(), GeGLU(spec.width, spec.mlp_dim, spec.dtype, rngs)
        self.post_mlp_norm = norm(spec.post_norms)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, rope_base, attend: Attend
                 ) -> tuple[jax.Array, Any]:
        y_BxLxHxK, extra = attend(*self.attn.qkv(self.pre_attn_norm(x_BxLxD), positions_BxL, rope_base))
        y_BxLxD = self.attn.project_out(y_BxLxHxK)
        if self.post_attn_norm is not None:
            y_BxLxD = self.post_attn_norm(y_BxLxD)
        x_BxLxD = x_BxLxD + y_BxLxD
        y_BxLxD = self.mlp(self.pre_mlp_norm(x_BxLxD))
        if self.post_mlp_norm is not None:
            y_BxLxD = self.post_mlp_norm(y_BxLxD)
        return x_BxLxD + y_BxLxD, extra


def _check_positions(x_BxLxD: jax.Array, positions_BxL: jax.Array) -> None:
    if positions_BxL.shape != x_BxLxD.shape[:2]:
        raise ValueError(f"positions {positions_BxL.shape} do not match the tokens {x_BxLxD.shape[:2]} (want [B, L])")


def _write(cache_BxSxGxK: jax.Array, new_BxTxGxK: jax.Array, position: jax.Array) -> jax.Array:
    """The cache with T new entries written from slot `position` on."""
    return jax.lax.dynamic_update_slice_in_dim(cache_BxSxGxK, new_BxTxGxK.astype(cache_BxSxGxK.dtype), position, axis=1)


class GemmaLM(nnx.Module):
    """Token embedding (x sqrt(width)), a stack of GemmaBlocks, final RMSNorm, tied float32 logits."""

    def __init__(self, config: GemmaConfig, rngs: nnx.Rngs):
        spec = self.spec = config.spec()
        self.embedder = nnx.Embed(
            spec.vocab_size, spec.width, dtype=spec.dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=partitioned(nnx.initializers.normal(0.01), ("vocab", "embed")))
        self.blocks = build_stack(spec.depth, spec.scan, lambda rngs: GemmaBlock(spec, rngs), rngs)
        self.final_norm = RMSNorm(spec.width, ("embed",), rngs)

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def dtype(self):
        return self.spec.dtype

    def embed(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token embeddings in the compute dtype, scaled by sqrt(width)."""
        return self.embedder(tokens_BxL) * jnp.sqrt(self.spec.width).astype(self.spec.dtype)

    def logits(self, hidden_BxLxD: jax.Array) -> jax.Array:
        """float32 logits [B, L, V] from the tied embedding, with the final softcap when configured."""
        table_VxD = self.embedder.embedding[...].astype(self.spec.dtype)
        logits = jnp.einsum("bld,vd->blv", hidden_BxLxD, table_VxD, preferred_element_type=jnp.float32)
        cap = self.spec.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def _layers(self, step, x_BxLxD: jax.Array, per_layer: Any, remat: bool = False) -> tuple[jax.Array, Any]:
        """`step(block, x, layer_inputs) -> (x, out)` through the stack (layers.run_stack); rematerialised by the
        config's policy when `remat`."""
        policy = REMAT_POLICIES.get(self.spec.remat) if remat else None
        return run_stack(self.blocks, self.spec.scan, policy, step, x_BxLxD, per_layer)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, mask: MaskSpec) -> jax.Array:
        """Hidden states [B, L, D] after the final norm. `mask` comes from the caller; local layers replace its
        window with theirs (and global ones with GLOBAL_WINDOW) when the model has local layers."""
        _check_positions(x_BxLxD, positions_BxL)
        spec = self.spec
        windowed = any(spec.is_local(i) for i in range(spec.depth))

        def step(block, x, layer):
            layer_mask = dataclasses.replace(mask, window=layer["window"]) if windowed else mask

            def attend(q, k, v):
                return sharded_attention(q, k, v, layer_mask, spec.attention_impl, softcap=spec.attn_softcap), None
            return block(x, positions_BxL, layer["rope_base"], attend)

        x_BxLxD, _ = self._layers(step, x_BxLxD, spec.per_layer(), remat=True)
        return self.final_norm(x_BxLxD)

    def init_cache(self, batch: int, cache_len: int, dtype=None) -> Cache:
        """An empty cache: keys and values [B, Y, S, G, K], slot validity [B, S], write position 0."""
        spec = self.spec
        empty = jnp.zeros((batch, spec.depth, cache_len, spec.num_kv_heads, spec.head_dim), dtype or spec.dtype)
        return {"k": empty, "v": empty, "valid": jnp.zeros((batch, cache_len), bool),
                "position": jnp.zeros((), jnp.int32)}

    def extend(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, cache: Cache, *, bidirectional: bool = False,
               valid_BxT: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """Hidden states [B, T, D] of T new tokens written at the cache's position, and the updated cache.

        A new token sees the valid cached slots before it and, among the new tokens, every valid one when
        `bidirectional` (a prefix-LM prefill) or those up to itself otherwise; local layers add their window.
        `valid_BxT` (default all true) marks real tokens: left padding of right-aligned prompts is never seen."""
        _check_positions(x_BxTxD, positions_BxT)
        length, cache_len = x_BxTxD.shape[1], cache["valid"].shape[1]
        try:
            end = int(cache["position"]) + length
        except jax.errors.JAXTypeError:  # traced position: only the length is static
            end = length
        if end > cache_len:
            raise ValueError(f"decode length {end} is beyond the cache length {cache_len}")
        spec, position = self.spec, cache["position"]
        valid_BxT = jnp.ones(x_BxTxD.shape[:2], bool) if valid_BxT is None else valid_BxT.astype(bool)
        valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BxT, position, axis=1)
        slots_1xS = jnp.arange(cache_len)[None]
        query_Tx1 = position + jnp.arange(length)[:, None]
        end_Tx1 = jnp.full_like(query_Tx1, position + length) if bidirectional else query_Tx1 + 1
        seen_BxTxS = valid_BxS[:, None, :] & (slots_1xS < end_Tx1)[None]

        def step(block, x, layer):
            visible_BxTxS = seen_BxTxS & (slots_1xS > query_Tx1 - layer["window"])[None]

            def attend(q, k, v):
                k_BxSxGxK, v_BxSxGxK = _write(layer["k"], k, position), _write(layer["v"], v, position)
                y = dot_product_attention(q, k_BxSxGxK.astype(q.dtype), v_BxSxGxK.astype(q.dtype),
                                          mask_BxTxS=visible_BxTxS, impl="xla", softcap=spec.attn_softcap)
                return y, {"k": k_BxSxGxK, "v": v_BxSxGxK}
            return block(x, positions_BxT, layer["rope_base"], attend)

        per_layer = {**spec.per_layer(), "k": jnp.moveaxis(cache["k"], 1, 0), "v": jnp.moveaxis(cache["v"], 1, 0)}
        x_BxTxD, kv = self._layers(step, x_BxTxD, per_layer)
        return self.final_norm(x_BxTxD), {"k": jnp.moveaxis(kv["k"], 0, 1), "v": jnp.moveaxis(kv["v"], 0, 1),
                                          "valid": valid_BxS, "position": position + length}
