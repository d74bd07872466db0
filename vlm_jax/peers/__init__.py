"""Peer implementations timed side by side with ours by `vlm_jax.bench` (each runs in its own environment)."""
