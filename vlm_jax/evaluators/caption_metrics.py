"""Corpus BLEU-1..4 and CIDEr-D for generated captions, computed as the COCO caption evaluation
(pycocoevalcap's `Bleu(4)` and `Cider`) computes them, in plain Python and numpy.

The COCO evaluation first runs the Stanford PTB tokenizer, which needs Java; `normalize_caption` is a
Java-free stand-in (lower-case, punctuation to spaces, whitespace collapsed). Scores of normalised strings
match pycocoevalcap's scorers on the same strings; they can differ slightly from the published
PTB-tokenised numbers.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

# pycocoevalcap's BLEU smoothing: a zero n-gram match count gives ~0 rather than a division by zero.
_TINY, _SMALL = 1e-15, 1e-9


def normalize_caption(text: str) -> str:
    """Lower-case; every character that is not a letter, digit or whitespace becomes a space; whitespace
    collapsed to single spaces. Stands in for the PTB tokenizer of pycocoevalcap, which needs Java."""
    kept = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower())
    return " ".join(kept.split())


def _ngram_counts(text: str, n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of the whitespace-split `text`."""
    words = text.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: list[str], references: list[list[str]]) -> None:
    if not candidates:
        raise ValueError("caption metrics need at least one candidate caption")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs at least one reference caption")


def bleu_scores(candidates: list[str], references: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of whitespace-tokenised captions, as pycocoevalcap's `Bleu(n).compute_score`.

    Clipped n-gram matches (against the per-n-gram maximum over an image's references) and n-gram counts
    are summed over the corpus; the brevity penalty uses, per image, the reference length closest to the
    candidate's (ties to the shorter); precisions are smoothed as (matches + 1e-15) / (count + 1e-9).
    """
    _check(candidates, references)
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for candidate, refs in zip(candidates, references):
        counts = _ngram_counts(candidate, n)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref |= _ngram_counts(ref, n)
        length = len(candidate.split())
        test_len += length
        ref_len += min((abs(len(ref.split()) - length), len(ref.split())) for ref in refs)[1]
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, length - k)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def bleu4(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (see `bleu_scores`)."""
    return bleu_scores(candidates, references, 4)[3]


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of whitespace-tokenised captions, as pycocoevalcap's `Cider().compute_score`.

    Per n-gram order: TF-IDF vectors (document frequencies from the evaluated images' references, the log
    of the number of images as the IDF numerator), the candidate's weights clipped to the reference's,
    cosine similarity times a Gaussian length penalty exp(-delta^2 / (2 sigma^2)). Averaged over orders and
    references, times 10, averaged over images. As in pycocoevalcap, the 'length' in the penalty is the
    number of bigrams of a caption.
    """
    _check(candidates, references)
    ref_counts = [[_ngram_counts(ref, n) for ref in refs] for refs in references]
    doc_freq = Counter(gram for refs in ref_counts for gram in set().union(*refs))
    log_images = math.log(len(candidates))

    def vectorise(counts: Counter[tuple[str, ...]]) -> tuple[dict[tuple[str, ...], float], np.ndarray, int]:
        vec = {gram: tf * (log_images - math.log(max(1.0, doc_freq[gram]))) for gram, tf in counts.items()}
        norms = np.zeros(n)
        for gram, weight in vec.items():
            norms[len(gram) - 1] += weight * weight
        return vec, np.sqrt(norms), sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = []
    for candidate, refs in zip(candidates, ref_counts):
        vec, norms, length = vectorise(_ngram_counts(candidate, n))
        total = np.zeros(n)
        for ref in refs:
            ref_vec, ref_norms, ref_length = vectorise(ref)
            sim = np.zeros(n)
            for gram, weight in vec.items():
                ref_weight = ref_vec.get(gram, 0.0)
                sim[len(gram) - 1] += min(weight, ref_weight) * ref_weight
            nonzero = (norms != 0) & (ref_norms != 0)
            sim[nonzero] /= norms[nonzero] * ref_norms[nonzero]
            total += sim * math.exp(-float(length - ref_length) ** 2 / (2 * sigma ** 2))
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores))


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 of raw captions, each string first passed through `normalize_caption`."""
    if not candidates:
        raise ValueError("caption_scores needs at least one candidate caption")
    cands = [normalize_caption(c) for c in candidates]
    refs = [[normalize_caption(r) for r in rs] for rs in references]
    return {"captioning/cider": cider_d(cands, refs), "captioning/bleu4": bleu4(cands, refs)}
