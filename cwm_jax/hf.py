"""transformers names <-> the canonical per-layer parameter tree, and loading a transformers checkpoint folder.

The canonical tree is `{"embed", "final_norm", "lm_head", "layers": {"0": {...}, "1": {...}, ...}}` with every leaf
in the model's per-layer layout ([in, out] kernels, heads split out: q [D, N, H], o [N, H, D]). It does not depend
on how the model scans, so checkpoints written in it (the conversion issue) survive any change of scan grouping.
This module is the one place that knows transformers' names; conversion in both directions and the tests use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import ml_dtypes  # also registers numpy's 'bfloat16', which safetensors' numpy reader needs
import numpy as np
from flax import nnx

from cwm_jax.config import CwmConfig
from cwm_jax.model import CwmModel, layer_shapes, top_shapes

# canonical name -> (transformers name, number of leading canonical dims that form the Linear's input; 0 = no
# transpose). PyTorch Linear stores [out, in]; our kernels are [in, out] with heads split out.
TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", 0),
    "final_norm": ("model.norm.weight", 0),
    "lm_head": ("lm_head.weight", 1),
}
LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", 0),
    "q": ("self_attn.q_proj.weight", 1),
    "k": ("self_attn.k_proj.weight", 1),
    "v": ("self_attn.v_proj.weight", 1),
    "o": ("self_attn.o_proj.weight", 2),
    "mlp_norm": ("post_attention_layernorm.weight", 0),
    "gate": ("mlp.gate_proj.weight", 1),
    "up": ("mlp.up_proj.weight", 1),
    "down": ("mlp.down_proj.weight", 1),
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the file and tensor."""


def and_more(names) -> str:
    """' (and N more)' after naming the first of `names` in an error message, '' when it is the only one."""
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def hf_layout(config: CwmConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], int]]:
    """Every transformers tensor name -> (canonical path, transformers shape, canonical shape, input dims)."""
    out = {}

    def add(hf_name, path, shape, n_in):
        hf_shape = shape if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
        out[hf_name] = (path, hf_shape, shape, n_in)

    for name, shape in top_shapes(config).items():
        add(TOP_NAMES[name][0], (name,), shape, TOP_NAMES[name][1])
    for i in range(config.num_layers):
        for name, shape in layer_shapes(config).items():
            hf_suffix, n_in = LAYER_NAMES[name]
            add(f"model.layers.{i}.{hf_suffix}", ("layers", str(i), name), shape, n_in)
    return out


def transpose_2d(a: np.ndarray, tile: int = 256) -> np.ndarray:
    """A contiguous copy of a 2-D array's transpose, tile by tile, bands of rows in parallel threads.

    numpy's strided transpose of a large 2-byte (bf16) matrix runs at ~0.2 GB/s; cache-sized tiles make it ~4x faster,
    which is most of a conversion's CPU time (every kernel is transposed). numpy releases the GIL for the copies of
    its built-in dtypes (bf16 is copied as uint16), so each core takes a band: 0.77 -> 1.47 GB/s on 2 cores.
    """
    out = np.empty(a.shape[::-1], a.dtype)
    bits = f"u{a.dtype.itemsize}"
    src, dst = (x.view(bits) if a.dtype.itemsize in (1, 2, 4, 8) else x for x in (a, out))

    def band(rows: range) -> None:
        for i in rows:
            for j in range(0, a.shape[1], tile):
                dst[j : j + tile, i : i + tile] = src[i : i + tile, j : j + tile].T

    starts = range(0, a.shape[0], tile)
    workers = min(_copy_threads(), len(starts))
    if workers <= 1:
        band(starts)
    else:
        list(_copy_pool().map(band, (starts[k::workers] for k in range(workers))))
    return out


def _copy_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _copy_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_copy_threads(), thread_name_prefix="cwm-transpose")


