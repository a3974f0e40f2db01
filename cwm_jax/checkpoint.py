"""Converted checkpoints: the canonical per-layer tree in Orbax, written leaf by leaf, restored straight into a mesh.

A converted checkpoint DST is a folder:

    DST/config.json   transformers' config.json of the architecture (`CwmConfig.to_hf()`), "dtype" = stored dtype
    DST/params/       an Orbax checkpoint of the canonical tree of `cwm_jax.hf` (a leaf is one layer's tensor)
    DST/<files>       extra files copied verbatim (tokenizer.json, generation_config.json, ...)

Writing uses Orbax partial saves, a batch of leaves (about `batch_bytes`) per call, so host memory stays a small
multiple of the largest tensor. One partial save per leaf is not an option: each call re-reads and re-merges the
metadata of every earlier call (with OCDBT, 64 layers x 9 leaves of 1 MB took 490 s plus 100 s to finalize, against
2.3 s in 16 calls). Leaves are stored as one zarr array each, not in OCDBT files (see `_write_params`). Reading is
plain Orbax (`ocp.load`, with partial loads for `iter_leaves`).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import json
import logging
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from cwm_jax import hf, quant
from cwm_jax.config import CwmConfig
from cwm_jax.hf import CheckpointError, and_more
from cwm_jax.model import LAYER_AXES, TOP_AXES, CwmModel, layer_shapes, top_shapes
from cwm_jax.quant import QuantConfig
from cwm_jax.sharding import logical_to_spec

Path = tuple[str, ...]


class _DropZarr3FalseAlarm(logging.Filter):
    """Orbax's loader looks for OCDBT or zarr v2 (`.zarray`) files and warns of a "malformed checkpoint" when a
    checkpoint holds only zarr v3 arrays, as ours (no OCDBT) do; the warning is wrong, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorStore data files not found" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropZarr3FalseAlarm())

# Leaves per Orbax call: the per-call metadata merge grows quadratically in calls (~150 for the 32B model here, about
# 20 s by the measurements in the module docstring); smaller batches lower peak host memory (a 4 GB checkpoint
# converted 2x faster with 256 MB than with 1 GB batches, as the writer waits less behind one large save).
BATCH_BYTES = 512 << 20
# Chunks of stored arrays: a process restoring a shard reads only the chunks it overlaps (one chunk per tensor would
# make every host read the whole 1.57 GB embedding).
CHUNK_BYTES = 16 << 20
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def layout(config: CwmConfig) -> list[tuple[Path, tuple[int, ...]]]:
    """(canonical path, canonical shape) of every leaf, in `hf.hf_layout` order (top-level tensors, then layers)."""
    return [(path, shape) for path, _, shape, _ in hf.hf_layout(config).values()]


def leaf_specs(config: CwmConfig, qc: QuantConfig | None = None) -> dict[Path, tuple[tuple[int, ...], str]]:
    """(shape, dtype name) of every stored leaf, in write order. Float leaves are in `config.param_dtype`; with `qc`
    each quantized weight P (`qc.names`) is stored as P + ("qvalue",) (integers, canonical shape) and P + ("scale",)
    ([G, out], `qc.scale_dtype`), as `quant.quantize` returns them."""
    specs: dict[Path, tuple[tuple[int, ...], str]] = {}
    for path, shape in layout(config):
        name = path[-1]
        if qc is not None and name in qc.names:
            specs[(*path, "qvalue")] = (tuple(shape), jnp.dtype(qc.qtype).name)
            specs[(*path, "scale")] = (quant.scale_shape(shape, quant.N_IN[name], qc), jnp.dtype(qc.scale_dtype).name)
        else:
            specs[path] = (tuple(shape), config.param_dtype)
    return specs


def model_leaves(model: CwmModel) -> Iterator[tuple[Path, np.ndarray]]:
    """The canonical leaves of `model` as numpy arrays in its parameter dtype, one at a time, in `layout` order."""
    params = hf.model_params(model)
    for path, _ in layout(model.config):
        value = params["layers"][path[2]][int(path[1])] if path[0] == "layers" else params[path[0]]
        yield path, np.asarray(jax.device_get(value))


