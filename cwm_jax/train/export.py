"""Trained parameters out of a training workdir: into a converted checkpoint (for `Generator`, `cwm-generate`,
`orbax-to-hf`) or into the next stage's train state (`init_from=WORKDIR`).

A training checkpoint holds the stacked float32 parameters inside the train state (`checkpoints/N/state`), the run
config beside them (`checkpoints/N/config`). Only the parameters are read (Orbax partial restore), one stacked
parameter at a time, so exporting needs host memory for the largest stacked parameter (33.8 GB in float32 for the
32B model's MLP weights: a TPU VM host has several hundred GB), never for the optimizer state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cwm_jax import checkpoint, hf
from cwm_jax.config import ConfigError, CwmConfig
from cwm_jax.model import LAYER_AXES
from cwm_jax.train.config import model_config

# Architecture fields that must agree between a checkpoint and the run config that starts from it.
ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "sliding_window",
    "layer_types",
    "rope_theta",
    "rope_scaling",
)
BYTE_TOKENIZER_FILE = "tokenizer.byte"


def check_same_architecture(stored: CwmConfig, ours: CwmConfig, source) -> None:
    """ConfigError naming every architecture field where the checkpoint at `source` and the run config differ."""
    differ = [f for f in ARCHITECTURE if getattr(stored, f) != getattr(ours, f)]
    if differ:
        raise ConfigError(
            f"init_from={source} has {', '.join(f'{f}={getattr(stored, f)!r}' for f in differ)} but the run config's "
            f"model block gives {', '.join(f'{f}={getattr(ours, f)!r}' for f in differ)}"
        )


def is_train_workdir(path) -> bool:
    return (epath.Path(path) / "checkpoints").is_dir()


def step_dir(workdir, step: int | None = None) -> epath.Path:
    """`WORKDIR/checkpoints/N` of the latest complete step (or `step`); ConfigError naming the folder if none."""
    root = epath.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if not steps:
        raise ConfigError(f"{root}: no complete training checkpoint (expected folders named by step)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ConfigError(f"{root}: no checkpoint of step {step}; steps saved: {steps}")
    return root / str(step)


def run_config_of(workdir, step: int | None = None) -> ml_collections.ConfigDict:
    """The run config a training checkpoint was written with."""
    path = step_dir(workdir, step) / "config" / "metadata"
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _restore(state_dir: epath.Path, names: list[tuple[str, ...]], restore_args) -> dict:
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    item: dict = {}
    for path in names:
        node, src = item.setdefault("params", {}), tree["params"]
        for key in path[:-1]:
            node, src = node.setdefault(key, {}), src[key]
        node[path[-1]] = src[path[-1]]
    args = jax.tree.map(restore_args, item)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))


def restore_params(workdir, shardings: dict, step: int | None = None) -> dict:
    """The trained float32 parameters of a workdir, read straight into `shardings` (a tree like `hf.model_params`;
    each process reads only the slices its devices hold)."""
    state_dir = step_dir(workdir, step) / "state"
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(state_dir).item_metadata.tree
        args = ocp.args.PyTreeRestore(
            item={"params": tree["params"]}, restore_args={"params": restore_args}, partial_restore=True
        )
        return ckptr.restore(state_dir, args=args)["params"]


def trained_leaves(workdir, config: CwmConfig, step: int | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """(canonical path, numpy array in `config.param_dtype`) of every leaf of `checkpoint.layout(config)`, reading
    one stacked parameter at a time."""
    state_dir = step_dir(workdir, step) / "state"
    target = hf.numpy_dtype(config.param_dtype)
    as_numpy = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)  # noqa: E731
    for name in ("embed", "final_norm", "lm_head"):
        value = _restore(state_dir, [(name,)], as_numpy)["params"][name]
        yield (name,), value.astype(target)
    for name in LAYER_AXES:
        stacked = _restore(state_dir, [("layers", name)], as_numpy)["params"]["layers"][name]
        for i in range(config.num_layers):
            yield ("layers", str(i), name), np.ascontiguousarray(stacked[i].astype(target))
        del stacked


def export(
    workdir,
    dst,
    *,
    step: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    on_leaf=None,
    compression: bool = True,
):
    """Write the trained model of `workdir` (latest step, or `step`) as a converted checkpoint at `dst`, with the
    run's tokenizer; `dtype` defaults to the run's compute dtype; `compression` as in `save_streaming`. Returns the
    architecture written."""
    import dataclasses
    import tempfile

    cfg = run_config_of(workdir, step)
    config = model_config(cfg)
    dtype = dtype or cfg.dtype
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        files = tokenizer_files(cfg.tokenizer, epath.Path(tmp))
        checkpoint.save_streaming(
            dst,
            config,
            trained_leaves(workdir, config, step),
            files=files,
            overwrite=overwrite,
            on_leaf=on_leaf,
            compression=compression,
        )
    return config


def tokenizer_files(tokenizer: str, scratch: epath.Path) -> list[epath.Path]:
    """The files that let `load_tokenizer(folder)` find the run's tokenizer: its file(s), or for "byte" a marker
    written into `scratch`."""
    if tokenizer == "byte":
        marker = scratch / BYTE_TOKENIZER_FILE
        marker.write_text("cwm_jax.tokenizer.ByteTokenizer: UTF-8 bytes, then the 256 CWM special tokens\n")
        return [marker]
    src = epath.Path(tokenizer)
    if src.is_file():
        return [src]
    return [p for p in src.iterdir() if p.name.startswith("tokenizer") and p.is_file()]
