"""BENCH-S: SigLIP ViT-S/16 at 224 px + 12-layer width-384 text encoder, batch 32, float32, AdamW.

    python -m vlm_jax.bench step --config=configs/bench/siglip_s16.py

55.6M parameters, about 36 GFLOPs per sample per training step (DESIGN.md). Synthetic inputs: the step
is timed, not the data pipeline. Data fields are unused placeholders.
"""

from vlm_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.batch_size = 32
    c.total_steps = 10_000
    c.model.loss = "sigmoid"
    c.model.embed_dim = 384
    c.model.image.variant = "S/16"
    c.model.image.image_size = 224
    c.model.image.pool = "tok"
    c.model.text.size = "S"
    c.model.text.vocab_size = 32_000
    c.model.text.max_len = 64
    c.optim.name = "adamw"
    c.data.train_shards = "unused"
    c.data.tokenizer = "unused"
    return c
