"""The VLM demo (configs/demo/vlm_tiny.py) with PRIOR token weighting (Chen et al. 2025): each answer token's loss
is weighted by (1 - p_ref) ** alpha, p_ref being the probability the text-only reference LM (configs/demo/lm_tiny.py)
gives it, normalised within the example, so the tokens the text alone cannot predict (colour, shape) weigh more.

alpha is 0.25 here, not the paper's 1: the demo's captions come from a few templates, which the reference predicts
almost surely (p_ref near 1), so with alpha 1 those tokens, EOS included, get almost no weight and are never
learnt (measured: colour 0%, shape 17.8%, CIDEr-D 0.08, captions that do not stop). With 0.25 (measured, 460 s
after lm_tiny's 251 s, other jobs on the cores): colour 99.96%, shape 91.3%, CIDEr-D 1.719, against 99.96% / 91.3% /
1.649 without PRIOR.

    python -m vlm_jax.train --config=configs/demo/lm_tiny.py:demo_out/data --workdir=demo_out/lm_tiny
    python -m vlm_jax.train --config=configs/demo/vlm_tiny_prior.py:demo_out/data --workdir=demo_out/vlm_tiny_prior

Hardware: 2 CPU cores. The argument is as vlm_tiny's, plus the reference run: "DATA_DIR[,IMAGE_WORKDIR[,LM_WORKDIR]]"
(default: lm_tiny next to the data directory).
"""

import os

from vlm_jax.config import sibling_recipe


def get_config(arg=None):
    data_dir, image_workdir, reference = ((arg or "demo_out/data").split(",") + ["", ""])[:3]
    c = sibling_recipe(__file__, "vlm_tiny.py", ",".join(filter(None, (data_dir, image_workdir))))
    reference = reference or os.path.join(os.path.dirname(data_dir.rstrip("/")) or ".", "lm_tiny")
    c.model.vlm.prior_reference = reference
    c.model.vlm.prior_alpha = 0.25
    c.init_from = {**c.init_from, "prior_lm": {"workdir": reference, "params": "lm"}}
    c.optim.freeze = r"^(image_encoder|prior_lm)/"
    return c
