"""Rank of the matching candidate among all candidates, for retrieval and zero-shot classification.

Pessimistic and NaN-safe: a non-matching candidate that ties with the best match, or whose score is NaN,
counts as ranked above it; a query whose matches all score NaN ranks at infinity (a miss at every K).
Scores are computed block by block (queries against all candidates), so memory stays at block x candidates.

Shape key: Q queries, C candidates, B queries in a block, E embedding width.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCK = 1024


def similarities(query_QxE: np.ndarray, candidate_CxE: np.ndarray) -> np.ndarray:
    """Dot products accumulated in float64 and rounded to float32, so equal embeddings give equal scores
    whatever the block shapes (float32 BLAS kernels may round differently at tile edges)."""
    return (query_QxE.astype(np.float64) @ candidate_CxE.astype(np.float64).T).astype(np.float32)


def ranks_of_matches(scores_QxC: np.ndarray, matches_QxC: np.ndarray) -> np.ndarray:
    """float [Q]: how many non-matching candidates score at least as high as the query's best non-NaN match;
    inf when the query has no match with a non-NaN score."""
    best_Q = np.max(np.where(matches_QxC & ~np.isnan(scores_QxC), scores_QxC, -np.inf), axis=1,
                    initial=-np.inf)
    above_Q = np.sum(~matches_QxC & ~(scores_QxC < best_Q[:, None]), axis=1)
    return np.where(best_Q == -np.inf, np.inf, above_Q)


def match_ranks(query_QxE: np.ndarray, candidate_CxE: np.ndarray, query_group_Q: np.ndarray,
                candidate_group_C: np.ndarray, block_size: int = DEFAULT_BLOCK) -> np.ndarray:
    """ranks_of_matches where a candidate matches a query when their groups are equal, scored in blocks of
    `block_size` queries."""
    ranks_Q = np.empty(len(query_QxE), np.float64)
    for start in range(0, len(query_QxE), block_size):
        stop = start + block_size
        matches_BxC = query_group_Q[start:stop, None] == candidate_group_C[None, :]
        ranks_Q[start:stop] = ranks_of_matches(similarities(query_QxE[start:stop], candidate_CxE), matches_BxC)
    return ranks_Q
