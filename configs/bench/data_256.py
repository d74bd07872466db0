"""BENCH-D: the input pipeline on 256-px JPEG webdataset shards, 224-px training transform, batch 64, 2 workers.

    python -m vlm_jax.bench data --config=configs/bench/data_256.py[:DATA_DIR] [--peer=open_clip]

DATA_DIR (default bench_out/data256) gets 4,096 synthetic 256-px JPEG pairs in 8 shards and a tokenizer if it
has none. The transform matches open_clip's training default: random-resized crop at scale (0.9, 1.0) to 224;
77 text tokens. Images leave the pipeline as uint8 (the model scales them on the device); add
`|value_range(-1, 1)` before `|tokenize` to time float32 output as open_clip produces it.
"""

from vlm_jax.config import base_config


def get_config(arg=None):
    data_dir = arg or "bench_out/data256"
    c = base_config()
    c.batch_size = 64
    c.model.image.image_size = 224
    c.model.text.max_len = 77
    c.data.train_shards = f"{data_dir}/train/*.tar"
    c.data.tokenizer = f"{data_dir}/spm.model"
    c.data.pp_train = "decode_rrc(224, scale=(0.9, 1.0))|tokenize(77)|keep('image', 'text')"
    c.data.num_workers = 2
    c.data.shuffle_buffer = 1000
    return c
