"""HBM traffic from a compiled TPU program's HLO: on-chip buffers and fused computations left out, each
HBM <-> VMEM copy counted once; and on a program the TPU compiler placed partly in VMEM."""

import jax
import jax.numpy as jnp
import pytest

from vlm_jax.hbm_traffic import hbm_traffic_bytes

from tpu_targets import on_one_chip

HLO = """HloModule m, entry_computation_layout={(bf16[1024]{0}, f32[256]{0})->bf16[1024]{0}}

%fused_computation (param_0: bf16[1024]) -> bf16[1024] {
  %param_0 = bf16[1024]{0} parameter(0)
  ROOT %negate = bf16[1024]{0} negate(%param_0)
}

%fused_computation.2 (param_0.1: bf16[1024], param_1: f32[256]) -> bf16[1024] {
  %param_0.1 = bf16[1024]{0} parameter(0)
  %param_1 = f32[256]{0} parameter(1)
  ROOT %copy = bf16[1024]{0} copy(%param_0.1)
}

ENTRY %main (p0: bf16[1024], p1: f32[256]) -> bf16[1024] {
  %p0 = bf16[1024]{0:T(1024)} parameter(0)
  %p1 = f32[256]{0:T(256)} parameter(1)
  %copy-start = (f32[256]{0:T(256)S(1)}, f32[256]{0:T(256)}, u32[]{:S(2)}) copy-start(%p1)
  %copy-done = f32[256]{0:T(256)S(1)} copy-done(%copy-start)
  %fusion = bf16[1024]{0:T(1024)S(1)} fusion(%p0), kind=kLoop, calls=%fused_computation
  ROOT %fusion.1 = bf16[1024]{0:T(1024)} fusion(%fusion, %copy-done), kind=kLoop, calls=%fused_computation.2
}
"""


def test_counts_hbm_buffers_and_each_copy_once():
    counted = hbm_traffic_bytes(HLO)
    # the copy: 1,024 B read from HBM; the first fusion: reads p0 (2,048 B), writes to VMEM; the second: reads
    # VMEM only, writes 2,048 B to HBM. The fused computations' own instructions are not traffic.
    assert counted["hbm_bytes"] == 1024 + 2048 + 2048
    # every memory space, the copy at both ends (operand + its (destination, source, context) tuple, twice)
    assert counted["all_spaces_bytes"] == 2 * (1024 + 1024 + 1024 + 4) + (2048 + 2048) + (2048 + 2048 + 1024)


@pytest.mark.slow
def test_a_compiled_step_reads_and_writes_its_buffers_and_keeps_some_on_chip():
    """Four residual MLP blocks, forward and backward, compiled for one v5p chip: the compiler keeps buffers in
    VMEM, so the HBM traffic is below its "bytes accessed", and at least the arguments and outputs move."""
    def grads(params, x):
        def loss(params):
            h = x
            for w_in, w_out in params:
                h = h + jax.nn.gelu(jax.nn.standardize(h) @ w_in) @ w_out
            return jnp.sum(h.astype(jnp.float32) ** 2)
        return jax.grad(loss)(params)

    block = (jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16))
    abstract = on_one_chip("v5p", ([block] * 4, jax.ShapeDtypeStruct((2048, 256), jnp.bfloat16)))
    compiled = jax.jit(grads).lower(*abstract).compile()
    text, memory = compiled.as_text(), compiled.memory_analysis()
    assert "S(1)}" in text and "copy-start" in text  # memory-space assignment used VMEM
    counted = hbm_traffic_bytes(text)
    assert memory.argument_size_in_bytes + memory.output_size_in_bytes <= counted["hbm_bytes"]
    bytes_accessed = compiled.cost_analysis()["bytes accessed"]
    assert counted["hbm_bytes"] < 0.6 * min(bytes_accessed, counted["all_spaces_bytes"])
