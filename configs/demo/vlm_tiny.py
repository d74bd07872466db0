"""Tiny decoder-only VLM (PaliGemma-style prefix-LM) on the synthetic shapes set, with packed rows, bootstrapped
from the contrastive demo: stage 0 is `make demo` (configs/demo/clip_tiny.py); this stage copies its image tower
(`init_from`), freezes it (LiT / BLIP-2 / PaliGemma stage 1), and trains a linear projector and a small Gemma LM
on three mixed tasks: "caption" -> the caption (weight 2), "what colour?" -> the colour, "what shape?" -> the shape.
The ViT's 16 patch tokens take their places in the LM's sequence, followed by the prompt and the answer.

    make demo-vlm   (the data and stage 0 if missing, then the two commands below)
    python -m vlm_jax.train --config=configs/demo/vlm_tiny.py:demo_out/data --workdir=demo_out/vlm_tiny
    python -m vlm_jax.generate --workdir=demo_out/vlm_tiny --images=demo_out/data/eval --prompt="what shape?"

Hardware: 2 CPU cores. See the README ("Decoder-only VLM") for the measured time and results; the targets are
greedy answers matching the colour and the shape for >= 90% of the 2,400 held-out images within 10 minutes.
The argument: "DATA_DIR[,IMAGE_WORKDIR]", the data written by make_shards (default demo_out/data) and the stage-0
contrastive run (default: clip_tiny next to the data directory). `--config.init_from=None
--config.optim.freeze=''` trains from scratch instead.
"""

import os

from vlm_jax.config import sibling_recipe

QUESTIONS = {"colour": {"prompt": "what colour?", "answer": "{colour}"},
             "shape": {"prompt": "what shape?", "answer": "{shape}"}}


def get_config(arg=None):
    data_dir, _, image_workdir = (arg or "demo_out/data").partition(",")
    c = sibling_recipe(__file__, "clip_tiny.py", data_dir)
    c.task = "vlm"
    c.total_steps = 2000
    c.batch_size = 32  # rows of up to 3 examples (about 75 examples per step)
    c.checkpoint_every = 500
    c.optim.lr, c.optim.warmup_steps = 3e-3, 100
    c.model.image.pool = "none"
    c.init_from = {"image_encoder": {"workdir": image_workdir or os.path.join(os.path.dirname(data_dir.rstrip("/"))
                                                                              or ".", "clip_tiny")}}
    c.optim.freeze = r"^image_encoder/"
    c.model.lm.size = "tiny"
    c.model.lm.width, c.model.lm.depth, c.model.lm.mlp_dim = 96, 2, 384
    c.model.lm.num_heads, c.model.lm.num_kv_heads, c.model.lm.head_dim = 4, 2, 24
    # Gemma-1 style blocks (the tiny size turns every Gemma 2/3 feature on): no softcaps, no local layers,
    # no QK-norm or post-norms; the rows are short.
    c.model.lm.window, c.model.lm.attn_softcap, c.model.lm.final_softcap = 0, 0.0, 0.0
    c.model.lm.qk_norm, c.model.lm.post_norms = False, False
    c.data.vlm = {"image_tokens": 16, "text_len": 24, "pack": True, "pack_images": 3,
                  "tasks": {"caption": {"weight": 2, "prefix": "caption", "suffix": "{caption}"},
                            "colour": {"prefix": QUESTIONS["colour"]["prompt"], "suffix": "{colour}"},
                            "shape": {"prefix": QUESTIONS["shape"]["prompt"], "suffix": "{shape}"}}}
    c.evals = {"answers": {"questions": QUESTIONS, "every": 0}, "captioning": {"every": 0}}
    return c
