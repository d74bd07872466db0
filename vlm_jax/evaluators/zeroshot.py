"""Zero-shot classification: class names x prompt templates -> averaged text embeddings -> argmax.

Shape key: N images, C classes, T templates, L tokens, E embedding width.
"""

from __future__ import annotations

import numpy as np


def class_embeddings(text_emb_CTxE: np.ndarray, num_classes: int) -> np.ndarray:
    """Averages the template embeddings of each class and re-normalises them: [C, E]."""
    mean_CxE = text_emb_CTxE.reshape(num_classes, -1, text_emb_CTxE.shape[-1]).mean(axis=1)
    return mean_CxE / np.linalg.norm(mean_CxE, axis=-1, keepdims=True)


def zeroshot_accuracy(image_emb_NxE: np.ndarray, class_emb_CxE: np.ndarray,
                      labels_N: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the nearest class embedding."""
    scores_NxC = image_emb_NxE @ class_emb_CxE.T
    ranked_NxC = np.argsort(-scores_NxC, axis=1)
    top5 = min(5, class_emb_CxE.shape[0])
    return {
        "zeroshot/top1": float(np.mean(ranked_NxC[:, 0] == labels_N)),
        f"zeroshot/top{top5}": float(np.mean(np.any(ranked_NxC[:, :top5] == labels_N[:, None], axis=1))),
    }
