"""One process of a multi-host job (started by launch/local.py): 5 train steps of the tiny model on the
global mesh, each process feeding only its rows of the same global batches; process 0 prints the losses.

    python -m launch.local --processes 2 --devices-per-process 4 -- python tests/multiprocess_steps.py data=2 fsdp=2 tensor=2
"""

import json
import sys

import jax
import numpy as np

from vlm_jax.parallel.distributed import initialize, options_from_env
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import batch_sharding
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout
from vlm_jax.train_step import make_train_step


def local_rows(sharding, global_array: np.ndarray) -> np.ndarray:
    """The rows of a batch-sharded global array that live on this process's devices, in order."""
    indices = sharding.addressable_devices_indices_map(global_array.shape).values()
    rows = sorted({row for index in indices for row in range(*index[0].indices(global_array.shape[0]))})
    return global_array[rows]


def main() -> None:
    initialize(options_from_env())
    from test_train_step import make_batch, tiny_config  # the same model and batches as the 1-device run
    mesh_sizes = dict(item.split("=") for item in sys.argv[1:])
    config = tiny_config(**{axis: int(size) for axis, size in mesh_sizes.items()})
    mesh = make_mesh(config.mesh)
    sharding = batch_sharding(mesh, config.sharding_rules)
    task = get_task(config, mesh)
    layout = make_state_layout(task, config, mesh)
    step = make_train_step(task, layout, sharding)
    state, losses = init_train_state(layout, 0), []
    for i in range(5):
        batch = {key: jax.make_array_from_process_local_data(sharding, local_rows(sharding, value), value.shape)
                 for key, value in make_batch(i).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        print("LOSSES " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                                      "losses": losses}), flush=True)


if __name__ == "__main__":
    main()
