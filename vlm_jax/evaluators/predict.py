"""A task's predict functions, jitted once on the mesh: (params, inputs) -> outputs, for evaluators and CLIs.

What a task can predict is in `task.predictions`: "embed" (embed_image / embed_text: contrastive, CoCa),
"score" (encode_context / score_text: caption likelihoods), "decode" (prefill / extend / forward: captions).

Shape key: B batch, L tokens, T new tokens, E embedding width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vlm_jax.decoding import SamplingConfig, beam_search, generate
from vlm_jax.parallel.sharding import activation_sharding
from vlm_jax.train_state import StateLayout

PREDICTIONS = ("embed", "score", "decode")


class PredictionError(ValueError):
    """The task cannot make the prediction an evaluator or CLI asks for; one line naming the task."""


def require(task, config: ml_collections.ConfigDict, prediction: str, user: str) -> None:
    """PredictionError unless `task` offers `prediction` (one of PREDICTIONS)."""
    offered = getattr(task, "predictions", ())
    if prediction not in offered:
        kinds = {"embed": "embed images and texts (a contrastive or CoCa task)",
                 "score": "score captions (a generative task: captioning or coca)",
                 "decode": "decode captions (a generative task: captioning, coca or vlm)"}
        raise PredictionError(f"{user} needs a model that can {kinds[prediction]}; this workdir's task is "
                              f"{config.task!r}, which offers {', '.join(offered) or 'no predictions'}")


def on_mesh(task, layout: StateLayout, mesh: Mesh, predict: Callable[..., Any]) -> Callable[..., Any]:
    """jit((params, *inputs) -> predict(model, *inputs)) with the training step's activation sharding (so fused
    attention kernels run per device)."""
    def run(params, *inputs):
        with activation_sharding(mesh, task.config.sharding_rules):
            return predict(layout.merge(params), *inputs)
    return jax.jit(run)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded: beam search when beam > 1, else sampling (temperature 0: greedy)."""

    max_new_tokens: int
    beam: int = 1
    length_penalty: float = 0.6
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0

    def describe(self) -> str:
        if self.beam > 1:
            return f"beam search (beam {self.beam}, length penalty {self.length_penalty})"
        s = self.sampling
        if s.temperature == 0:
            return "greedy decoding"
        return f"sampling (temperature {s.temperature}, top-k {s.top_k or 'off'}, top-p {s.top_p})"


def make_caption_decoder(task, layout: StateLayout, mesh: Mesh, settings: DecodeSettings, prompt: str | None = None
                         ) -> Callable[[Any, jax.Array, int], jax.Array]:
    """(params, images [B,H,W,3], call index) -> caption ids [B, max_new_tokens] (EOS, then padding), jitted with
    the KV cache; sampling draws from fold_in(key(settings.seed), call index), so every batch gets its own
    randomness. A task that takes a prompt (a decoder-only VLM) gets `prompt` after every image (default: the
    task's captioning prompt). A one-line ValueError when the length exceeds what the task decodes (its
    `decode_limit` says why) or the beam is not positive."""
    if settings.beam < 1:
        raise ValueError(f"beam must be >= 1, got {settings.beam}")
    limit = task.max_decode_len()
    if not 0 < settings.max_new_tokens <= limit:
        raise ValueError(f"decode length {settings.max_new_tokens} is outside 1..{limit}: "
                         f"{getattr(task, 'decode_limit', 'the longest text the task was trained on')}")
    cache_len = settings.max_new_tokens  # BOS and every new token but the last

    prompt_ids = task.prompt_ids(prompt) if getattr(task, "takes_prompt", False) else None

    def decode(model, images, rng):
        if prompt_ids is not None:
            images = {"image": images, "prompt": jnp.broadcast_to(prompt_ids, (images.shape[0], len(prompt_ids)))}

        def prefill(inputs):
            return task.prefill(model, inputs, cache_len)

        def extend(cache, tokens_B):
            return task.extend(model, cache, tokens_B)

        if settings.beam > 1:
            return beam_search(prefill, extend, images, beam_size=settings.beam,
                               max_new_tokens=settings.max_new_tokens, eos_id=task.eos_id,
                               length_penalty=settings.length_penalty)
        return generate(prefill, extend, images, max_new_tokens=settings.max_new_tokens, eos_id=task.eos_id,
                        sampling=settings.sampling, rng=None if settings.sampling.greedy else rng)

    jitted, key = on_mesh(task, layout, mesh, decode), jax.random.key(settings.seed)
    return lambda params, images, index: jitted(params, images, jax.random.fold_in(key, index))
