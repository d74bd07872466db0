"""Transformer building blocks shared by every tower.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `proj`, `layers`);
`vlm_jax.parallel.sharding` maps them to mesh axes. Shape key: B batch, N tokens, D width, M MLP width,
H heads, K head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.parallel.sharded_attention import sharded_attention
from vlm_jax.parallel.sharding import constrain

Dtype = Any
LAYERS_AXIS = "layers"
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


ACTIVATIONS = {  # the MLP non-linearity: big_vision / SigLIP use tanh GELU, OpenAI CLIP its quick GELU
    "gelu_tanh": lambda x: nnx.gelu(x, approximate=True),
    "gelu": lambda x: nnx.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

REMAT_POLICIES = {  # what a rematerialised block keeps for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Hyper-parameters of a pre-LN transformer encoder stack."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"  # a key of REMAT_POLICIES
    attention_impl: str = "auto"
    act: str = "gelu_tanh"  # a key of ACTIVATIONS
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r}; choose from {tuple(ACTIVATIONS)}")


# name: (width, depth, mlp_dim, num_heads), as in the ViT, SigLIP and big_vision papers.
SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}


def parse_size(size: str) -> tuple[int, int, int, int]:
    """(width, depth, mlp_dim, num_heads) of a size name; an unknown name fails naming the choices."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    return SIZES[size]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TowerOptions:
    """What every tower config shares: overrides of its named size, compute dtype, scan, remat, attention."""

    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6

    def spec_for(self, size: str) -> EncoderSpec:
        """The encoder of the named `size` with this config's overrides applied."""
        width, depth, mlp_dim, heads = parse_size(size)
        return EncoderSpec(
            width=self.width or width, depth=self.depth or depth, mlp_dim=self.mlp_dim or mlp_dim,
            num_heads=self.num_heads or heads, dtype=self.dtype, scan=self.scan, remat=self.remat,
            attention_impl=self.attention_impl, act=self.act, norm_eps=self.norm_eps)


def partitioned(init, names: tuple[str | None, ...]):
    """An initializer whose parameter carries logical axis `names`."""
    return nnx.with_partitioning(init, names)


def layer_norm(width: int, dtype: Dtype, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)))


def dense(in_dim: int, out_dim: int, names: tuple[str, str], dtype: Dtype, rngs: nnx.Rngs,
          kernel_init=nnx.initializers.xavier_uniform(), use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(
        in_dim, out_dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=partitioned(kernel_init, names),
        bias_init=partitioned(nnx.initializers.zeros_init(), (names[1],)))


class MlpBlock(nnx.Module):
    """Dense -> activation (a key of ACTIVATIONS) -> Dense."""

    def __init__(self, width: int, mlp_dim: int, dtype: Dtype, rngs: nnx.Rngs, act: str = "gelu_tanh"):
        self.fc1 = dense(width, mlp_dim, ("embed", "mlp"), dtype, rngs)
        self.fc2 = dense(mlp_dim, width, ("mlp", "embed"), dtype, rngs)
        self.act = act

    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        hidden_BxNxF = constrain(self.fc1(x_BxNxD), ("activation_batch", "activation_length", "activation_mlp"))
        return self.fc2(ACTIVATIONS[self.act](hidden_BxNxF))


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with per-head projection kernels: q/k/v [D, H, K], out [H, K, D]."""

    def __init__(self, width: int, num_heads: int, dtype: Dtype, rngs: nnx.Rngs,
                 attention_impl: str = "auto", kv_width: int | None = None):
        """`kv_width`: the width of the tokens attended to, when it differs (cross-attention)."""
        head_dim = width // num_heads
        self.attention_impl = attention_impl

        def projection(in_features, out_features, in_names, out_names, axis):
            init = nnx.initializers.xavier_uniform()  # LinearGeneral initialises the flattened kernel.
            return nnx.LinearGeneral(
                in_features, out_features, axis=axis, dtype=dtype, param_dtype=jnp.float32,
                rngs=rngs, kernel_init=partitioned(init, in_names + out_names),
                bias_init=partitioned(nnx.initializers.zeros_init(), out_names))

        def qkv(in_width):
            return projection(in_width, (num_heads, head_dim), ("embed",), ("heads", "kv"), -1)

        self.query, self.key, self.value = qkv(width), qkv(kv_width or width), qkv(kv_width or width)
        self.out = projection((num_heads, head_dim), width, ("heads", "kv"), ("embed",), (-2, -1))

    def __call__(self, x_BxTxD: jax.Array, kv_BxSxD: jax.Array | None = None,
                 mask: MaskSpec | None = None) -> jax.Array:
        """Self-attention, or cross-attention from `x` to `kv` when given."""
        if kv_BxSxD is None:
            q, k, v = self.project_qkv(x_BxTxD)
        else:
            q, k, v = self.query(x_BxTxD), self.key(kv_BxSxD), self.value(kv_BxSxD)
        y_BxTxHxK = sharded_attention(q, k, v, mask, self.attention_impl)
        return self.out(y_BxTxHxK)

    def project_qkv(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention's q, k and v as one product: the three kernels stacked on a new axis (their layouts
        and shardings unchanged), so x is read once and the backward pass yields one input gradient rather
        than three to add (BENCH-S profile, README "Performance")."""
        projections = (self.query, self.key, self.value)
        kernel_Dx3xHxK = jnp.stack([p.kernel[...] for p in projections], axis=1)
        biases = [p.bias for p in projections]
        bias_3xHxK = None if any(b is None for b in biases) else jnp.stack([b[...] for b in biases])
        x_BxTxD, kernel_Dx3xHxK, bias_3xHxK = nnx.nn.dtypes.promote_dtype(
            (x_BxTxD, kernel_Dx3xHxK, bias_3xHxK), dtype=self.query.dtype)
        qkv_BxTx3xHxK = jnp.einsum("btd,dshk->btshk", x_BxTxD, kernel_Dx3xHxK, precision=self.query.precision)
        if bias_3xHxK is not None:
            qkv_BxTx3xHxK = qkv_BxTx3xHxK + bias_3xHxK
        return qkv_BxTx3xHxK[:, :, 0], qkv_BxTx3xHxK[:, :, 1], qkv_BxTx3xHxK[:, :, 2]


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, spec: EncoderSpec, rngs: nnx.Rngs):
        self.ln1 = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.attn = MultiHeadAttention(spec.width, spec.num_heads, spec.dtype, rngs, spec.attention_impl)
        self.ln2 = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.mlp = MlpBlock(spec.width, spec.mlp_dim, spec.dtype, rngs, spec.act)

    def __call__(self, x_BxNxD: jax.Array, mask: MaskSpec | None = None) -> jax.Array:
        x_BxNxD = x_BxNxD + self.attn(self.ln1(x_BxNxD), mask=mask)
        return x_BxNxD + self.mlp(self.ln2(x_BxNxD))


