"""`bench decode`: caption decoding with the KV cache against recomputing the whole prefix at every token.

Both run greedy decoding of exactly `tokens` new tokens (EOS never stops them) for a batch of images, jitted,
on the configured model with fresh parameters (the speed does not depend on the weights).
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from vlm_jax.decoding import generate, greedy_by_recomputation
from vlm_jax.evaluators.predict import require
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout

NEVER = -1  # an EOS id no token has: every row decodes the full length


def bench_decode(config: ml_collections.ConfigDict, tokens: int, batch: int, repeats: int) -> dict:
    """Median seconds per batch and tokens/s, cached and by recomputation, and their ratio."""
    config.model.text.max_len = max(config.model.text.max_len, tokens)  # reported in the result
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    task = get_task(config)
    require(task, config, "decode", "bench decode")
    layout = make_state_layout(task, config, mesh)
    params = init_train_state(layout, config.seed)["params"]
    size = config.model.image.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    if getattr(task, "takes_prompt", False):  # a decoder-only VLM answers its captioning prompt
        prompt = task.prompt_ids()
        images = {"image": images, "prompt": np.broadcast_to(prompt, (batch, len(prompt)))}

    def cached(params, images):
        model = layout.merge(params)
        return generate(lambda x: task.prefill(model, x, tokens), lambda c, t: task.extend(model, c, t), images,
                        max_new_tokens=tokens, eos_id=NEVER)

    def recomputed(params, images):
        model = layout.merge(params)
        return greedy_by_recomputation(lambda x, t: task.forward(model, x, t), images, bos_id=task.bos_id,
                                       max_new_tokens=tokens, eos_id=NEVER)

    result = {"tokens": tokens, "batch": batch, "max_len": config.model.text.max_len}  # widened to hold the decode
    for name, fn in (("cached", cached), ("recomputed", recomputed)):
        run = jax.jit(fn)
        run(params, images).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(params, images).block_until_ready()
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        result.update({f"{name}_s": round(seconds, 4), f"{name}_tokens_per_s": round(batch * tokens / seconds, 1)})
    result["cache_speedup"] = round(result["recomputed_s"] / result["cached_s"], 2)
    return result
