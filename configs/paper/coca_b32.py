"""CoCa with open_clip's coca_ViT-B-32 shapes (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text
Foundation Models"): ViT-B/32 at 224 px; attentional pooling with 1 contrastive query and 256 caption queries;
12 unimodal text layers and 12 multimodal layers of width 512 (8 heads, MLP 2,048); joint embedding 512;
loss 1.0 x contrastive (softmax) + 2.0 x captioning (open_clip's weights). Training as open_clip's LAION runs:
AdamW lr 1e-3, beta2 0.98, eps 1e-6, weight decay 0.2, 10k warmup steps, cosine; batch 32,768 for 400,000 steps.
Text: 64 tokens of a 32k sentencepiece vocabulary (open_clip uses CLIP's 49,408 BPE tokens and 76 positions).

    python -m vlm_jax.train --config=configs/paper/coca_b32.py:SHARDS,TOKENIZER --workdir=gs://BUCKET/coca_b32

The tokenizer must have this project's ids (0 pad, 1 EOS, 3 BOS: `python -m data_pipelines.tokenizer train
--vocab-size 32000`). A pod recipe: it is compiled for a TPU topology in the test suite
(tests/test_tpu_train_steps.py), not trained here. Layers are scanned (one compiled block per stack).
"""

from vlm_jax.config import base_config


def get_config(arg=None):
    shards, _, tokenizer = (arg or "gs://your-bucket/laion400m/{00000..41407}.tar,gs://your-bucket/spm_32k.model"
                            ).partition(",")
    c = base_config()
    c.task = "coca"
    c.total_steps = 400_000
    c.batch_size = 32 * 1024
    c.log_every = 100
    c.checkpoint_every = 2000
    c.eval_every = 10_000

    c.model.loss = "softmax"
    c.model.embed_dim = 512
    c.model.scan = True
    c.model.image.variant = "B/32"
    c.model.image.image_size = 224
    c.model.image.pool = "none"
    c.model.text.size = "M"  # width 512, 8 heads, MLP 2,048, 12 layers
    c.model.text.vocab_size = 32_000
    c.model.text.max_len = 64
    c.model.decoder.size = "M"
    c.model.coca.caption_queries = 256
    c.model.coca.contrastive_weight, c.model.coca.caption_weight = 1.0, 2.0

    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 10_000
    c.optim.decay = "cosine"
    c.optim.grad_clip_norm = 1.0

    c.data.train_shards = shards
    c.data.tokenizer = tokenizer
    c.data.pp_train = "decode_rrc(224, scale=(0.9, 1.0))|tokenize(64)|keep('image', 'text')"
    c.data.shuffle_buffer = 50_000
    return c