class Encoder(nnx.Module):
    """A stack of `depth` blocks and a final LayerNorm; optionally scanned and/or rematerialised.

    `make_block(spec, rngs)` builds one block (default EncoderBlock); a call passes `*context` (e.g. a mask, or
    the image tokens a decoder block cross-attends to) to every block after the residual stream.
    """

    def __init__(self, spec: EncoderSpec, rngs: nnx.Rngs, make_block=EncoderBlock):
        self.spec = spec
        self.blocks = build_stack(spec.depth, spec.scan, lambda rngs: make_block(spec, rngs), rngs)
        self.ln_final = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)

    def __call__(self, x_BxNxD: jax.Array, *context) -> jax.Array:
        def step(block, x, _):
            return block(x, *context), None

        x_BxNxD, _ = run_stack(self.blocks, self.spec.scan, REMAT_POLICIES.get(self.spec.remat), step, x_BxNxD)
        return self.ln_final(x_BxNxD)


def build_stack(depth: int, scan: bool, make_block, rngs: nnx.Rngs):
    """`depth` blocks from `make_block(rngs)`: one module with every parameter stacked on a leading "layers" axis
    when `scan` (for run_stack's jax.lax.scan), else an nnx.List."""
    if not scan:
        return nnx.List([make_block(rngs) for _ in range(depth)])

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def make_stack(rngs):
        return make_block(rngs)

    return make_stack(rngs)


def run_stack(blocks, scan: bool, policy, step, x: jax.Array, per_layer: Any = None) -> tuple[jax.Array, Any]:
    """`step(block, x, layer_inputs) -> (x, out)` through a stack of blocks (stacked on axis 0 when `scan`), the
    residual stream constrained to RESIDUAL_AXES after each; `per_layer` inputs and the stacked outs have layers
    on axis 0. `policy`: a jax.checkpoint policy (rematerialise each block) or None.

    Blocks run as split state under jax.lax.scan / jax.checkpoint rather than NNX transforms: decoders and
    evaluators call stacks inside jax loops on a model built outside them, and NNX transforms refuse modules from
    an outer trace."""
    def layer_fn(graphdef):
        def run(x, state, inputs):
            x, out = step(nnx.merge(graphdef, state), x, inputs)
            return constrain(x, RESIDUAL_AXES), out
        return run if policy is None else jax.checkpoint(run, policy=policy)

    if scan:
        graphdef, stacked = nnx.split(blocks)
        run = layer_fn(graphdef)
        return jax.lax.scan(lambda x, inputs: run(x, *inputs), x, (stacked, per_layer))
    outs = []
    for index, block in enumerate(blocks):
        graphdef, state = nnx.split(block)
        x, out = layer_fn(graphdef)(x, state, jax.tree.map(lambda a: a[index], per_layer))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


class MapHead(nnx.Module):
    """Multihead attention pooling: one learned probe attends over the tokens."""

    def __init__(self, spec: EncoderSpec, rngs: nnx.Rngs):
        self.probe = nnx.Param(partitioned(nnx.initializers.xavier_uniform(), (None, "embed"))(
            rngs.params(), (1, spec.width), jnp.float32))
        self.attn = MultiHeadAttention(spec.width, spec.num_heads, spec.dtype, rngs, spec.attention_impl)
        self.ln = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.mlp = MlpBlock(spec.width, spec.mlp_dim, spec.dtype, rngs, spec.act)
        self.dtype = spec.dtype

    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        batch = x_BxNxD.shape[0]
        probe_Bx1xD = jnp.broadcast_to(self.probe[...].astype(self.dtype), (batch, *self.probe.shape))
        y_Bx1xD = self.attn(probe_Bx1xD, x_BxNxD)
        y_Bx1xD = y_Bx1xD + self.mlp(self.ln(y_Bx1xD))
        return y_Bx1xD[:, 0]


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, [height * width, dim]."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 or 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)
