"""Tiny decoder-only VLM (PaliGemma-style prefix-LM) on the synthetic shapes set, with packed rows: a ViT's 16 patch
tokens, projected, take their places in a small Gemma LM's sequence, followed by a prompt and the answer. Three
tasks are mixed: "caption" -> the caption (weight 2), "what colour?" -> the colour, "what shape?" -> the shape.

    make demo-vlm   (the data, then the two commands below)
    python -m vlm_jax.train --config=configs/demo/vlm_tiny.py:demo_out/data --workdir=demo_out/vlm_tiny
    python -m vlm_jax.generate --workdir=demo_out/vlm_tiny --images=demo_out/data/eval --prompt="what shape?"

Hardware: 2 CPU cores. See the README ("Decoder-only VLM") for the measured time and results; the targets are
greedy answers matching the colour and the shape for >= 90% of the 2,400 held-out images within 10 minutes.
The argument is the data directory written by make_shards (default demo_out/data).
"""

from vlm_jax.config import sibling_recipe

QUESTIONS = {"colour": {"prompt": "what colour?", "answer": "{colour}"},
             "shape": {"prompt": "what shape?", "answer": "{shape}"}}


def get_config(arg=None):
    c = sibling_recipe(__file__, "clip_tiny.py", arg)
    c.task = "vlm"
    c.total_steps = 2500
    c.batch_size = 64
    c.checkpoint_every = 500
    c.eval_every = 1250
    c.optim.lr, c.optim.warmup_steps = 3e-3, 200
    c.model.image.pool = "none"
    c.model.lm.size = "tiny"
    c.model.lm.width, c.model.lm.depth, c.model.lm.mlp_dim = 96, 2, 384
    c.model.lm.num_heads, c.model.lm.num_kv_heads, c.model.lm.head_dim = 4, 2, 24
    c.data.vlm = {"image_tokens": 16, "text_len": 24, "pack": True, "pack_images": 3,
                  "tasks": {"caption": {"weight": 2, "prefix": "caption", "suffix": "{caption}"},
                            "colour": {"prefix": QUESTIONS["colour"]["prompt"], "suffix": "{colour}"},
                            "shape": {"prefix": QUESTIONS["shape"]["prompt"], "suffix": "{shape}"}}}
    c.evals = {"answers": {"questions": QUESTIONS, "every": 0}, "captioning": {"every": 0}}
    return c
