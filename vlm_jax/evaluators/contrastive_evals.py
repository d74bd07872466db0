"""Evaluators on embeddings (the task's "embed" prediction): image-text retrieval and zero-shot classification.

Shape key: N images, M captions, C classes, T templates, L tokens, E embedding width.
"""

from __future__ import annotations

import numpy as np

from vlm_jax.evaluators.common import Evaluator, apply_in_batches, check_finite
from vlm_jax.evaluators.predict import on_mesh
from vlm_jax.evaluators.retrieval import retrieval_recall
from vlm_jax.evaluators.zeroshot import class_embeddings, zeroshot_accuracy


class EmbeddingEvaluator(Evaluator):
    """Shared by both: jitted image / text embedding built once; NaN embeddings count as misses, or raise
    FloatingPointError with `require_finite`."""

    prediction = "embed"

    def __init__(self, spec, env, data):
        super().__init__(spec, env, data)
        self.embed_image = on_mesh(env.task, env.layout, env.mesh, env.task.embed_image)
        self.embed_text = on_mesh(env.task, env.layout, env.mesh, env.task.embed_text)

    def embed_images(self, params, require_finite: bool) -> np.ndarray:
        """The split's image embeddings, computed once per evaluation run for every embedding evaluator."""
        key = ("image_embeddings", id(self.data))
        if key not in self.env.memo:
            self.env.memo[key] = self.embed(self.embed_image, params, self.data.images, "image", require_finite)
        return self.env.memo[key]

    def embed(self, fn, params, array: np.ndarray, what: str, require_finite: bool) -> np.ndarray:
        embeddings = apply_in_batches(lambda x: fn(params, x), array, self.env.batch_size, self.env.sharding)
        if require_finite:
            check_finite(embeddings, f"{what} embeddings")
        return embeddings


class RetrievalEvaluator(EmbeddingEvaluator):
    """Recall@1/5/10, image->text and text->image, over every reference caption."""

    type = "retrieval"
    needs = ("captions",)

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        image_NxE = self.embed_images(params, require_finite)
        text_MxE = self.embed(self.embed_text, params, self.data.texts, "caption", require_finite)
        recall = retrieval_recall(image_NxE, text_MxE, self.data.text_image)
        return {key.removeprefix("retrieval/"): value for key, value in recall.items()}


class ZeroShotEvaluator(EmbeddingEvaluator):
    """Nearest class embedding (templates averaged), top-1 and top-5."""

    type = "zeroshot"
    needs = ("class_labels",)

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        image_NxE = self.embed_images(params, require_finite)
        num_classes, _, length = self.data.prompts.shape
        prompt_CTxE = self.embed(self.embed_text, params, self.data.prompts.reshape(-1, length), "class prompt",
                                 require_finite)
        accuracy = zeroshot_accuracy(image_NxE, class_embeddings(prompt_CTxE, num_classes), self.data.labels)
        return {key.removeprefix("zeroshot/"): value for key, value in accuracy.items()}