def canonical_view(array_hf: np.ndarray, canonical_shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """A transformers tensor in the canonical layout without copying: a kernel is a transposed (strided) view.

    For writers that copy anyway (Orbax / TensorStore copy every array into their chunks), this moves the transpose
    into that copy instead of making one more pass over the tensor."""
    if n_in == 0:
        return array_hf.reshape(canonical_shape)
    return np.reshape(array_hf.T, canonical_shape, copy=False)


def from_hf_tensor(array_hf: np.ndarray, canonical_shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """A transformers tensor in the canonical layout (transposed to [in, out], heads split), contiguous."""
    if n_in == 0:
        return array_hf.reshape(canonical_shape)
    return transpose_2d(array_hf).reshape(canonical_shape)


def to_hf_tensor(array: np.ndarray, n_in: int) -> np.ndarray:
    """A canonical leaf back in transformers' layout ([out, in]), contiguous."""
    if n_in == 0:
        return array
    n_inputs = math.prod(array.shape[:n_in])
    return transpose_2d(array.reshape(n_inputs, -1))


def stack_layers(canonical: Mapping) -> dict:
    """Canonical tree -> the model's parameter dict (layers stacked along a leading [L] axis)."""
    layers = canonical["layers"]
    order = [str(i) for i in range(len(layers))]
    if sorted(layers, key=int) != order:
        raise CheckpointError(f"layers must be numbered 0..{len(layers) - 1}, got {sorted(layers, key=int)}")
    names = layers["0"].keys()
    stacked = {name: jnp.stack([jnp.asarray(layers[i][name]) for i in order]) for name in names}
    return {**{k: v for k, v in canonical.items() if k != "layers"}, "layers": stacked}


def unstack_layers(params: Mapping) -> dict:
    """The model's parameter dict -> canonical tree (one leaf per layer and tensor)."""
    stacked = params["layers"]
    num_layers = next(iter(stacked.values())).shape[0]
    layers = {str(i): {name: value[i] for name, value in stacked.items()} for i in range(num_layers)}
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": layers}


def model_params(model: CwmModel) -> dict:
    """The model's parameters as a plain dict of arrays (layers stacked)."""
    return {
        "embed": model.embed[...],
        "final_norm": model.final_norm[...],
        "lm_head": model.lm_head[...],
        "layers": {name: p[...] for name, p in model.layers.items()},
    }


def model_from_params(config: CwmConfig, params: Mapping, **model_kwargs) -> CwmModel:
    """Build a CwmModel around existing parameters (layers stacked), cast to `config.param_dtype`."""
    model = nnx.eval_shape(lambda: CwmModel(config, rngs=nnx.Rngs(0), **model_kwargs))

    def put(variable, value):
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(f"parameter shape {tuple(value.shape)} != model's {tuple(variable.shape)}")
        # The variable's own dtype: config.param_dtype, or a quantized model's integer and scale dtypes.
        variable.set_value(jnp.asarray(value, variable.dtype))

    for name in ("embed", "final_norm", "lm_head", "lm_head_scale"):
        if hasattr(model, name):
            put(getattr(model, name), params[name])
    for name, variable in model.layers.items():
        put(variable, params["layers"][name])
    return model


def hf_state_dict(model: CwmModel) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, numpy array) for every tensor of `model`, one at a time, in transformers' layout."""
    canonical = unstack_layers(model_params(model))
    for hf_name, (path, _, _, n_in) in hf_layout(model.config).items():
        leaf = canonical
        for key in path:
            leaf = leaf[key]
        yield hf_name, to_hf_tensor(np.asarray(jax.device_get(leaf)), n_in)


def safetensors_files(folder: str) -> dict[str, str]:
    """tensor name -> safetensors file path, from `model.safetensors.index.json` or a single `model.safetensors`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return {name: single for name in read_safetensors_header(single)}
    raise CheckpointError(f"{folder}: no model.safetensors.index.json or model.safetensors")


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def read_safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (safetensors dtype, shape, absolute begin offset, nbytes), checked against the file's size.

    Read here rather than through `safetensors.safe_open`, whose mmap makes every byte read count in this process's
    RSS until the file is closed (a 1.5 GB tensor would then count twice). A truncated or corrupt file raises
    CheckpointError naming it.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: shard listed in the index is missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or 8 + length > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out = {}
    end_of_data = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        itemsize = np.dtype(numpy_dtype(SAFETENSORS_DTYPES[dtype])).itemsize if dtype in SAFETENSORS_DTYPES else 0
        if itemsize and end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        out[name] = (dtype, shape, 8 + length + begin, end - begin)
        end_of_data = max(end_of_data, end)
    if 8 + length + end_of_data != size:
        raise CheckpointError(
            f"{path}: file is {size} bytes but its header describes {8 + length + end_of_data} (truncated or corrupt)"
        )
    return out


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """One tensor of a transformers checkpoint, as its safetensors header describes it (nothing read yet)."""

    name: str
    file: str
    path: tuple[str, ...]  # canonical path, e.g. ("layers", "3", "q")
    shape: tuple[int, ...]  # canonical shape
    n_in: int
    dtype: str  # numpy dtype name of the stored tensor
    nbytes: int
    offset: int  # where its bytes start in `file`


def scan_hf_checkpoint(folder: str, config: CwmConfig, dtype: str | None = None) -> list[HfTensor]:
    """Check a transformers checkpoint folder against `config` from the safetensors headers alone.

    Every tensor must be present, expected, of the shape config.json implies and, when `dtype` is given, of that
    dtype. Raises CheckpointError naming the file and tensor; returns the tensors in `hf_layout` order.
    """
    layout = hf_layout(config)
    files = safetensors_files(folder)
    missing = [name for name in layout if name not in files]
    if missing:
        more = and_more(missing)
        raise CheckpointError(f"{folder}: tensor {missing[0]!r}{more} missing from the checkpoint")
    unexpected = sorted(set(files) - set(layout))
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} for this config.json")
    headers = {path: read_safetensors_header(path) for path in sorted(set(files.values()))}
    tensors = []
    for name, (key_path, hf_shape, shape, n_in) in layout.items():
        path = files[name]
        if name not in headers[path]:
            raise CheckpointError(f"{path}: tensor {name!r} listed in the index is not in the file")
        stored_dtype, stored_shape, offset, nbytes = headers[path][name]
        if stored_shape != hf_shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {stored_shape}, config.json implies {hf_shape}")
        if stored_dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {stored_dtype}; expected one of F32, BF16, F16")
        stored_dtype = SAFETENSORS_DTYPES[stored_dtype]
        if dtype is not None and stored_dtype != dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {stored_dtype}, config.json says {dtype}")
        tensors.append(HfTensor(name, path, key_path, shape, n_in, stored_dtype, nbytes, offset))
    return tensors


def numpy_dtype(name: str):
    if name == "bfloat16":
        return ml_dtypes.bfloat16
    if name == "?":
        raise CheckpointError("unsupported safetensors dtype (expected F32, BF16, F16 or F64)")
    return np.dtype(name)


def iter_hf_tensors(tensors: list[HfTensor], views: bool = False) -> Iterator[tuple[HfTensor, np.ndarray]]:
    """Read tensors one at a time (plain reads into one buffer each), each in the canonical layout, contiguous.

    With `views`, kernels come as transposed views of the bytes read (`canonical_view`, no copy) for a consumer that
    copies them anyway."""
    for t in tensors:
        buffer = np.empty(t.nbytes, np.uint8)
        try:
            with open(t.file, "rb", buffering=0) as f:
                f.seek(t.offset)
                got = f.readinto(memoryview(buffer))
        except OSError as e:
            raise CheckpointError(f"{t.file}: cannot read tensor {t.name!r} ({e})") from None
        if got != t.nbytes:
            raise CheckpointError(f"{t.file}: tensor {t.name!r} is truncated ({got} of {t.nbytes} bytes)")
        hf_shape = t.shape if t.n_in == 0 else (math.prod(t.shape[t.n_in :]), math.prod(t.shape[: t.n_in]))
        stored = buffer.view(numpy_dtype(t.dtype)).reshape(hf_shape)
        del buffer  # a transposed copy is a new array: the stored bytes go with `stored`
        array = (canonical_view if views else from_hf_tensor)(stored, t.shape, t.n_in)
        del stored
        yield t, array
        del array


def read_canonical(folder: str, config: CwmConfig) -> dict:
    """Read every tensor of a transformers checkpoint folder into the canonical tree (numpy, checkpoint dtype).

    Raises CheckpointError naming the tensor and file for a missing, unexpected or misshapen tensor.
    """
    canonical: dict = {"layers": {str(i): {} for i in range(config.num_layers)}}
    for t, array in iter_hf_tensors(scan_hf_checkpoint(folder, config)):
        node = canonical
        for key in t.path[:-1]:
            node = node[key]
        node[t.path[-1]] = array
    return canonical


def stored_dtype(folder: str) -> str | None:
    """The dtype config.json declares for the stored tensors ("dtype", or the older "torch_dtype"), if any."""
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    return raw.get("dtype") or raw.get("torch_dtype")


def load_hf(path: str, dtype: str | None = None, param_dtype: str | None = None, **model_kwargs) -> CwmModel:
    """Build a CwmModel from a transformers CWM folder (config.json + one or many safetensors files).

    `param_dtype` defaults to the checkpoint's `dtype` (float32 when absent or unsupported); `dtype` (compute)
    defaults to `param_dtype`. `model_kwargs` go to CwmModel (attention_impl, block_size, remat).
    """
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = CwmConfig.from_hf(folder)
    stored = stored_dtype(folder)
    param_dtype = param_dtype or (stored if stored in ("float32", "bfloat16") else "float32")
    config = dataclasses.replace(config, dtype=dtype or param_dtype, param_dtype=param_dtype)
    return model_from_params(config, stack_layers(read_canonical(folder, config)), **model_kwargs)


NUMPY_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def plan_shards(config: CwmConfig, dtype: str, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the transformers tensors (hf_layout order) into consecutive shards of at most `max_shard_bytes`.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    itemsize = np.dtype(numpy_dtype(dtype)).itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, (_, hf_shape, _, _) in hf_layout(config).items():
        nbytes = math.prod(hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, hf_shape))
        size += nbytes
    return shards


def write_hf_streaming(folder: str, config: CwmConfig, leaves, *, max_shard_bytes: int, on_tensor=None) -> None:
    """Write canonical leaves (hf_layout order, all of one dtype) as sharded safetensors + index into `folder`.

    Streams: each shard's header is computed from the config up front, then tensors are written one at a time, so
    host memory holds one tensor. `folder` must exist; config.json is written by the caller.
    `on_tensor(name, nbytes)` is called after each tensor is written.
    """
    dtype = config.param_dtype
    shards = plan_shards(config, dtype, max_shard_bytes)
    layout = hf_layout(config)
    itemsize = np.dtype(numpy_dtype(dtype)).itemsize
    leaves = iter(leaves)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, hf_shape in shard:
            nbytes = math.prod(hf_shape) * itemsize
            header[name] = {
                "dtype": NUMPY_TO_SAFETENSORS[dtype],
                "shape": list(hf_shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        with open(os.path.join(folder, file), "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, hf_shape in shard:
                path, array = next(leaves)
                if path != layout[name][0]:
                    raise CheckpointError(f"leaf {'/'.join(path)} arrived where {name!r} was expected")
                array = to_hf_tensor(np.asarray(array), layout[name][3])
                if array.dtype != numpy_dtype(dtype) or tuple(array.shape) != hf_shape:
                    raise CheckpointError(
                        f"tensor {name!r} is {array.dtype} {tuple(array.shape)}, expected {dtype} {hf_shape}"
                    )
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # no extra bytes copy
                weight_map[name] = file
                total += array.nbytes
                if on_tensor is not None:
                    on_tensor(name, array.nbytes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
