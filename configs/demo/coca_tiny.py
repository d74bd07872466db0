"""Tiny CoCa (contrastive + captioning, Yu et al. 2022) on the synthetic shapes set.

    make demo-coca   (the data, then the two commands below)
    python -m vlm_jax.train --config=configs/demo/coca_tiny.py:demo_out/data --workdir=demo_out/coca_tiny
    python -m vlm_jax.generate --workdir=demo_out/coca_tiny --images=demo_out/data/eval --beam=4

Hardware: 2 CPU cores. Measured from a fresh clone: the training run (compile, 1,000 steps, evaluations) 270 s;
contrastive zero-shot top-1 91.4% on the 24 held-out classes, greedy captions naming the right colour and shape for
90.6% of the 2,400 held-out images, CIDEr-D 1.619, BLEU-4 0.131 (targets: >= 80% and >= 80%). gallery.html,
gallery.png and captions.jsonl land in the workdir.
The argument is the data directory written by make_shards (default demo_out/data).
"""

from vlm_jax.config import sibling_recipe


def get_config(arg=None):
    c = sibling_recipe(__file__, "clip_tiny.py", arg)
    c.model.arch = "big_vision"  # the encoder-decoder recipes keep big_vision's ViT (clip_tiny is CLIP-shaped)
    c.task = "coca"
    c.model.image.pool = "none"
    c.model.decoder.size = "mu"
    c.model.decoder.width, c.model.decoder.depth = 96, 2
    c.model.decoder.mlp_dim, c.model.decoder.num_heads = 384, 4
    c.model.coca.caption_queries = 16  # as many as the 4 x 4 patches
    c.model.coca.contrastive_weight, c.model.coca.caption_weight = 1.0, 2.0  # open_clip's defaults
    c.evals = {"zeroshot": {}, "retrieval": {}, "perplexity": {}, "captioning": {"every": 0}}
    return c
