"""The exported folder's README.md: what was trained on what, its evaluation results, and how to load it."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from vlm_jax.workdir import resolve

LOADING = {
    "siglip": '''from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{out}")            # SiglipModel
processor = AutoProcessor.from_pretrained("{out}")
inputs = processor(text=["a red circle"], images=[Image.open("image.jpg")],
                   padding="max_length", max_length={max_len}, return_tensors="pt")
logits_per_image = model(**inputs).logits_per_image
classify = pipeline("zero-shot-image-classification", model="{out}")
classify("image.jpg", candidate_labels=["red circle", "blue square"], tokenizer_kwargs={{"max_length": {max_len}}})
''',
    "clip": '''from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{out}")            # CLIPModel
processor = AutoProcessor.from_pretrained("{out}")
inputs = processor(text=["a red circle"], images=[Image.open("image.jpg")], padding=True, return_tensors="pt")
logits_per_image = model(**inputs).logits_per_image
classify = pipeline("zero-shot-image-classification", model="{out}")
classify("image.jpg", candidate_labels=["red circle", "blue square"])
''',
    "vision": '''from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{out}")            # {cls}
pixels = AutoImageProcessor.from_pretrained("{out}")(images=[Image.open("image.jpg")], return_tensors="pt")
outputs = model(**pixels)                             # last_hidden_state, pooler_output
''',
    "paligemma": '''import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaForConditionalGeneration

model = PaliGemmaForConditionalGeneration.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
pixels = AutoImageProcessor.from_pretrained("{out}")(images=[Image.open("image.jpg")], return_tensors="pt").pixel_values
# [<image> x {image_tokens}][BOS] prompt [separator], as in training; the prefix attends bidirectionally
prompt = ([tokenizer.image_token_id] * {image_tokens} + [tokenizer.bos_token_id] + tokenizer("what shape?")["input_ids"]
          + tokenizer("{separator}")["input_ids"])
input_ids = torch.tensor([prompt])
out = model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids),
                     token_type_ids=torch.zeros_like(input_ids), max_new_tokens=16, do_sample=False)
print(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
''',
}


def write(config: ml_collections.ConfigDict, summary: dict[str, Any], workdir: str | None, out: str) -> list[str]:
    """Writes README.md into `out`; returns its name."""
    kind, cls = summary["kind"], summary["class"]
    m = config.model
    results = _eval_results(workdir)
    lines = [f"---\nlibrary_name: transformers\ntags: [vlm_jax, {kind}]\n---", f"# {cls} exported by vlm_jax", "",
             f"Trained with vlm_jax (task `{config.task}`, {config.total_steps} steps, batch {config.batch_size}); "
             f"this is the checkpoint of step {summary['step']}, exported as `{cls}` in float32.", ""]
    if kind == "siglip" and m.loss == "softmax":
        lines += ["This model was trained with the softmax (CLIP) loss, so its `logit_bias` is 0: rank with "
                  "`logits_per_image` (or softmax over the labels); sigmoid probabilities are not calibrated.", ""]
    if kind == "vision" and config.task != "contrastive":
        lines += [f"Only the vision tower is exported: the {config.task} model's text decoder has no transformers "
                  "class.", ""]
    lines += ["## Training", "", "```json", json.dumps(_training_summary(config), indent=2, default=str), "```", ""]
    lines += ["## Evaluation", ""]
    lines += ([f"- {name}: {value}" for name, value in sorted(results.items())] if results
              else ["No evaluation results in the workdir (run `python -m vlm_jax.evaluate --workdir=...`)."])
    max_len = m.text.max_len
    lines += ["", "## Loading", "", "```python",
              LOADING[kind].format(out=os.path.basename(out.rstrip("/")).removesuffix(".partial"), max_len=max_len, cls=cls,
                                   image_tokens=summary["image_tokens"],
                                   separator=dict(config.data.vlm or {}).get("separator", ";")).rstrip(), "```", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))
    return ["README.md"]


# The config.model sections each task's model is built from.
MODEL_KEYS = {"contrastive": ("arch", "loss", "embed_dim", "image_projection", "image", "text"),
              "captioning": ("image", "text", "decoder", "caption"), "coca": ("image", "text", "decoder", "coca"),
              "vlm": ("image", "lm", "vlm")}


def _training_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    data, model = config.data, config.model.to_dict()
    return {"task": config.task, "model": {key: model[key] for key in ("dtype", *MODEL_KEYS[config.task])},
            "optim": config.optim.to_dict(),
            "data": {"train_shards": data.train_shards, "mixture": data.mixture, "tokenizer": data.tokenizer},
            "total_steps": config.total_steps, "batch_size": config.batch_size}


def _eval_results(workdir: str | None) -> dict[str, Any]:
    """The scalar results of the workdir's eval_results.json (empty when there is none)."""
    if workdir is None:
        return {}
    path = resolve(workdir) / "eval_results.json"
    if not path.exists():
        return {}
    results = json.loads(path.read_text())
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
