"""`bench decode` runs both decoders on the configured model and reports their times (not timed itself)."""

import pytest

from vlm_jax.bench_decode import bench_decode

from test_captioning import captioning_config


@pytest.mark.slow
def test_bench_decode_reports_cached_and_recomputed_rates():
    config = captioning_config()
    report = bench_decode(config, tokens=12, batch=2, repeats=1)
    assert config.model.text.max_len == 12  # widened to hold the decode
    assert {"cached_s", "recomputed_s", "cached_tokens_per_s", "cache_speedup"} <= set(report)
    assert report["cached_s"] > 0 and report["recomputed_s"] > 0
