"""Bootstrapping: parameter subtrees copied from other workdirs' newest checkpoints before the first step.

`config.init_from = {"image_encoder": {"workdir": "runs/clip"}, "lm": {"workdir": "runs/lm", "params": "lm"}}`
starts a VLM from a contrastive run's image tower and an earlier run's language model (LiT, BLIP-2 and PaliGemma
stage 1; freeze them with `optim.freeze`). `{"hf": FOLDER}` in place of a workdir reads a local transformers
folder (SigLIP, CLIP, their vision towers, PaliGemma, Gemma; vlm_jax/hf/load.py), e.g. LiT on a SigLIP image
tower: {"image_encoder": {"hf": "siglip-base-patch16-224"}}. Every parameter of a target subtree must exist in the source subtree
with the same shape; parameters the source has beyond those (e.g. a contrastive tower's pooling head) are left
out and reported.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from vlm_jax import checkpoint
from vlm_jax.config import ConfigError, load_saved_config
from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.train_state import StateLayout, TrainState, make_state_layout
from vlm_jax.workdir import resolve


def subtree(params: dict, path: str, where: str) -> dict:
    """The subtree of `params` at a '/'-separated `path`; a one-line ConfigError naming `where` if absent."""
    node = params
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where} has no parameters under {path!r} (it has: {', '.join(sorted(node))})")
        node = node[part]
    return node


def workdir_params(workdir: str, mesh: Mesh, step: int | None = None) -> tuple[int, Any]:
    """(step, parameters) of a workdir's newest checkpoint (or of `step`), its model rebuilt from the workdir's
    saved config."""
    from vlm_jax.tasks import get_task  # tasks import this module's users; imported on use
    config = load_saved_config(resolve(workdir) / "config.json")
    layout = make_state_layout(get_task(config, mesh), config, mesh)
    return checkpoint.restore_newest_params(workdir, config.keep_checkpoints, layout.abstract_state, step)


def hf_folder_params(folder: str, scan: bool, log: Callable[[str], None]) -> dict:
    """The parameters of a local transformers folder in this project's layout (layer stacks stacked when `scan`),
    after logging the import's key-by-key report."""
    from vlm_jax.hf.load import load_folder  # the hf extra
    _, params, reader = load_folder(folder, scan)
    for line in reader.report():
        log(line)
    reader.check()
    return params


def copy_matching(target: dict, source: dict, where: str, prefix: str = "") -> tuple[dict, list[str]]:
    """`target`'s structure filled with `source`'s leaves; (tree, source paths left out). A target parameter
    missing from the source, or of another shape, is a one-line ConfigError naming it (as `prefix`/path)."""
    found = dict(leaves_with_path_str(source))
    copied = {}
    for path, leaf in leaves_with_path_str(target):
        if path not in found:
            raise ConfigError(f"{where} has no parameter for {prefix + path!r}, which this model needs (shape "
                              f"{tuple(leaf.shape)})")
        if tuple(found[path].shape) != tuple(leaf.shape):
            raise ConfigError(f"parameter {prefix + path!r} is {tuple(found[path].shape)} in {where} but "
                              f"{tuple(leaf.shape)} in this model")
        copied[path] = found[path]
    left_out = sorted(set(found) - set(copied))
    leaves = [copied[path] for path, _ in leaves_with_path_str(target)]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), left_out


def initialise_from(state: TrainState, sources: dict | None, layout: StateLayout, mesh: Mesh,
                    log: Callable[[str], None] = print, scan: bool = False) -> TrainState:
    """`state` with each configured subtree of its parameters replaced by the source workdir's or transformers
    folder's, placed with this model's shardings (`config.init_from`; None or {}: unchanged). `scan`: whether this
    model's layer stacks are scanned (config.model.scan)."""
    if not sources:
        return state
    params = dict(state["params"])
    for target_path, spec in sources.items():
        spec = dict(spec) if isinstance(spec, (dict, ml_collections.ConfigDict)) else {"workdir": spec}
        if len(set(spec) & {"workdir", "hf"}) != 1 or set(spec) - {"workdir", "hf", "params"}:
            raise ConfigError(f"init_from[{target_path!r}] must be {{'workdir': DIR or 'hf': FOLDER, 'params': PATH "
                              "(optional)}")
        if "hf" in spec:
            source_params, where = hf_folder_params(spec["hf"], scan, log), spec["hf"]
        else:
            step, source_params = workdir_params(spec["workdir"], mesh)
            where = f"{spec['workdir']} (step {step})"
        source = subtree(source_params, spec.get("params", target_path), where)
        target = subtree(params, target_path, "this model")
        copied, left_out = copy_matching(target, source, where, target_path.strip("/") + "/")
        shardings = subtree(layout.shardings["params"], target_path, "this model")
        placed = jax.tree.map(lambda x, s, t: jax.device_put(x.astype(t.dtype), s), copied, shardings, target)
        params = replace_subtree(params, target_path, placed)
        log(f"initialised {target_path!r} from {where}" + (f"; not used there: {', '.join(left_out)}"
                                                             if left_out else ""))
    return {**state, "params": params}


def replace_subtree(tree: dict, path: str, value: Any) -> dict:
    """A copy of nested dict `tree` with the subtree at `path` replaced."""
    head, _, rest = path.strip("/").partition("/")
    return {**tree, head: replace_subtree(tree[head], rest, value) if rest else value}
