"""open_clip's train step on BENCH-S shapes, for `python -m vlm_jax.bench step --peer=open_clip`.

Runs in an environment with torch and open_clip_torch (not a dependency of vlm_jax); prints one JSON line.
Model: open_clip's CLIP class with ViT-S/16 at 224 px (width 384, 12 layers, 6 heads), a 12-layer width-384
text tower with 64 tokens and a 32,000 vocabulary, embed dim 384, SigLipLoss, AdamW, float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import open_clip
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    vision = {"image_size": 224, "layers": 12, "width": 384, "patch_size": 16, "head_width": 64, "mlp_ratio": 4.0}
    text = {"context_length": 64, "vocab_size": 32_000, "width": 384, "heads": 6, "layers": 12}
    model = open_clip.model.CLIP(embed_dim=384, vision_cfg=vision, text_cfg=text,
                                 init_logit_scale=math.log(10), init_logit_bias=-10.0)
    loss_fn = open_clip.loss.SigLipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.rand(args.batch_size, 3, 224, 224) * 2 - 1
    tokens = torch.randint(0, 32_000, (args.batch_size, 64))

    def step():
        image_features, text_features, logit_scale, logit_bias = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        "peer": "open_clip", "open_clip_version": open_clip.__version__, "torch_version": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()), "batch_size": args.batch_size,
        "median_step_s": round(median, 4), "samples_per_s": round(args.batch_size / median, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
