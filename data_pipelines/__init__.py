"""Input pipelines: webdataset tar shards through grain, ops, tokenizers, tools. Never imports vlm_jax."""
