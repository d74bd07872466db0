"""open_clip's webdataset training loader on local shards, for the data benchmark's peer (DESIGN.md, Benchmarks).

Runs in an environment with torch, open_clip_torch, `webdataset<=0.2.86` and pandas (`make peer-env`; not
dependencies of vlm_jax); prints one JSON line. Loader: `open_clip_train.data.get_wds_dataset` as open_clip's
trainer calls it (is_train=True, epoch 0, seed 0, not resampled), with open_clip's training image transform
(random-resized crop, its default scale (0.9, 1.0), bicubic, OpenAI mean/std) and the ViT-B-32 tokenizer (the
bundled BPE SimpleTokenizer, 77 tokens). Nothing is downloaded: no model is built and the Hub is set offline.
Times `--batches` batches after `--warmup` batches (worker start-up and shuffle-buffer fill fall in the warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _shards(spec: str) -> str | list[str]:
    """A brace pattern (or `::`-joined patterns) goes to open_clip as given; a comma list becomes a list."""
    if "{" in spec or "," not in spec:
        return spec
    return [path for path in spec.split(",") if path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", required=True, help="brace pattern or comma list of local .tar shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=40, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (at least 1)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="train_num_samples; if omitted open_clip reads sizes.json or __len__ next to the shards")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing below should touch the network
    import open_clip
    import torch
    import webdataset
    from open_clip_train.data import get_wds_dataset

    torch.manual_seed(0)
    # Every field get_wds_dataset reads for a training set (open_clip_train.params defaults otherwise).
    train_args = argparse.Namespace(
        train_data=_shards(args.shards), val_data=None, dataset_resampled=False,
        train_num_samples=args.num_samples, train_data_upsampling_factors=None,
        batch_size=args.batch_size, workers=args.workers, world_size=1, seed=0)
    preprocess = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    data = get_wds_dataset(train_args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    loader = data.dataloader

    def batches():
        # open_clip's trainer loop: set the shared epoch, iterate one epoch of loader.num_batches, repeat.
        epoch = 0
        while True:
            data.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    images, texts = next(stream)
    expected = (args.batch_size, 3, args.image_size, args.image_size)
    if tuple(images.shape) != expected or images.dtype != torch.float32 or texts.shape[0] != args.batch_size:
        raise RuntimeError(f"unexpected batch: images {tuple(images.shape)} {images.dtype}, text {tuple(texts.shape)}")
    warmup = max(args.warmup, 1)  # the first batch, checked above, is a warm-up batch
    for _ in range(warmup - 1):
        next(stream)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(stream)
    elapsed = time.perf_counter() - start
    print(json.dumps({
        "peer": "open_clip", "loader": "get_wds_dataset",
        "samples_per_s": round(args.batches * args.batch_size / elapsed, 2),
        "batch_size": args.batch_size, "workers": args.workers, "image_size": args.image_size,
        "batches": args.batches, "warmup": warmup, "elapsed_s": round(elapsed, 3),
        "epoch_batches": loader.num_batches, "text_shape": list(texts.shape),
        "open_clip": open_clip.__version__, "webdataset": webdataset.__version__, "torch": torch.__version__}),
        flush=True)
    # The DataLoader's persistent workers are usually left mid-epoch here; exiting through interpreter
    # teardown then depends on iterator finalisers and worker joins (a known source of hangs with webdataset).
    # The result is printed and flushed and nothing remains to be written, so leave at once; the workers see
    # their parent die (torch's watchdog) and exit on their own.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
