"""Image-text retrieval recall@K in both directions, for paired embeddings (pair i = image i, text i).

Shape key: N pairs, E embedding width.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def rank_of_match(scores_NxN: np.ndarray) -> np.ndarray:
    """For each row i, how many columns score strictly higher than column i."""
    matched_N = np.diagonal(scores_NxN)
    return np.sum(scores_NxN > matched_N[:, None], axis=1)


def retrieval_recall(image_emb_NxE: np.ndarray, text_emb_NxE: np.ndarray) -> dict[str, float]:
    """R@1/5/10 for image->text and text->image."""
    scores_NxN = image_emb_NxE @ text_emb_NxE.T
    results = {}
    for direction, scores in (("i2t", scores_NxN), ("t2i", scores_NxN.T)):
        ranks = rank_of_match(scores)
        for k in KS:
            results[f"retrieval/{direction}_R@{k}"] = float(np.mean(ranks < k))
    return results
