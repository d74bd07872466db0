"""The lines every process prints around joining a multi-process job; launchers watch a worker's output for
them (jax-free, so a launcher on a laptop imports it without JAX)."""

JOINING = "vlm_jax: joining the job (jax.distributed)"
JOINED = "vlm_jax: joined the job as process"
