"""Zero-shot classification: class names x prompt templates -> averaged text embeddings -> nearest class.

Ties and NaN scores count as misses (see ranks.py).

Shape key: N images, C classes, T templates, L tokens, E embedding width.
"""

from __future__ import annotations

import numpy as np

from vlm_jax.evaluators.ranks import DEFAULT_BLOCK, match_ranks


def class_embeddings(text_emb_CTxE: np.ndarray, num_classes: int) -> np.ndarray:
    """Averages the template embeddings of each class and re-normalises them: [C, E]."""
    mean_CxE = text_emb_CTxE.reshape(num_classes, -1, text_emb_CTxE.shape[-1]).mean(axis=1)
    return mean_CxE / np.linalg.norm(mean_CxE, axis=-1, keepdims=True)


def zeroshot_accuracy(image_emb_NxE: np.ndarray, class_emb_CxE: np.ndarray, labels_N: np.ndarray,
                      block_size: int = DEFAULT_BLOCK) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-C when there are fewer than 5 classes) of the nearest class embedding."""
    ranks_N = match_ranks(image_emb_NxE, class_emb_CxE, labels_N, np.arange(len(class_emb_CxE)), block_size)
    top5 = min(5, class_emb_CxE.shape[0])
    return {"zeroshot/top1": float(np.mean(ranks_N < 1)), f"zeroshot/top{top5}": float(np.mean(ranks_N < top5))}
