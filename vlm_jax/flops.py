"""Analytic model FLOPs (multiply-adds count 2), the numerator of MFU.

Training counts 3x the forward pass (forward + two backward matmuls). Embedding lookups are free.
"""

from __future__ import annotations

import ml_collections

from vlm_jax.models.text import TextConfig
from vlm_jax.models.token_dropout import kept_count
from vlm_jax.models.vit import ViTConfig, parse_variant


def encoder_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
    """One sequence through `depth` pre-LN blocks: q/k/v/out and MLP matmuls plus attention."""
    matmuls = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and probs @ v
    return depth * (matmuls + attention)


def trained_patches(image: ViTConfig) -> int:
    """Patch tokens the encoder blocks see in a training step: those patch dropout keeps."""
    patches = (image.image_size // parse_variant(image.variant)[1]) ** 2
    return kept_count(patches, image.patch_dropout)


def vit_forward_flops(image: ViTConfig) -> int:
    """The patch embedding and encoder of a ViT in training (no pooling head; patch dropout counted)."""
    spec, patch = image.encoder_spec(), parse_variant(image.variant)[1]
    patches = (image.image_size // patch) ** 2
    tokens = trained_patches(image) + image.has_cls_token
    return 2 * patches * patch * patch * 3 * spec.width + encoder_forward_flops(tokens, spec.width, spec.depth,
                                                                                spec.mlp_dim)


def decoder_forward_flops(tokens: int, image_tokens: int, image_width: int, width: int, depth: int, mlp_dim: int,
                          vocab: int) -> int:
    """One caption through `depth` decoder blocks (self-attention, cross-attention to `image_tokens`, MLP) and
    the output projection."""
    cross = 2 * tokens * 2 * width * width + 2 * image_tokens * 2 * image_width * width
    cross += 2 * 2 * tokens * image_tokens * width
    return encoder_forward_flops(tokens, width, depth, mlp_dim) + depth * cross + 2 * tokens * width * vocab


def captioner_train_flops_per_sample(model: ml_collections.ConfigDict) -> int:
    """Training FLOPs for one image-caption pair of the encoder-decoder captioner (the decoder attends to the
    tokens patch dropout and image-token dropout keep)."""
    from vlm_jax.tasks.towers import decoder_config, vit_config  # the towers' configs live with the tasks
    image = vit_config(model, pool="none")
    img = image.encoder_spec()
    decoder = decoder_config(model, img.width)
    dec = decoder.encoder_spec()
    image_tokens = kept_count(trained_patches(image), model.image_token_dropout)
    return 3 * (vit_forward_flops(image) + decoder_forward_flops(
        model.text.max_len, image_tokens, img.width, dec.width, dec.depth, dec.mlp_dim, decoder.vocab_size))


def two_towers_train_flops_per_sample(model: ml_collections.ConfigDict, image_frozen: bool = False) -> int:
    """Training FLOPs for one image-text pair of the contrastive two-tower model; a frozen image tower (LiT)
    runs its forward pass only."""
    image = ViTConfig(variant=model.image.variant, image_size=model.image.image_size, pool=model.image.pool,
                      width=model.image.width, depth=model.image.depth, mlp_dim=model.image.mlp_dim,
                      num_heads=model.image.num_heads, patch_dropout=model.image.patch_dropout)
    text = TextConfig(size=model.text.size, max_len=model.text.max_len, width=model.text.width,
                      depth=model.text.depth, mlp_dim=model.text.mlp_dim, num_heads=model.text.num_heads)
    img, txt = image.encoder_spec(), text.encoder_spec()
    patch = parse_variant(image.variant)[1]
    patches, kept = (image.image_size // patch) ** 2, trained_patches(image)
    image_tokens = kept + (image.pool == "tok" or model.arch == "clip")  # CLIP always has a class token
    image_forward = (2 * patches * patch * patch * 3 * img.width
                     + encoder_forward_flops(image_tokens, img.width, img.depth, img.mlp_dim)
                     + 2 * img.width * model.embed_dim * model.image_projection)
    if image.pool == "map":
        image_forward += 2 * (2 * kept * 2 * img.width * img.width + 2 * 2 * img.width * img.width
                              + 2 * 2 * img.width * img.mlp_dim + 2 * 2 * kept * img.width)
    text_forward = (encoder_forward_flops(text.max_len, txt.width, txt.depth, txt.mlp_dim)
                    + 2 * txt.width * model.embed_dim)
    return (1 if image_frozen else 3) * image_forward + 3 * text_forward


def attention_pool_forward_flops(queries: int, tokens: int, width: int) -> int:
    """`queries` learned queries attending over `tokens` (q/out projections per query, k/v per token)."""
    return 2 * queries * 2 * width * width + 2 * tokens * 2 * width * width + 2 * 2 * queries * tokens * width


def coca_train_flops_per_sample(model: ml_collections.ConfigDict, image_frozen: bool = False) -> int:
    """Training FLOPs for one image-caption pair of CoCa: ViT, two attentional poolers and the image projection
    (forward only when frozen, LiT); the unimodal text layers over L + 1 tokens (CLS), the text projection and the
    multimodal layers cross-attending to the caption queries, with the output head."""
    from vlm_jax.tasks.towers import decoder_config, text_config, vit_config
    image = vit_config(model, pool="none")
    img = image.encoder_spec()
    txt, dec = text_config(model).encoder_spec(), decoder_config(model, img.width).encoder_spec()
    patches = trained_patches(image)
    queries, length = model.coca.caption_queries, model.text.max_len
    image_forward = (vit_forward_flops(image) + attention_pool_forward_flops(1, patches, img.width)
                     + attention_pool_forward_flops(queries, patches, img.width) + 2 * img.width * model.embed_dim)
    text_forward = (encoder_forward_flops(length + 1, txt.width, txt.depth, txt.mlp_dim)
                    + 2 * txt.width * model.embed_dim
                    + decoder_forward_flops(length, queries, img.width, dec.width, dec.depth, dec.mlp_dim,
                                            model.text.vocab_size))
    return (1 if image_frozen else 3) * image_forward + 3 * text_forward


def gemma_forward_flops(tokens: int, lm) -> int:
    """`tokens` positions through a Gemma LM (GemmaSpec): q/k/v/out projections, GeGLU MLP, attention over every
    position (an upper bound for windowed layers) and the tied output projection."""
    heads, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
    per_layer = 2 * tokens * (2 * lm.width * heads + 2 * lm.width * kv + 3 * lm.width * lm.mlp_dim)
    per_layer += 2 * 2 * tokens * tokens * heads
    return lm.depth * per_layer + 2 * tokens * lm.width * lm.vocab_size


def vlm_train_flops_per_sample(model: ml_collections.ConfigDict, images: int, length: int,
                               image_frozen: bool = False) -> int:
    """Training FLOPs for one row of the decoder-only VLM: `images` ViT passes (forward only when frozen), their
    projection, the LM over `length` positions, and with PRIOR the frozen reference LM's forward pass."""
    from vlm_jax.tasks.prior import reference_model_config
    from vlm_jax.tasks.towers import gemma_config, vit_config
    image = vit_config(model, pool="none")
    lm = gemma_config(model).spec()
    patches = (image.image_size // parse_variant(image.variant)[1]) ** 2
    projector = 2 * patches * image.encoder_spec().width * lm.width
    if model.vlm.projector == "mlp":
        projector += 2 * patches * lm.width * lm.width
    total = (1 if image_frozen else 3) * images * vit_forward_flops(image)
    total += 3 * (images * projector + gemma_forward_flops(length, lm))
    if model.vlm.prior_reference is not None:
        total += gemma_forward_flops(length, gemma_config(reference_model_config(model.vlm.prior_reference)).spec())
    return total
