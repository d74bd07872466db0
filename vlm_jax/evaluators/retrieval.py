"""Image-text retrieval recall@K in both directions, with any number of reference captions per image.

The published protocol (COCO / Flickr30k, as in CLIP and open_clip): image->text is a hit at K when ANY of
the image's captions is among the top K texts; text->image is scored per caption. Ties and NaN scores count
against the query (see ranks.py). Images without captions are gallery items for text->image, not queries.

Shape key: N images, M captions, E embedding width.
"""

from __future__ import annotations

import numpy as np

from vlm_jax.evaluators.ranks import DEFAULT_BLOCK, match_ranks

KS = (1, 5, 10)


def retrieval_recall(image_emb_NxE: np.ndarray, text_emb_MxE: np.ndarray, text_image_M: np.ndarray | None = None,
                     block_size: int = DEFAULT_BLOCK) -> dict[str, float]:
    """R@1/5/10 for image->text and text->image; text_image_M[j] is the index of caption j's image
    (default: caption j belongs to image j)."""
    if text_image_M is None:
        text_image_M = np.arange(len(text_emb_MxE))
    if len(text_emb_MxE) == 0:
        raise ValueError("retrieval needs captions; this evaluation set has none")
    image_N = np.arange(len(image_emb_NxE))
    captioned_N = np.bincount(text_image_M, minlength=len(image_N)) > 0
    i2t_ranks = match_ranks(image_emb_NxE[captioned_N], text_emb_MxE, image_N[captioned_N], text_image_M,
                            block_size)
    t2i_ranks = match_ranks(text_emb_MxE, image_emb_NxE, text_image_M, image_N, block_size)
    return {f"retrieval/{direction}_R@{k}": float(np.mean(ranks < k))
            for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)) for k in KS}
