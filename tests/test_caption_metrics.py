"""caption_metrics against pycocoevalcap's own BLEU and CIDEr-D scorers (which need no Java; only its PTB
tokenizer does, and it is not used) on random corpora of already-normalised strings."""

import random

import pytest

from pycocoevalcap.bleu.bleu import Bleu  # the `test` extra in setup.py installs it
from pycocoevalcap.cider.cider import Cider

from vlm_jax.evaluators.caption_metrics import bleu4, bleu_scores, caption_scores, cider_d, normalize_caption

TOL = 1e-6


def _corpus(seed: int, images: int = 50, vocab: int = 30) -> tuple[list[str], list[list[str]]]:
    """Random captions over a small vocabulary (so n-grams repeat), with an empty candidate, a one-word
    candidate and some candidates that are exactly one of their references."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    references = [[sentence(1, 14) for _ in range(rng.randint(1, 5))] for _ in range(images)]
    candidates = [sentence(2, 14) for _ in range(images)]
    candidates[0], candidates[1] = "", words[0]
    for i in range(2, images, 7):
        candidates[i] = rng.choice(references[i])
    return candidates, references


def _reference_scores(candidates: list[str], references: list[list[str]]) -> tuple[list[float], float]:
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return bleu, float(cider)


@pytest.mark.parametrize("seed,vocab", [(0, 30), (1, 30), (2, 30), (3, 8)])
def test_matches_pycocoevalcap(seed, vocab):
    candidates, references = _corpus(seed, vocab=vocab)
    want_bleu, want_cider = _reference_scores(candidates, references)
    got_bleu = bleu_scores(candidates, references)
    assert max(abs(g - w) for g, w in zip(got_bleu, want_bleu)) < TOL
    assert bleu4(candidates, references) == got_bleu[3]
    assert abs(cider_d(candidates, references) - want_cider) < TOL
    assert want_cider > 0.1 and want_bleu[3] > 0.01  # the corpora actually match something


@pytest.mark.parametrize("candidates,references", [
    (["a b c d e"], [["a b c d", "a b c d e f"]]),  # closest length is a tie: the shorter wins
    (["a b c"], [["a b c", "a b c"]]),  # one image: IDF numerator log(1) = 0
    (["a b", "c d e f g h i j"], [["a b"], ["c d"]]),  # brevity ratio > 1, large length penalty
    (["", "x"], [["x y z"], ["q"]]),  # no matches at all
])
def test_edge_cases_match_pycocoevalcap(candidates, references):
    want_bleu, want_cider = _reference_scores(candidates, references)
    assert max(abs(g - w) for g, w in zip(bleu_scores(candidates, references), want_bleu)) < TOL
    assert abs(cider_d(candidates, references) - want_cider) < TOL


def test_normalize_caption():
    assert normalize_caption("  A Dog, running!\tOn the\n GRASS.  ") == "a dog running on the grass"
    assert normalize_caption("it's a 3-year-old cat_toy") == "it s a 3 year old cat toy"
    assert normalize_caption("Café naïve") == "café naïve"
    assert normalize_caption("?!...") == ""


def test_caption_scores_normalises():
    candidates, references = _corpus(4)
    raw_candidates = [c.upper() + "." for c in candidates]
    raw_references = [[r.replace(" ", ", ") + "!" for r in refs] for refs in references]
    scores = caption_scores(raw_candidates, raw_references)
    assert set(scores) == {"captioning/cider", "captioning/bleu4"}
    assert scores["captioning/cider"] == pytest.approx(cider_d(candidates, references), abs=1e-12)
    assert scores["captioning/bleu4"] == pytest.approx(bleu4(candidates, references), abs=1e-12)


def test_empty_and_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="at least one candidate"):
        caption_scores([], [])
    with pytest.raises(ValueError):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        bleu4(["a"], [[]])