def save_streaming(
    dst,
    config: CwmConfig,
    leaves: Iterable[tuple[Path, np.ndarray]],
    *,
    files: Iterable = (),
    overwrite: bool = False,
    on_leaf: Callable[[Path, int], None] | None = None,
    batch_bytes: int = BATCH_BYTES,
    quant_config: QuantConfig | None = None,
    compression: bool = True,
) -> None:
    """Write a converted checkpoint to `dst` from `(canonical path, array)` pairs, consumed lazily.

    Every leaf of `leaf_specs(config, quant_config)` must come exactly once, in any order, with its shape and dtype
    (float leaves in `config.param_dtype`, written as "dtype" in config.json; a quantized checkpoint also gets
    `quantization.json`). At most about `batch_bytes` of leaves (or one larger
    leaf) are held before they go to Orbax; `on_leaf(path, nbytes)` runs for each leaf once Orbax has written it.
    `files` are copied into `dst` under their own names. `compression`: zstd on every chunk (Orbax's default; about
    20% smaller for bf16 weights, and about half the write speed on a 2-core host). Call from one process.

    The result appears only when complete: a local `dst` is built in a hidden sibling folder and renamed into place;
    on any error (KeyboardInterrupt included) that folder is removed and `dst` is untouched. An existing `dst`
    raises FileExistsError unless `overwrite`, and is replaced only once the new one is complete. On an object store
    (`gs://...`), where a rename is a copy, `dst` is written in place (an existing one is deleted first) and is
    readable only once config.json, written last, exists.
    """
    dst = epath.Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    files = [epath.Path(f) for f in files]
    names = [f.name for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: extra file to copy into the checkpoint does not exist")
        if f.name in (CONFIG_FILE, PARAMS_DIR, quant.QUANT_FILE) or names.count(f.name) > 1:
            raise ValueError(f"{f}: its name {f.name!r} clashes with another file of the checkpoint")

    def write(work: epath.Path) -> None:
        _write_params(work / PARAMS_DIR, config, leaves, on_leaf, batch_bytes, quant_config, compression)
        for f in files:
            f.copy(work / f.name)
        if quant_config is not None:
            (work / quant.QUANT_FILE).write_text(quant_config.to_json())
        # Last: on an object store a checkpoint counts as complete once config.json exists.
        (work / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2) + "\n")

    write_atomically(dst, write, overwrite=overwrite)


def write_atomically(dst, write: Callable[[epath.Path], None], *, overwrite: bool = False) -> None:
    """Run `write(folder)` so that `dst` appears only when it returns, complete.

    A local `dst` is built in a hidden sibling folder and renamed into place; on any error (KeyboardInterrupt
    included) that folder is removed and `dst` is untouched. An existing `dst` raises FileExistsError unless
    `overwrite`, and is replaced only once the new one is complete. On an object store (`gs://...`), where a rename
    is a copy, `write` works in `dst` itself (an existing one is deleted first).
    """
    dst = epath.Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    remote = "://" in str(dst)
    if remote:
        work = dst
        if dst.exists():
            dst.rmtree()
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    try:
        work.mkdir(parents=remote)
        write(work)
        if not remote:
            _commit(work, dst, overwrite)
    except BaseException:
        if work.exists():
            work.rmtree()
        raise


