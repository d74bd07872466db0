"""CLIP ViT-B/16 in OpenAI's architecture (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; open_clip's ViT-B-16 recipe): model.arch "clip" (class token, LayerNorm before the image
encoder, quick GELU, LayerNorm eps 1e-5, no patch bias, bias-free projections); a causal 12-layer text tower of
width 512 (8 heads, MLP 2,048) pooled at the first EOS; joint embedding 512; softmax loss. Training as open_clip's
LAION-400M runs: AdamW lr 5e-4, beta2 0.98, eps 1e-6, weight decay 0.2, 2k warmup steps, cosine; batch 32,768.
Text: 77 positions of a 49,408-token vocabulary (CLIP's BPE size; any sentencepiece model with this project's ids).

    python -m vlm_jax.train --config=configs/paper/clip_b16.py:SHARDS,TOKENIZER --workdir=gs://BUCKET/clip_b16
    python -m vlm_jax.export --workdir=gs://BUCKET/clip_b16 --out=clip_b16_hf        # a transformers CLIPModel

Also the shape to start from OpenAI CLIP or open_clip weights in a transformers folder:
`--config.init_from="{'image_encoder': {'hf': 'FOLDER'}}"`. A pod recipe: compiled for a TPU topology in the test
suite (tests/test_tpu_train_steps.py), not trained here. Layers are scanned.
"""

from vlm_jax.config import base_config


def get_config(arg=None):
    shards, _, tokenizer = (arg or "gs://your-bucket/laion400m/{00000..41407}.tar,gs://your-bucket/spm_49k.model"
                            ).partition(",")
    c = base_config()
    c.task = "contrastive"
    c.total_steps = 400_000
    c.batch_size = 32 * 1024
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 10_000

    c.model.arch = "clip"
    c.model.loss = "softmax"
    c.model.embed_dim = 512
    c.model.scan = True
    c.model.image.variant = "B/16"
    c.model.image.image_size = 224
    c.model.image.pool = "tok"
    c.model.text.size = "M"  # width 512, 8 heads, MLP 2,048, 12 layers
    c.model.text.vocab_size = 49_408
    c.model.text.max_len = 77
    c.model.text.pool = "eos"

    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2000
    c.optim.decay = "cosine"
    c.optim.grad_clip_norm = 0.0

    c.data.train_shards = shards
    c.data.tokenizer = tokenizer
    c.data.pp_train = "decode_rrc(224, scale=(0.9, 1.0))|tokenize(77)|keep('image', 'text')"
    c.data.shuffle_buffer = 50_000
    return c
