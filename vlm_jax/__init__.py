"""vlm_jax: vision-language pretraining in JAX."""
