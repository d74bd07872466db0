"""Weights between this project's parameter trees and transformers' state dicts.

Our trees are nested dicts of arrays as `nnx.state(model, nnx.Param).to_pure_dict()` and the checkpoints give them:
Flax layouts (Dense kernels [in, out], per-head projections [D, H, K], convolutions HWIO) and layer stacks either
stacked on a leading axis (`scan`) or as {0: ..., 1: ...}. transformers' state dicts are flat {name: array} in torch
layouts. Every conversion here is a transpose or a reshape, so a round trip is bit-exact.

Files: float32 safetensors with the metadata transformers expects (`format: "pt"`), sharded with an index past a
size. Pickle `.bin` weights are refused on import because loading them can execute code.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from vlm_jax.config import ConfigError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def unstack_layers(blocks: dict, scan: bool) -> list[dict]:
    """A layer stack as a list of per-layer trees: split along axis 0 when `scan`, else the {index: tree} dict in
    index order."""
    if not scan:
        return [blocks[key] for key in sorted(blocks, key=int)]
    depth = len(jax.tree.leaves(blocks)[0])
    return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), blocks) for i in range(depth)]


def stack_layers(layers: list[dict], scan: bool) -> dict:
    """The inverse of `unstack_layers`."""
    if not scan:
        return dict(enumerate(layers))
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def unstack_all(params: dict, scan: bool) -> dict:
    """`params` with every layer stack (a "blocks" subtree) as {index: layer}, whatever `scan` was: the one layout
    exports read, so scanned and unscanned checkpoints export alike."""
    return {key: (dict(enumerate(unstack_layers(value, scan))) if key == "blocks" else
                  unstack_all(value, scan) if isinstance(value, dict) else value)
            for key, value in params.items()}


def stack_all(params: dict, scan: bool) -> dict:
    """The inverse of `unstack_all`."""
    return {key: (stack_layers([value[i] for i in sorted(value, key=int)], scan) if key == "blocks" else
                  stack_all(value, scan) if isinstance(value, dict) else value)
            for key, value in params.items()}


def dense_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax Dense kernel [in, out] (or [in, H, K] / [H, K, out] flattened first) -> torch Linear weight [out, in]."""
    return np.ascontiguousarray(np.asarray(kernel).T)


def heads_in_to_torch(kernel_DxHxK: np.ndarray) -> np.ndarray:
    """Per-head input projection [D, H, K] -> torch Linear weight [H*K, D]."""
    kernel = np.asarray(kernel_DxHxK)
    return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def heads_in_from_torch(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """torch Linear weight [H*K, D] -> per-head input projection [D, H, K]."""
    weight = np.asarray(weight)
    return np.ascontiguousarray(weight.T.reshape(weight.shape[1], num_heads, -1))


def heads_out_to_torch(kernel_HxKxD: np.ndarray) -> np.ndarray:
    """Per-head output projection [H, K, D] -> torch Linear weight [D, H*K]."""
    kernel = np.asarray(kernel_HxKxD)
    return np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)


def heads_out_from_torch(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """torch Linear weight [D, H*K] -> per-head output projection [H, K, D]."""
    weight = np.asarray(weight)
    return np.ascontiguousarray(weight.T.reshape(num_heads, -1, weight.shape[0]))


def conv_to_torch(kernel_HWIO: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(kernel_HWIO).transpose(3, 2, 0, 1))


def conv_from_torch(weight_OIHW: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(weight_OIHW).transpose(2, 3, 1, 0))


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str | os.PathLike,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: np.dtype = np.float32) -> list[str]:
    """Writes `tensors` (cast to `dtype`) as model.safetensors, or as numbered shards plus
    model.safetensors.index.json when they pass `max_shard_bytes`; returns the file names written."""
    from safetensors.numpy import save_file  # the hf extra

    arrays = {name: np.array(value, dtype, order="C") for name, value in sorted(tensors.items())}  # keeps 0-d
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in arrays.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, WEIGHTS_NAME), metadata=metadata)
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return [*names, INDEX_NAME]


def read_safetensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a transformers folder's safetensors weights (single file or index); a one-line ConfigError
    for pickle weights or a folder without weights."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"no such folder: {folder}")
    names = os.listdir(folder)
    if INDEX_NAME in names:
        with open(os.path.join(folder, INDEX_NAME)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif WEIGHTS_NAME in names:
        files = [WEIGHTS_NAME]
    else:
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles:
            raise ConfigError(f"{folder} holds pickle weights ({', '.join(pickles)}), which can execute code when "
                              "loaded; convert them to safetensors first (transformers: "
                              "model.save_pretrained(out, safe_serialization=True))")
        raise ConfigError(f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME}")
    tensors: dict[str, np.ndarray] = {}
    for file_name in files:
        tensors.update(_load_file(os.path.join(folder, file_name)))
    return tensors


def _load_file(path: str) -> dict[str, np.ndarray]:
    """One safetensors file as numpy arrays, bfloat16 tensors as ml_dtypes.bfloat16 (bits unchanged)."""
    import ml_dtypes
    import torch
    from safetensors.torch import load_file  # the hf extra (numpy has no bfloat16 of its own)

    def to_numpy(tensor: torch.Tensor) -> np.ndarray:
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    return {name: to_numpy(tensor) for name, tensor in load_file(path).items()}


class TensorReader:
    """Hands out a state dict's tensors by name and keeps the key-by-key account of an import: every key loaded,
    missing, of another shape than expected, or never asked for (unexpected)."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        self.tensors, self.source = tensors, source
        self.loaded: list[str] = []
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """The tensor `name` (checked against `shape` when given); None, recorded, when absent or mismatched."""
        if name not in self.tensors:
            self.missing.append(name)
            return None
        tensor = self.tensors[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            self.mismatched.append(f"{name}: {tuple(tensor.shape)} in the folder, {tuple(shape)} expected")
            return None
        self.loaded.append(name)
        return tensor

    @property
    def unexpected(self) -> list[str]:
        used = set(self.loaded) | set(self.missing) | {m.split(":")[0] for m in self.mismatched}
        return sorted(set(self.tensors) - used)

    def report(self) -> list[str]:
        """One line per key, then a summary line."""
        lines = [f"loaded      {name} {tuple(self.tensors[name].shape)}" for name in self.loaded]
        lines += [f"missing     {name}" for name in self.missing]
        lines += [f"mismatched  {line}" for line in self.mismatched]
        lines += [f"unexpected  {name}" for name in self.unexpected]
        lines.append(f"{self.source}: {len(self.loaded)} loaded, {len(self.missing)} missing, "
                     f"{len(self.mismatched)} mismatched, {len(self.unexpected)} unexpected")
        return lines

    def check(self) -> None:
        """A one-line ConfigError unless every key was loaded and none is left over."""
        problems = {"missing": self.missing, "mismatched": self.mismatched, "unexpected": self.unexpected}
        bad = {kind: keys for kind, keys in problems.items() if keys}
        if bad:
            raise ConfigError(f"{self.source} does not match this model: " + "; ".join(
                f"{len(keys)} {kind} (first: {keys[0]})" for kind, keys in bad.items()))

