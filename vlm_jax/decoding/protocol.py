"""The functions a generative model hands to the decoders.

Shape key: B batch, V vocabulary, T tokens.

- `prefill(inputs) -> (logits_BxV, cache)`: runs the model on the prompt (a captioner: the image and BOS) and
  returns float32 logits for the next token of every row and a cache pytree. Every array leaf of the cache has
  the batch on axis 0, except 0-d leaves (e.g. the shared write position), which all rows share. `inputs` is
  any pytree whose leaves have the batch on axis 0.
- `extend(cache, tokens_B) -> (logits_BxV, cache)`: feeds one token per row at the cache's current position and
  returns the logits for the next one. The cache keeps its structure and shapes.
- `forward(inputs, tokens_BxT) -> logits_BxTxV`: no cache, causal teacher forcing over a token prefix whose
  first token is BOS; position t's logits predict token t + 1 of the prefix.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

Prefill = Callable[[Any], tuple[jax.Array, Any]]
Extend = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
Forward = Callable[[Any, jax.Array], jax.Array]
