"""The demo model with the SigLIP sigmoid loss (t = 10, b = -10) instead of CLIP's softmax.

    python -m vlm_jax.train --config=configs/demo/siglip_tiny.py:demo_out/data --workdir=demo_out/siglip_tiny

Hardware: 2 CPU cores, about 3 minutes. With batch 128 and only 24 classes, about five same-class pairs per row
count as negatives, which slows the sigmoid loss more than the softmax one: expect lower zero-shot accuracy than
clip_tiny for the same steps (about 60% at 600 steps vs 79% measured during development).
"""

import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location(
        "clip_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.model.loss = "sigmoid"
    return c
