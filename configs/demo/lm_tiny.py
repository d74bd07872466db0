"""Text-only reference LM for PRIOR (configs/demo/vlm_tiny_prior.py): the VLM demo's LM trained on the same prompts
and answers without the images (a `text_only` source with the VLM demo's tasks), so it learns what the text alone
predicts: the caption templates, but not which colour or shape.

    python -m vlm_jax.train --config=configs/demo/lm_tiny.py:demo_out/data --workdir=demo_out/lm_tiny

Hardware: 2 CPU cores; about 2 minutes. The argument is the data directory (default demo_out/data).
"""

from vlm_jax.config import sibling_recipe


def get_config(arg=None):
    c = sibling_recipe(__file__, "vlm_tiny.py", arg)
    c.total_steps = 800
    c.init_from, c.optim.freeze = None, ""
    c.data.mixture = {"captions": {"shards": c.data.train_shards, "weight": 1.0, "text_only": True,
                                   "tasks": dict(c.data.vlm["tasks"])}}
    c.data.train_shards = None
    c.evals = {}
    return c
