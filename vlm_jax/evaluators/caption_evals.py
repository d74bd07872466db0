"""Evaluators of generative models: perplexity and the scoring classifier ("score"), captioning ("decode").

Shape key: N images, M captions, B batch, C classes, T templates, P prompts (C x T), L tokens.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.tokenizer import Tokenizer
from vlm_jax.decoding import SamplingConfig
from vlm_jax.evaluators.caption_metrics import caption_scores
from vlm_jax.evaluators.common import Evaluator, apply_in_batches, check_finite
from vlm_jax.evaluators.gallery import render_gallery_png, write_gallery
from vlm_jax.evaluators.predict import DecodeSettings, make_caption_decoder, on_mesh
from vlm_jax.evaluators.ranks import ranks_of_matches


class PerplexityEvaluator(Evaluator):
    """NLL per token of every reference caption given its image, and its exponential."""

    type = "perplexity"
    prediction = "score"
    needs = ("captions",)

    def __init__(self, spec, env, data):
        super().__init__(spec, env, data)
        task = env.task
        self.score = on_mesh(task, env.layout, env.mesh,
                             lambda model, image, text: task.score_text(model, task.encode_context(model, image),
                                                                        text))

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        data, size = self.data, self.env.batch_size
        nll_M, count_M = [], []
        for start in range(0, len(data.texts), size):  # gather images per chunk, not for every caption at once
            rows = slice(start, start + size)
            nll, count = apply_in_batches(lambda image, text: self.score(params, image, text),
                                          (data.images[data.text_image[rows]], data.texts[rows]), size,
                                          self.env.sharding)
            nll_M.append(nll)
            count_M.append(count)
        nll_M, count_M = np.concatenate(nll_M), np.concatenate(count_M)
        if require_finite:
            check_finite(nll_M, "caption log-likelihoods")
        per_token = float(np.sum(nll_M) / max(np.sum(count_M), 1))
        return {"nll": per_token, "perplexity": float(np.exp(per_token))}


class ScoringClassifierEvaluator(Evaluator):
    """Zero-shot classification by caption likelihood (CapPa): the class whose prompts (mean over templates of
    each prompt's summed log-likelihood) are most likely given the image. Top-1 and top-5."""

    type = "scoring_classifier"
    prediction = "score"
    needs = ("class_labels",)
    settings = {"prompt_chunk": 8}  # prompts scored at once per image batch (memory: chunk x batch sequences)

    def __init__(self, spec, env, data):
        super().__init__(spec, env, data)
        task, prompts_PxL = env.task, jnp.asarray(data.prompts.reshape(-1, data.prompts.shape[-1]))
        chunk = min(int(self.options["prompt_chunk"]), len(prompts_PxL))

        def nll_of_prompts(model, image):
            context = task.encode_context(model, image)

            def one_prompt(prompt_L):
                text_BxL = jnp.broadcast_to(prompt_L, (image.shape[0], prompt_L.shape[0]))
                return task.score_text(model, context, text_BxL)[0]

            return jax.lax.map(one_prompt, prompts_PxL, batch_size=chunk).T  # [B, P]
        self.nll = on_mesh(task, env.layout, env.mesh, nll_of_prompts)

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        data = self.data
        nll_NxP = apply_in_batches(lambda image: self.nll(params, image), data.images, self.env.batch_size,
                                   self.env.sharding)
        if require_finite:
            check_finite(nll_NxP, "prompt log-likelihoods")
        num_classes = data.prompts.shape[0]
        scores_NxC = -nll_NxP.reshape(len(nll_NxP), num_classes, -1).mean(axis=-1)
        ranks_N = ranks_of_matches(scores_NxC, data.labels[:, None] == np.arange(num_classes)[None, :])
        top5 = min(5, num_classes)
        return {"top1": float(np.mean(ranks_N < 1)), f"top{top5}": float(np.mean(ranks_N < top5))}


class CaptioningEvaluator(Evaluator):
    """Decodes a caption per image (greedy, sampling or beam search) and scores CIDEr-D and BLEU-4 against the
    references; writes gallery.html (images, generated and reference captions), a gallery.png of the first 16
    and captions.jsonl in the workdir."""

    type = "captioning"
    prediction = "decode"
    needs = ("captions",)
    settings = {"max_new_tokens": None, "beam": 1, "length_penalty": 0.6, "temperature": 0.0, "top_k": 0,
                "top_p": 1.0, "max_images": None, "gallery": 48, "prompt": None}

    def __init__(self, spec, env, data):
        super().__init__(spec, env, data)
        o = self.options
        decode = DecodeSettings(
            max_new_tokens=env.task.max_decode_len() if o["max_new_tokens"] is None else int(o["max_new_tokens"]),
            beam=int(o["beam"]),
            length_penalty=float(o["length_penalty"]),
            sampling=SamplingConfig(temperature=float(o["temperature"]), top_k=int(o["top_k"]),
                                    top_p=float(o["top_p"])))
        self.decode = make_caption_decoder(env.task, env.layout, env.mesh, decode, o["prompt"])
        if (o["max_images"] is not None and o["max_images"] < 1) or o["gallery"] < 0:
            raise ValueError(f"evaluation {spec.name!r}: max_images must be >= 1 (or None) and gallery >= 0")
        self.tokenizer = Tokenizer(env.config.data.tokenizer)
        self.description = decode.describe()

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        data, limit = self.data, self.options["max_images"]
        captioned = np.flatnonzero([bool(refs) for refs in data.references])[:limit]
        batches = iter(range(step * len(captioned), (step + 1) * len(captioned)))  # fresh draws per batch and step
        tokens = apply_in_batches(lambda image: self.decode(params, image, next(batches)), data.images[captioned],
                                  self.env.batch_size, self.env.sharding)
        generated = [self.tokenizer.decode(row) for row in tokens]
        references = [data.references[i] for i in captioned]
        results = caption_scores(generated, references)
        if self.env.workdir is not None and jax.process_index() == 0:
            self.write_outputs(step, captioned, generated, references)
        return {key.removeprefix("captioning/"): value for key, value in results.items()}

    def write_outputs(self, step: int, rows: np.ndarray, generated: list[str], references: list[list[str]]) -> None:
        shown = int(self.options["gallery"])
        if shown:
            images = self.data.images[rows[:shown]]
            write_gallery(self.env.workdir / "gallery.html", images, generated[:shown], references[:shown],
                          f"{self.spec.name} at step {step}: {self.description}")
            (self.env.workdir / "gallery.png").write_bytes(render_gallery_png(images, generated, references))
        lines = [json.dumps({"key": self.data.keys[row], "caption": caption, "references": refs})
                 for row, caption, refs in zip(rows, generated, references)]
        (self.env.workdir / "captions.jsonl").write_text("\n".join(lines) + "\n")
