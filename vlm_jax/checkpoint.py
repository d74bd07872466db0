"""Orbax checkpoints of the train state and the data iterator: async, keep-N, atomic, auto-resume."""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.train_state import TrainState
from vlm_jax.workdir import resolve


PARTIAL_SAVE_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a save not yet committed


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


def make_manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """The manager of `workdir/checkpoints` (local, gs:// or s3://)."""
    directory = resolve(workdir) / "checkpoints"
    if jax.process_index() == 0:
        remove_partial_saves(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def remove_partial_saves(directory) -> None:
    """Deletes the temporary directories of saves cut short (kill -9 mid-save). Done here, synchronously:
    orbax's own `cleanup_tmp_directories` runs in a background future that `close()` does not wait for, so a
    run that stops at once (a refused config) died in it with a traceback at interpreter exit."""
    if directory.exists():
        for path in directory.glob(f"*{PARTIAL_SAVE_MARK}*"):
            path.rmtree()


def finish(manager: ocp.CheckpointManager) -> None:
    """Completes the save in flight (orbax commits it atomically) and releases the manager; call it on every
    exit path. A save cut short by kill -9 leaves a temporary directory that the next `make_manager` removes."""
    try:
        manager.wait_until_finished()
    finally:
        manager.close()


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_iterator: grain.DatasetIterator | None) -> bool:
    """Starts an async save of `step` (the caller decides when); returns whether one started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=True)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> None:
    """Fails with one line when the stored parameter shapes differ from the configured model's."""
    stored = manager.item_metadata(step)["state"]
    missing = sorted(set(abstract_state) - set(stored))
    if missing:
        raise CheckpointMismatchError(f"{manager.directory} holds a checkpoint from an older vlm_jax (its train "
                                      f"state has no {', '.join(missing)}); use a new workdir")
    stored_shapes = {path: tuple(meta.shape) for path, meta in leaves_with_path_str(stored["params"])}
    expected = {path: tuple(x.shape) for path, x in leaves_with_path_str(abstract_state["params"])}
    directory = manager.directory
    for path in sorted(set(stored_shapes) | set(expected)):
        if stored_shapes.get(path) != expected.get(path):
            raise CheckpointMismatchError(
                f"{directory} holds a checkpoint of a different model: parameter {path!r} is "
                f"{stored_shapes.get(path, 'absent')} there but {expected.get(path, 'absent')} in the config; "
                "use a new workdir")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState,
            data_iterator: grain.DatasetIterator | None) -> TrainState:
    """The train state of `step`, placed like `abstract_state`; the data iterator is restored in place."""
    check_compatible(manager, step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> Any:
    """The parameters of `step`, for evaluation and export (the optimizer state is restored, then dropped)."""
    return restore(manager, step, abstract_state, None)["params"]


def restore_newest_params(workdir, keep: int, abstract_state: TrainState, step: int | None = None
                          ) -> tuple[int, Any]:
    """(step, parameters) of the newest checkpoint in `workdir`, or of checkpoint `step`; FileNotFoundError when
    there is none."""
    manager = make_manager(workdir, keep)
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        elif step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {manager.directory} (it has steps: "
                                    f"{', '.join(map(str, manager.all_steps())) or 'none'})")
        return step, restore_params(manager, step, abstract_state)
    finally:
        manager.close()
