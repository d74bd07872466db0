"""The demo model with the SigLIP sigmoid loss (t = 10, b = -10) instead of CLIP's softmax.

    python -m vlm_jax.train --config=configs/demo/siglip_tiny.py:demo_out/data --workdir=demo_out/siglip_tiny

Hardware: 2 CPU cores, about 3 minutes. With batch 128 and only 24 classes, about five same-class pairs per row
count as negatives, which slows the sigmoid loss more than the softmax one: expect lower zero-shot accuracy than
clip_tiny for the same steps (about 60% at 600 steps vs 79% measured during development).
"""

from vlm_jax.config import sibling_recipe


def get_config(arg=None):
    c = sibling_recipe(__file__, "clip_tiny.py", arg)
    c.model.loss = "sigmoid"
    # SigLIP's shapes (MAP head, no image projection, bidirectional text pooled at its last token): exports exactly
    # as a transformers SiglipModel.
    c.model.arch = "big_vision"
    c.model.image.pool, c.model.text.pool = "map", "last"
    c.model.image_projection = False
    return c
