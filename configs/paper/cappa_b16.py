"""CapPa B/16 as in Tschannen et al. 2023 ("Image Captioners Are Scalable Vision Learners Too") and big_vision's
configs/proj/cappa/pretrain.py: ViT-B/16 at 224 px, a 6-layer decoder of the encoder's width, 64 tokens of a
32k sentencepiece vocabulary, parallel prediction for 75% of the examples, Adafactor (momentum 0.9 in bfloat16,
second-moment decay capped at 0.999), lr 1e-3 with 10k warmup steps and cosine decay, weight decay 1e-4, gradient
clipping at 1, batch 8,192 for 366,500 steps (3B examples).

    python -m vlm_jax.train --config=configs/paper/cappa_b16.py:SHARDS,TOKENIZER --workdir=gs://BUCKET/cappa_b16

The argument: "train shards,tokenizer.model" (default: LAION-style placeholders under gs://). The tokenizer must
have this project's ids (0 pad, 1 EOS, 3 BOS: `python -m data_pipelines.tokenizer train --vocab-size 32000`);
T5's c4_en model has no BOS and is refused at start. A pod recipe: it is
compiled for a TPU topology in the test suite (tests/test_tpu_train_steps.py), not trained here. Layers are
scanned (one compiled block per stack).
"""

from vlm_jax.config import base_config


def get_config(arg=None):
    shards, _, tokenizer = (arg or "gs://your-bucket/laion400m/{00000..41407}.tar,gs://your-bucket/spm_32k.model"
                            ).partition(",")
    c = base_config()
    c.task = "captioning"
    c.total_steps = 366_500
    c.batch_size = 8 * 1024
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_every = 5000

    c.model.scan = True
    c.model.image.variant = "B/16"
    c.model.image.image_size = 224
    c.model.image.pool = "none"
    c.model.text.vocab_size = 32_000
    c.model.text.max_len = 64
    c.model.decoder.size = "B"
    c.model.decoder.depth = 6
    c.model.decoder.zero_init_head = True
    c.model.caption.masked_pred_prob = 0.75
    c.model.caption.loss_reduction = "example"

    c.optim.name = "adafactor"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.moments_dtype = "bfloat16"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10_000
    c.optim.decay = "cosine"
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 1.0

    c.data.train_shards = shards
    c.data.tokenizer = tokenizer
    c.data.pp_train = "decode|resize(224)|tokenize(64)|keep('image', 'text')"  # uint8: [-1, 1] on the device
    c.data.shuffle_buffer = 50_000
    return c
