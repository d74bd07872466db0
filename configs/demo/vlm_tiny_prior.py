"""The VLM demo (configs/demo/vlm_tiny.py) with PRIOR token weighting (Chen et al. 2025): each answer token's loss
is weighted by 1 - p_ref, p_ref being the probability the text-only reference LM (configs/demo/lm_tiny.py) gives
it, normalised within the example, so the tokens the text alone cannot predict (colour, shape) weigh more.

    python -m vlm_jax.train --config=configs/demo/lm_tiny.py:demo_out/data --workdir=demo_out/lm_tiny
    python -m vlm_jax.train --config=configs/demo/vlm_tiny_prior.py:demo_out/data --workdir=demo_out/vlm_tiny_prior

Hardware: 2 CPU cores. The argument is as vlm_tiny's, plus the reference run: "DATA_DIR[,IMAGE_WORKDIR[,LM_WORKDIR]]"
(default: lm_tiny next to the data directory). See the README ("Decoder-only VLM") for the measured comparison.
"""

import os

from vlm_jax.config import sibling_recipe


def get_config(arg=None):
    data_dir, image_workdir, reference = ((arg or "demo_out/data").split(",") + ["", ""])[:3]
    c = sibling_recipe(__file__, "vlm_tiny.py", ",".join(filter(None, (data_dir, image_workdir))))
    reference = reference or os.path.join(os.path.dirname(data_dir.rstrip("/")) or ".", "lm_tiny")
    c.model.vlm.prior_reference = reference
    c.init_from = {**c.init_from, "prior_lm": {"workdir": reference, "params": "lm"}}
    c.optim.freeze = r"^(image_encoder|prior_lm)/"
    return c
