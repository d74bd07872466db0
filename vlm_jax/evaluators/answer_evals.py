"""Question answering by exact match (VQA-style): a prompted decoder-only model answers each configured question
about every held-out image, greedily, and the answer must equal the reference after normalisation (lower case,
punctuation removed, whitespace collapsed).

    config.evals = {"answers": {"questions": {"colour": {"prompt": "what colour?", "answer": "{colour}"},
                                              "shape": {"prompt": "what shape?", "answer": "{shape}"}}}}

Answers are templates over the split's `.json` fields (as data.vlm's suffixes are); an image without a field its
answer needs is left out of that question. Metrics: "<question>/exact_match" and their mean "exact_match".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.samples import SampleError
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.vlm_examples import render, template_fields
from vlm_jax.config import ConfigError
from vlm_jax.decoding import SamplingConfig
from vlm_jax.evaluators.caption_metrics import normalize_caption
from vlm_jax.evaluators.common import Evaluator, apply_in_batches
from vlm_jax.evaluators.predict import DecodeSettings, make_caption_decoder


def _questions(settings: dict[str, Any], name: str) -> dict[str, dict[str, str]]:
    questions = settings.get("questions")
    if not isinstance(questions, dict) or not questions or not all(
            isinstance(q, dict) and set(q) == {"prompt", "answer"} for q in questions.values()):
        raise ConfigError(f"evaluation {name!r}: questions must be {{name: {{'prompt': text, 'answer': template}}}}")
    return questions


class AnswersEvaluator(Evaluator):
    """Greedy answers to prompted questions, scored by exact match against templated references."""

    type = "answers"
    prediction = "decode"
    settings = {"questions": None, "max_new_tokens": 8, "max_images": None}

    @classmethod
    def fields(cls, settings: dict[str, Any]) -> tuple[str, ...]:
        questions = settings.get("questions") or {}
        return tuple(sorted({name for q in questions.values() if isinstance(q, dict)
                             for name in template_fields(str(q.get("answer", "")))} - {"caption"}))

    def __init__(self, spec, env, data):
        super().__init__(spec, env, data)
        self.questions = _questions(self.options, spec.name)
        limit = self.options["max_images"]
        if limit is not None and limit < 1:
            raise ConfigError(f"evaluation {spec.name!r}: max_images must be >= 1 (or None)")
        for name, question in self.questions.items():
            if not any(ref is not None for ref in self.references(question["answer"])):
                raise ConfigError(f"evaluation {spec.name!r}: no image of the split has the fields of question "
                                  f"{name!r}'s answer {question['answer']!r}")
        settings = DecodeSettings(max_new_tokens=int(self.options["max_new_tokens"]), sampling=SamplingConfig())
        self.decoders = {name: make_caption_decoder(env.task, env.layout, env.mesh, settings, q["prompt"])
                         for name, q in self.questions.items()}
        self.tokenizer = Tokenizer(env.config.data.tokenizer)

    def references(self, template: str) -> list[str | None]:
        """The normalised reference answer of every image (None: the image lacks a field)."""
        data, answers = self.data, []
        for index in range(len(data.images)):
            sample = {name: values[index] for name, values in data.fields.items()}
            if data.references and data.references[index]:
                sample["caption"] = data.references[index][0]
            try:
                answers.append(normalize_caption(render(template, sample)))
            except SampleError:
                answers.append(None)
        return answers

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        results = {}
        for name, question in self.questions.items():
            references = self.references(question["answer"])
            rows = np.flatnonzero([ref is not None for ref in references])[:self.options["max_images"]]
            tokens = apply_in_batches(lambda image: self.decoders[name](params, image, 0), self.data.images[rows],
                                      self.env.batch_size, self.env.sharding)
            answers = [normalize_caption(self.tokenizer.decode(row)) for row in tokens]
            results[f"{name}/exact_match"] = float(np.mean([a == references[r] for a, r in zip(answers, rows)]))
        results["exact_match"] = float(np.mean(list(results.values())))
        return results
