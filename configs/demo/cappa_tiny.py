"""Tiny CapPa (ViT encoder + text decoder, parallel prediction for 0.75 of the rows from step 1,500) on the
synthetic shapes set.

    make demo-cappa   (the data, then the two commands below)
    python -m vlm_jax.train --config=configs/demo/cappa_tiny.py:demo_out/data --workdir=demo_out/cappa_tiny
    python -m vlm_jax.generate --workdir=demo_out/cappa_tiny --images=demo_out/data/eval --beam=4

Hardware: 2 CPU cores. Measured from a fresh clone (the training run: compile, 3,000 steps, evaluations) 493 s;
scoring-classifier top-1 85.1% on the 24 held-out classes, greedy captions naming the right colour and shape for
85.3% of the 2,400 held-out images, CIDEr-D 1.593, BLEU-4 0.125 (targets: >= 80% and >= 80% within 10 minutes).
gallery.html, gallery.png and captions.jsonl land in the workdir.
The argument is the data directory written by make_shards (default demo_out/data).
"""

from vlm_jax.config import sibling_recipe


def get_config(arg=None):
    c = sibling_recipe(__file__, "clip_tiny.py", arg)
    c.model.arch = "big_vision"  # the encoder-decoder recipes keep big_vision's ViT (clip_tiny is CLIP-shaped)
    c.task = "captioning"
    c.total_steps = 3000
    c.checkpoint_every = 500
    c.eval_every = 1000
    c.optim.lr, c.optim.warmup_steps = 3e-3, 200
    c.model.decoder.size = "mu"
    c.model.decoder.width, c.model.decoder.depth = 96, 2
    c.model.decoder.mlp_dim, c.model.decoder.num_heads = 384, 4
    # CapPa's parallel prediction (0.75 of the rows, as the paper) from step 1,500 on. From the first step, any
    # share slowed the learning of shape on this data within the 10-minute budget (through the decoder both kinds
    # of rows share; README): 0.75 -> 25-38% scoring-classifier top-1 against 87% for plain captioning. Rows
    # that are all autoregressive until the decoder reads shape from the image tokens, then the paper's share,
    # keep it (85.1%).
    c.model.caption.masked_pred_prob = 0.75
    c.model.caption.masked_pred_start_step = 1500
    c.evals = {"perplexity": {}, "scoring_classifier": {"every": 0}, "captioning": {"every": 0}}
    return c
