"""PaliGemma-shaped decoder-only VLM (Beyer et al. 2024, "PaliGemma: A versatile 3B VLM for transfer"; big_vision's
models/proj/paligemma): a SigLIP So400m/14 image encoder at 224 px (256 image tokens), a linear projector, and a
Gemma-2B language model (18 layers, width 2,048, multi-query attention, GeGLU 16,384, a 257,152-token vocabulary:
Gemma's 256k plus 1,024 location and 128 segmentation tokens). Rows are [256 image tokens][BOS prefix ";"][suffix
EOS][pad] with 128 text tokens: the image and prefix attend to each other, the suffix is causal, and the loss is
on the suffix only. bfloat16 compute, full remat, scanned layers, the Pallas prefix-LM kernel for every attention.
Stage-1 style optimisation: AdamW lr 1e-4 (cosine, 1k warmup), beta2 0.999, no weight decay, clipping at 1.

    python -m vlm_jax.train --config=configs/paper/paligemma_224.py:SHARDS,TOKENIZER --workdir=gs://BUCKET/pg224

The argument: "train shards,tokenizer.model" (default: LAION-style placeholders under gs://); the tokenizer must have
this project's ids (0 pad, 1 EOS, 3 BOS). Start the towers from earlier runs with `init_from` (as
configs/demo/vlm_tiny.py does). A pod recipe: its train step is compiled for v5p-256 (128 chips, data 16 x fsdp 8)
in the test suite (tests/test_tpu_train_steps.py); the README gives the TPU compiler's HBM per device.
"""

from vlm_jax.config import base_config

IMAGE_TOKENS, TEXT_LEN = 256, 128


def get_config(arg=None):
    shards, _, tokenizer = (arg or "gs://your-bucket/laion400m/{00000..41407}.tar,gs://your-bucket/spm_257k.model"
                            ).partition(",")
    c = base_config()
    c.task = "vlm"
    c.total_steps = 100_000
    c.batch_size = 1024
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_every = 5000

    c.model.dtype = "bfloat16"
    c.model.scan = True
    c.model.attention_impl = "pallas"
    c.model.image.variant = "So400m/14"
    c.model.image.image_size = 224
    c.model.image.pool = "none"
    c.model.image.remat = "full"
    c.model.text.vocab_size = 257_152
    c.model.lm.size = "gemma-2b"
    c.model.lm.remat = "full"
    c.model.vlm.projector = "linear"

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.grad_clip_norm = 1.0

    c.mesh.fsdp = 8
    c.data.train_shards = shards
    c.data.tokenizer = tokenizer
    c.data.vlm = {"image_tokens": IMAGE_TOKENS, "text_len": TEXT_LEN,
                  "tasks": {"caption": {"prefix": "caption en", "suffix": "{caption}"}}}
    c.data.shuffle_buffer = 50_000
    return c