def _write_params(
    path: epath.Path, config: CwmConfig, leaves, on_leaf, batch_bytes: int, qc=None, compression: bool = True
) -> None:
    expected = leaf_specs(config, qc)
    seen: set[Path] = set()
    batch: list[tuple[Path, np.ndarray]] = []
    size = 0
    ctx = ocp.Context()
    ctx.array.saving.storage_options = ocp.options.ArrayOptions.Saving.StorageOptions(chunk_byte_size=CHUNK_BYTES)
    # One zarr array per leaf instead of OCDBT's shared data files: a checkpoint has only ~580 leaves, and on a 4 GB
    # conversion this saved 1.7x faster (8.8 vs 15.2 s in Orbax) with 0.5 GB less peak RSS, at the same disk size.
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = compression

    def flush():
        nonlocal batch, size
        if not batch:
            return
        with ctx:
            ocp.partial.save(path, _nest(batch))
        done = [(p, a.nbytes) for p, a in batch]
        batch, size = [], 0  # drop the arrays before the callbacks
        _trim_heap()
        for p, nbytes in done:
            if on_leaf is not None:
                on_leaf(p, nbytes)

    for key, value in leaves:
        key = tuple(key)
        value = np.asarray(value)
        if key not in expected:
            raise CheckpointError(
                f"{path}: unexpected leaf {key} for this config (expected e.g. {next(iter(expected))})"
            )
        if key in seen:
            raise CheckpointError(f"{path}: leaf {key} given twice")
        shape, dtype = expected[key]
        if value.shape != shape:
            raise CheckpointError(f"{path}: leaf {key} has shape {value.shape}, the config implies {shape}")
        if str(value.dtype) != dtype:
            raise CheckpointError(f"{path}: leaf {key} is {value.dtype}, expected {dtype}")
        seen.add(key)
        if batch and size + value.nbytes > batch_bytes:
            flush()
        batch.append((key, value))
        size += value.nbytes
        del value
    flush()
    missing = [key for key in expected if key not in seen]
    if missing:
        more = and_more(missing)
        raise CheckpointError(f"{path}: leaf {missing[0]}{more} never given")
    ocp.partial.finalize(path)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _trim_heap() -> None:
    """Return freed heap pages to the OS after a save (glibc).

    Orbax's writer threads free their per-chunk buffers into glibc arenas that keep them: without this, a 4 GB
    conversion peaked 0.5 GB higher (2.92 vs 2.42 GB for a 0.79 GB largest tensor).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _nest(pairs) -> dict:
    tree: dict = {}
    for key, value in pairs:
        _nest_into(tree, key, value)
    return tree


def _nest_into(tree: dict, key: Path, value) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _commit(work: epath.Path, dst: epath.Path, overwrite: bool) -> None:
    """Rename the finished `work` folder to `dst`; an existing `dst` goes aside first and is deleted last."""
    if not dst.exists():
        work.rename(dst)
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
    dst.rename(old)
    try:
        work.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    if old.is_dir():
        old.rmtree()
    else:
        old.unlink()


def read_config(ckpt_dir) -> CwmConfig:
    """The architecture of a converted checkpoint, with `dtype` and `param_dtype` both the stored dtype.

    Raises CheckpointError naming the folder when it is not a converted checkpoint (config.json plus params/).
    """
    ckpt_dir = epath.Path(ckpt_dir)
    config_file = ckpt_dir / CONFIG_FILE
    if not config_file.is_file() or not (ckpt_dir / PARAMS_DIR).is_dir():
        raise CheckpointError(
            f"{ckpt_dir}: not a converted cwm-jax checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/, as written by "
            "cwm_jax.checkpoint.save_streaming); a transformers folder loads with cwm_jax.load_hf or converts first"
        )
    try:
        stored = json.loads(config_file.read_text()).get("dtype")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if stored is None:
        raise CheckpointError(f"{config_file}: no 'dtype' key (the stored parameter dtype)")
    return CwmConfig.from_hf(config_file, dtype=stored, param_dtype=stored)


def _checked_config(ckpt_dir) -> tuple[CwmConfig, epath.Path, QuantConfig | None, dict]:
    """read_config, its quantization and leaf specs, checked against the stored tree (names, shapes, dtypes) from
    Orbax's metadata."""
    config = read_config(ckpt_dir)
    qc = quant.read(ckpt_dir)
    specs = leaf_specs(config, qc)
    params_dir = epath.Path(ckpt_dir) / PARAMS_DIR
    try:
        stored = ocp.metadata(params_dir).metadata
    except Exception as e:  # Orbax raises several error types for a folder it cannot read
        raise CheckpointError(f"{params_dir}: not a readable Orbax checkpoint ({e})") from None
    for key, (shape, dtype) in specs.items():
        node = stored
        for k in key:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            raise CheckpointError(f"{params_dir}: leaf {key} is missing")
        if tuple(node.shape) != tuple(shape) or str(node.dtype) != dtype:
            raise CheckpointError(
                f"{params_dir}: leaf {key} is {node.dtype}{list(node.shape)}, "
                f"{CONFIG_FILE} implies {dtype}{list(shape)}"
            )
    return config, params_dir, qc, specs


