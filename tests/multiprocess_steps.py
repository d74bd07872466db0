"""One process of a multi-host job (started by launch/local.py): 5 train steps of the tiny model on the
global mesh, each process feeding only its rows of the same global batches; process 0 prints the losses and
the gradient norms (before clipping), as tests/test_train_step.py's run_steps returns them.

    python -m launch.local --processes 2 --devices-per-process 4 -- python tests/multiprocess_steps.py data=2 fsdp=2 tensor=2
"""

import json
import sys

import jax
import numpy as np

from vlm_jax.parallel.distributed import initialize, options_from_env
from vlm_jax.train_state import init_train_state


def local_rows(sharding, global_array: np.ndarray) -> np.ndarray:
    """The rows of a batch-sharded global array that live on this process's devices, in order."""
    indices = sharding.addressable_devices_indices_map(global_array.shape).values()
    rows = sorted({row for index in indices for row in range(*index[0].indices(global_array.shape[0]))})
    return global_array[rows]


def main() -> None:
    initialize(options_from_env())
    from test_train_step import make_batch, setup, tiny_config  # the same model, step and batches as 1 device
    mesh_sizes = dict(item.split("=") for item in sys.argv[1:])
    config = tiny_config(**{axis: int(size) for axis, size in mesh_sizes.items()})
    layout, sharding, step = setup(config, jax.devices())
    state, history = init_train_state(layout, 0), {"loss": [], "grad_norm": []}
    for i in range(5):
        batch = {key: jax.make_array_from_process_local_data(sharding, local_rows(sharding, value), value.shape)
                 for key, value in make_batch(i).items()}
        state, metrics = step(state, batch)
        for key in history:
            history[key].append(float(metrics[key]))
    if jax.process_index() == 0:
        print("HISTORY " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                                       "history": history}), flush=True)


if __name__ == "__main__":
    main()
