"""Retrieval recall and zero-shot accuracy against plain per-query references: ties, NaN, several captions."""

import math

import numpy as np
import pytest

from vlm_jax.evaluators.ranks import match_ranks
from vlm_jax.evaluators.retrieval import KS, retrieval_recall
from vlm_jax.evaluators.zeroshot import zeroshot_accuracy


def reference_hit(scores: list[float], matches: list[bool], k: int) -> bool:
    """Sorts the candidates by score, a non-match before a match on ties, NaN first for non-matches and last
    for matches; a hit when a match with a real score is among the first k."""
    order = sorted(range(len(scores)), key=lambda c: (
        -(math.inf if math.isnan(scores[c]) else scores[c]) if not matches[c]
        else -(-math.inf if math.isnan(scores[c]) else scores[c]), matches[c]))
    return any(matches[c] and not math.isnan(scores[c]) for c in order[:k])


def reference_recall(image_emb, text_emb, text_image) -> dict[str, float]:
    scores = (image_emb.astype(np.float64) @ text_emb.astype(np.float64).T).astype(np.float32).tolist()
    results = {}
    captioned = [i for i in range(len(image_emb)) if i in set(text_image.tolist())]
    for k in KS:
        results[f"retrieval/i2t_R@{k}"] = np.mean(
            [reference_hit(scores[i], [int(g) == i for g in text_image], k) for i in captioned])
        results[f"retrieval/t2i_R@{k}"] = np.mean(
            [reference_hit([row[j] for row in scores], [i == int(text_image[j]) for i in range(len(scores))], k)
             for j in range(len(text_image))])
    return results


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def case(seed: int, images: int, captions_per_image: int, width: int = 4, levels: int = 3):
    """Embeddings on a coarse grid (few distinct values), so exact ties are common."""
    rng = np.random.default_rng(seed)
    image_emb = rng.integers(-levels, levels + 1, (images, width)).astype(np.float32)
    text_image = np.repeat(np.arange(images), captions_per_image)
    text_emb = rng.integers(-levels, levels + 1, (len(text_image), width)).astype(np.float32)
    return image_emb, text_emb, rng.permutation(text_image)


@pytest.mark.parametrize("seed,images,captions_per_image,block_size", [
    (0, 7, 1, 3), (1, 12, 5, 4), (2, 9, 2, 1), (3, 20, 3, 1024), (4, 11, 1, 2)])
def test_retrieval_equals_the_reference_with_ties_and_several_captions(seed, images, captions_per_image,
                                                                       block_size):
    image_emb, text_emb, text_image = case(seed, images, captions_per_image)
    got = retrieval_recall(image_emb, text_emb, text_image, block_size=block_size)
    assert got == pytest.approx(reference_recall(image_emb, text_emb, text_image))


def test_retrieval_with_nan_scores_equals_the_reference():
    image_emb, text_emb, text_image = case(5, 10, 3)
    image_emb[2] = np.nan
    text_emb[[0, 7]] = np.nan
    got = retrieval_recall(image_emb, text_emb, text_image, block_size=4)
    assert got == pytest.approx(reference_recall(image_emb, text_emb, text_image))


def test_nan_embeddings_are_misses():
    """NaN parameters give NaN embeddings: every recall is 0, never 1 (old: nothing scores above NaN)."""
    nan = np.full((6, 4), np.nan, np.float32)
    assert set(retrieval_recall(nan, nan).values()) == {0.0}
    labels = np.arange(6) % 3
    assert set(zeroshot_accuracy(nan, unit(np.eye(3, 4)), labels).values()) == {0.0}


def test_ties_count_against_the_match():
    """Identical embeddings (a collapsed model, or identical all-pad captions) score 0, not 1."""
    same = unit(np.ones((11, 4)))
    assert set(retrieval_recall(same, same).values()) == {0.0}  # 10 others tie: rank 10, a miss even at K=10
    assert retrieval_recall(same[:3], same[:3])["retrieval/i2t_R@5"] == 1.0  # 3 candidates: all in the top 5
    assert zeroshot_accuracy(same, unit(np.ones((3, 4))), np.zeros(11, int))["zeroshot/top1"] == 0.0


def test_any_reference_caption_is_a_hit_for_image_to_text():
    """Image 0 has two captions: one far (rank 2) and one nearest: i2t R@1 counts it; t2i scores each."""
    image_emb = unit(np.array([[1, 0, 0], [0, 1, 0]], np.float32))
    text_emb = unit(np.array([[-1, 0, 0], [0.9, 0.1, 0], [0.1, 0.9, 0]], np.float32))
    results = retrieval_recall(image_emb, text_emb, np.array([0, 0, 1]))
    assert results["retrieval/i2t_R@1"] == 1.0
    assert results["retrieval/t2i_R@1"] == pytest.approx(2 / 3)  # caption 0 is nearer image 1 (0 vs -1)


def test_images_without_captions_are_gallery_only():
    image_emb = unit(np.array([[1, 0], [0, 1], [1, 1]], np.float32))
    text_emb = unit(np.array([[1, 0.1], [0.1, 1]], np.float32))
    results = retrieval_recall(image_emb, text_emb, np.array([0, 1]))
    assert results["retrieval/i2t_R@1"] == 1.0 and results["retrieval/t2i_R@1"] == 1.0


def test_zeroshot_equals_the_reference_with_ties():
    rng = np.random.default_rng(6)
    image_emb = rng.integers(-2, 3, (30, 3)).astype(np.float32)
    class_emb = rng.integers(-2, 3, (7, 3)).astype(np.float32)
    labels = rng.integers(0, 7, 30)
    scores = (image_emb.astype(np.float64) @ class_emb.astype(np.float64).T).astype(np.float32).tolist()
    got = zeroshot_accuracy(image_emb, class_emb, labels, block_size=4)
    for k in (1, 5):
        expected = np.mean([reference_hit(scores[i], [c == labels[i] for c in range(7)], k) for i in range(30)])
        assert got[f"zeroshot/top{k}"] == pytest.approx(expected)


def test_block_size_does_not_change_ranks():
    rng = np.random.default_rng(7)
    query, candidate = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(23, 8)).astype(np.float32)
    groups_q, groups_c = rng.integers(0, 23, 37), np.arange(23)
    whole = match_ranks(query, candidate, groups_q, groups_c, block_size=1024)
    for block_size in (1, 5, 36):
        np.testing.assert_array_equal(match_ranks(query, candidate, groups_q, groups_c, block_size), whole)