def read_ahead(
    pairs: Iterable[tuple[Path, np.ndarray]], max_bytes: int = BATCH_BYTES, sizes: Iterable[int] | None = None
) -> Iterator:
    """The `(key, array)` pairs of `pairs`, produced by a background thread up to `max_bytes` ahead of the consumer.

    Reading the next tensors (disk reads and numpy copies release the GIL) overlaps with the consumer's writes. Bytes
    count from the moment an array is produced until it is freed (its memory's owner is garbage), so a batch still
    being written counts too. The thread pulls the next pair only when the bytes alive stay within `max_bytes` with
    it (its size from `sizes`, the pairs' bytes in order, when given; else while less than `max_bytes` is alive), or
    when the consumer waits for it (then it is the plain sequential order). Host memory stays under `max_bytes`
    (plus one pair without `sizes`) and what the consumer holds anyway. An error in the source is raised here at its
    place in the order; when the consumer stops early the thread stops after its current pair.
    """
    cond = threading.Condition()
    ready: collections.deque = collections.deque()
    state = {"alive": 0, "waiting": False, "stop": False, "done": False, "error": None}

    def release(nbytes: int) -> None:
        with cond:
            state["alive"] -= nbytes
            cond.notify_all()

    def produce() -> None:
        try:
            source = iter(pairs)
            upcoming = iter(sizes) if sizes is not None else None
            while True:
                need = next(upcoming, 0) if upcoming is not None else 1
                with cond:
                    cond.wait_for(
                        lambda need=need: state["stop"] or state["waiting"] or state["alive"] + need <= max_bytes
                    )
                    if state["stop"]:
                        return
                try:
                    key, array = next(source)
                except StopIteration:
                    return
                owner = array
                while isinstance(owner.base, np.ndarray):
                    owner = owner.base
                with cond:
                    state["alive"] += owner.nbytes
                    weakref.finalize(owner, release, owner.nbytes)
                    ready.append((key, array))
                    state["waiting"] = False  # the consumer's wait is over: no more pairs on its account
                    cond.notify_all()
                del key, array, owner
        except BaseException as e:  # handed to the consumer, raised there
            state["error"] = e
        finally:
            with cond:
                state["done"] = True
                cond.notify_all()

    thread = threading.Thread(target=produce, name="cwm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                state["waiting"] = not ready
                cond.notify_all()
                cond.wait_for(lambda: ready or state["done"])
                state["waiting"] = False
                if not ready:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                item = ready.popleft()
            yield item
            del item
    finally:
        with cond:
            state["stop"] = True
            ready.clear()
            cond.notify_all()


def iter_leaves(ckpt_dir, *, batch_bytes: int = BATCH_BYTES) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, numpy array) of every stored leaf (`leaf_specs` order: a quantized weight gives its qvalue and scale
    leaves), reading about `batch_bytes` at a time."""
    _, params_dir, _, specs = _checked_config(ckpt_dir)
    batch: list[tuple[Path, np.ndarray]] = []
    size = 0
    groups = []
    for key, (shape, dtype) in specs.items():
        # np.empty only reserves address space: the abstract leaves tell Orbax to return numpy arrays.
        leaf = np.empty(shape, jnp.dtype(dtype))
        if batch and size + leaf.nbytes > batch_bytes:
            groups.append(batch)
            batch, size = [], 0
        batch.append((key, leaf))
        size += leaf.nbytes
    groups.append(batch)
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    for group in groups:
        with ctx:
            tree = ocp.load(params_dir, _nest(group))
        for key, _ in group:
            node = tree
            for k in key[:-1]:
                node = node[k]
            yield key, node.pop(key[-1])
        del tree
        _trim_heap()


def load(ckpt_dir, mesh=None, dtype=None, **model_kwargs) -> CwmModel:
    """A CwmModel from a converted checkpoint, its parameters restored straight into `mesh`'s shardings.

    `mesh` None puts everything on the default device. `dtype` (default: the stored dtype) sets both the compute and
    the parameter dtype, so a bf16 checkpoint loaded with dtype="float32" gives fp32 parameters. Each leaf is read
    with its target sharding (the stacked parameter's minus the leading layer axis; each process reads only what
    its devices hold), then layers are stacked on device one parameter name at a time, freeing the per-layer arrays
    as they go: device memory peaks near the model plus one stacked parameter. Sharding follows the active rules
    (`cwm_jax.sharding.use_rules`). `model_kwargs` go to CwmModel (attention_impl, block_size, remat).
    A quantized checkpoint (`cwm_jax.quant`) gives a model with its `quant_config`: integer weights and scales keep
    their stored dtypes; `dtype` sets the compute dtype and the float parameters.
    """
    config, params_dir, qc, specs = _checked_config(ckpt_dir)
    target = jnp.dtype(dtype or config.param_dtype)
    config = dataclasses.replace(config, dtype=target.name, param_dtype=target.name)
    L = config.num_layers

    def sharding(spec: PartitionSpec):
        return SingleDeviceSharding(jax.local_devices()[0]) if mesh is None else NamedSharding(mesh, spec)

    top_specs = {name: _spec(TOP_AXES[name], shape, mesh) for name, shape in top_shapes(config).items()}
    layer_specs = {
        name: _spec(("layers", *LAYER_AXES[name]), (L, *shape), mesh) for name, shape in layer_shapes(config).items()
    }
    qnames = () if qc is None else qc.names
    for name in qnames:
        shape = top_shapes(config)[name] if name == "lm_head" else (L, *layer_shapes(config)[name])
        layers = name != "lm_head"
        per = shape[1:] if layers else shape
        scale_axes = (("layers",) if layers else ()) + quant.SCALE_AXES[name]
        scale_shape = ((L,) if layers else ()) + quant.scale_shape(per, quant.N_IN[name], qc)
        (layer_specs if layers else top_specs)[f"{name}_scale"] = _spec(scale_axes, scale_shape, mesh)

    def leaf_spec(key) -> PartitionSpec:
        # (name) or (name, qvalue|scale) at the top; ("layers", i, name[, qvalue|scale]) per layer.
        top = key[0] != "layers"
        name = key[0] if top else key[2]
        part = key[1 if top else 3] if len(key) > (1 if top else 3) else None
        if part == "scale":
            name = f"{name}_scale"
        return top_specs[name] if top else PartitionSpec(*layer_specs[name][1:])

    abstract: dict = {"layers": {}}
    for key, (shape, dtype) in specs.items():
        leaf = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding(leaf_spec(key)))
        _nest_into(abstract, key, leaf)
    canonical = ocp.load(params_dir, abstract)

    def split(node, name):
        """(value, scale or None) of a stored weight; float values are cast to the target dtype by the caller."""
        if name in qnames:
            return node["qvalue"], node["scale"]
        return node, None

    params: dict = {"layers": {}}
    for name in top_shapes(config):
        value, scale = split(canonical.pop(name), name)
        if scale is None:
            params[name] = _cast(value, target, sharding(top_specs[name]))
        else:
            params[name], params[f"{name}_scale"] = value, scale
    for name in layer_shapes(config):
        pairs = [split(canonical["layers"][str(i)].pop(name), name) for i in range(L)]
        values = [v for v, _ in pairs]
        if name in qnames:
            params["layers"][name] = _stack(values, values[0].dtype, sharding(layer_specs[name]))
            scales = [s for _, s in pairs]
            scale_sharding = sharding(layer_specs[f"{name}_scale"])
            params["layers"][f"{name}_scale"] = _stack(scales, scales[0].dtype, scale_sharding)
            values += scales
        else:
            params["layers"][name] = _stack(values, target, sharding(layer_specs[name]))
        for x in values:
            x.delete()
    return hf.model_from_params(config, params, quant_config=qc, **model_kwargs)


def _spec(axes, shape, mesh) -> PartitionSpec:
    return PartitionSpec() if mesh is None else logical_to_spec(axes, shape, mesh)


def _cast(x, dtype, sharding):
    if x.dtype == dtype:
        return x
    return jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)(x)


def _stack(arrays, dtype, sharding):
    @functools.partial(jax.jit, out_shardings=sharding)
    def stack(*xs):
        return jnp.stack(xs).astype(dtype)

    return stack(*arrays)
