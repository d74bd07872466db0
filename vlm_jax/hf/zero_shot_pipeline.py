"""Zero-shot top-1 of an exported folder through transformers' own client, on a held-out split: the check that an
export works for users, compared with `vlm_jax.evaluate` on the same images.

    python -m vlm_jax.hf.zero_shot_pipeline --model=OUT --eval='DIR/eval/*.tar' --classnames=DIR/classnames.json
        [--template="a photo of a {}."] [--limit=N]

The pipeline is called as users call it: Pillow images, the exported image processor and tokenizer, its own
padding (transformers pads SigLIP text to 64 tokens, so a SigLIP export serves the pipeline when trained at 64).
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from data_pipelines.sources import raw_eval_samples


def pipeline_top1(model: str, source: str, classnames: list[str], template: str, limit: int = 0,
                  batch_size: int = 64) -> tuple[float, int]:
    """(top-1 accuracy, images scored) of transformers' zero-shot-image-classification pipeline on the labelled
    images of `source`."""
    import transformers
    from PIL import Image

    classify = transformers.pipeline("zero-shot-image-classification", model=model, local_files_only=True)
    samples = [s for s in raw_eval_samples(source) if "__skipped__" not in s and int(s.get("label", -1)) >= 0]
    samples = samples[:limit] if limit else samples
    images = [Image.open(io.BytesIO(sample["image"])).convert("RGB") for sample in samples]
    results = classify(images, candidate_labels=classnames, hypothesis_template=template, batch_size=batch_size)
    correct = sum(result[0]["label"] == classnames[int(sample["label"])] for result, sample in zip(results, samples))
    return correct / len(samples), len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported transformers folder")
    parser.add_argument("--eval", required=True, help="held-out shards (a shard spec)")
    parser.add_argument("--classnames", required=True, help="a JSON list of class names, by label")
    parser.add_argument("--template", default="a photo of a {}.")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    args = parser.parse_args(argv)
    with open(args.classnames) as f:
        classnames = json.load(f)
    top1, count = pipeline_top1(args.model, args.eval, classnames, args.template, args.limit)
    print(json.dumps({"zero_shot_pipeline_top1": top1, "images": count, "template": args.template}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
