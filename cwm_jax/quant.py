"""Weight-only int8 / int4 quantization of CWM's linear layers, on top of qwix's quantized arrays.

A quantized linear weight keeps its canonical shape (`cwm_jax.model.layer_shapes`, e.g. q [D, N, H]) as integer
`qvalue` and carries a `scale` [G, out] over its 2-D view [in, out] (in = the product of the first `n_in` dims, out
= the rest): int8 per output channel (G = 1), int4 in groups of `group_size` along the input (G = in / group_size).
Symmetric absmax quantization, so w ~= qvalue * scale. Which weights: q, k, v, o, gate, up, down of every layer and,
unless `head=False`, the output head; the embedding (a gather, not a matmul) and the norms stay as they are.

qwix does the arithmetic (`qwix.quantize` with channelwise / tiled axes, `qwix.dot_general` with the weight as a
`QArray`, whose dequantization XLA fuses into the matmul's operand: one layer's weight at a time inside the layer
scan, never a dequantized copy of the model). This module adds what qwix's model-level PTQ cannot do for this model:
its providers intercept a module's dot_general calls, while CWM's layers are stacked [L, ...] and applied by one
`lax.scan`, so the quantized tree here is built leaf by leaf (streaming, from a checkpoint), stored in Orbax with a
`quantization.json`, and sliced by the scan like any other parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from cwm_jax.config import ConfigError, CwmConfig

QUANT_FILE = "quantization.json"
# Input dims of each quantizable weight's 2-D view (the rest are output dims), as in `cwm_jax.hf`.
N_IN = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "lm_head": 1}
LAYER_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down")
# Logical axis of the flattened output dim of each weight (its first output axis; sharding the flattened dim over
# that axis splits it exactly as the weight's own sharding does).
SCALE_AXES = {
    "q": (None, "heads"),
    "k": (None, "kv_heads"),
    "v": (None, "kv_heads"),
    "o": (None, "embed"),
    "gate": (None, "mlp"),
    "up": (None, "mlp"),
    "down": (None, "embed"),
    "lm_head": (None, "vocab"),
}
QTYPES = {8: jnp.int8, 4: jnp.int4}
# Source bytes of one weight quantized per `quant.quantize` call: its temporaries are ~8x its input (1.07 GB for a
# 134 MB bf16 weight). Quantizing a checkpoint whose largest tensors (head, embedding) are 537 MB in bf16 peaked at
# 5.44 GB RSS with whole weights and at 1.66 GB with 32 MB slabs, 1.3x faster.
QUANT_SLAB_BYTES = 32 << 20


class QuantError(ConfigError):
    """A quantization request that cannot be met (bits, group size, an already quantized checkpoint)."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """bits 8 or 4; group_size: input-dim group of one scale (None: one scale per output channel; int4 needs a
    group); head: quantize the output head too; scale_dtype: storage dtype of the scales."""

    bits: int = 8
    group_size: int | None = None
    head: bool = True
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.bits not in QTYPES:
            raise QuantError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 1):
            raise QuantError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if self.bits == 4 and self.group_size is None:
            raise QuantError("int4 needs a group size (e.g. 128): one scale per output channel loses too much")
        if jnp.dtype(self.scale_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise QuantError(f"scale_dtype must be bfloat16 or float32, got {self.scale_dtype!r}")

    @property
    def qtype(self):
        return QTYPES[self.bits]

    @property
    def names(self) -> tuple[str, ...]:
        """Quantized parameter names: the layer weights, then "lm_head" when the head is quantized."""
        return LAYER_WEIGHTS + (("lm_head",) if self.head else ())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = QUANT_FILE) -> QuantConfig:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (json.JSONDecodeError, TypeError) as e:
            raise QuantError(f"{source}: not a quantization config ({e})") from None

    def describe(self) -> str:
        group = "per output channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"int{self.bits} ({group}, {'quantized' if self.head else 'unquantized'} head)"


class QWeight(NamedTuple):
    """A quantized weight as the model carries it: integer `qvalue` (canonical shape, maybe stacked over layers)
    and `scale` [..., G, out]. A pytree, so `lax.scan` slices both along the layer axis."""

    qvalue: jax.Array
    scale: jax.Array


def _view(shape, n_in: int) -> tuple[int, int]:
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def scale_shape(shape, n_in: int, qc: QuantConfig) -> tuple[int, int]:
    """[G, out] of the scale of a weight of canonical `shape` (no layer axis)."""
    k, out = _view(shape, n_in)
    return (1 if qc.group_size is None else k // qc.group_size), out


def check_config(config: CwmConfig, qc: QuantConfig) -> None:
    """QuantError naming the first weight whose input width the group size does not divide."""
    from cwm_jax.model import layer_shapes, top_shapes

    if qc.group_size is None:
        return
    shapes = {**layer_shapes(config), "lm_head": top_shapes(config)["lm_head"]}
    for name in qc.names:
        k, _ = _view(shapes[name], N_IN[name])
        if k % qc.group_size:
            raise QuantError(
                f"group_size={qc.group_size} does not divide the input width {k} of weight {name!r} "
                f"(shape {shapes[name]}); use a divisor of {k}"
            )


def quantize(w, name: str, qc: QuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """One weight of canonical shape (no layer axis) -> (qvalue in qc.qtype, same shape; scale [G, out])."""
    shape = tuple(w.shape)
    k, out = _view(shape, N_IN[name])
    if qc.group_size is not None and k % qc.group_size:
        raise QuantError(f"weight {name!r} {shape}: group_size={qc.group_size} does not divide its input width {k}")
    qvalue, scale = _quantize_2d(jnp.asarray(w).reshape(k, out), qc.bits, qc.group_size, qc.scale_dtype)
    return np.asarray(qvalue).reshape(shape), np.asarray(scale)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def _quantize_2d(w_KO, bits: int, group_size: int | None, scale_dtype: str):
    """qwix's absmax calibration in float32, then the codes against the scale as stored: qwix rounds against its
    float32 scale and casts the scale afterwards, which with a bf16 scale moves values up to a whole step; rounding
    against the stored scale keeps every value within half a step of it."""
    tiled = {} if group_size is None else {0: group_size}
    w_KO = w_KO.astype(jnp.float32)
    q = qwix.quantize(w_KO, QTYPES[bits], channelwise_axes=(1,), tiled_axes=tiled, scale_dtype=jnp.float32)
    scale_GO = q.scale.astype(scale_dtype)
    G = scale_GO.shape[0]
    qmax = 2 ** (bits - 1) - 1
    blocks = w_KO.reshape(G, -1, w_KO.shape[1]) / scale_GO.astype(jnp.float32)[:, None]
    codes = jnp.clip(jnp.round(blocks), -qmax - 1, qmax).reshape(w_KO.shape)
    return codes.astype(QTYPES[bits]), scale_GO


def quantize_leaves(leaves: Iterable, qc: QuantConfig) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Canonical leaves -> a quantized checkpoint's: each weight `qc` names (path[-1]: "q", ..., "lm_head") becomes
    its P + ("qvalue",) and P + ("scale",) leaves (`quant.quantize`); the rest pass through unchanged."""
    for path, array in leaves:
        if path[-1] not in qc.names:
            yield path, array
            continue
        qvalue, scale = _quantize_in_slabs(array, path[-1], qc)
        del array
        yield (*path, "qvalue"), qvalue
        yield (*path, "scale"), scale


def _quantize_in_slabs(w: np.ndarray, name: str, qc) -> tuple[np.ndarray, np.ndarray]:
    """`quantize(w, name, qc)`, computed a slab of output columns (about QUANT_SLAB_BYTES of `w`) at a time.

    Columns quantize independently (a scale covers one output column, a group runs along the input), so the result
    is the same; host memory stays near the output plus one slab's temporaries.
    """
    axis = N_IN[name]  # the first output axis
    step = max(1, QUANT_SLAB_BYTES * w.shape[axis] // max(w.nbytes, 1))
    if step >= w.shape[axis]:
        return quantize(w, name, qc)
    qvalue = np.empty(w.shape, jnp.dtype(qc.qtype))
    scale = np.empty(scale_shape(w.shape, axis, qc), jnp.dtype(qc.scale_dtype))
    columns = math.prod(w.shape[axis + 1 :])  # flattened output columns per index along `axis`
    for i in range(0, w.shape[axis], step):
        slab = (slice(None),) * axis + (slice(i, i + step),)
        qvalue[slab], scale[:, i * columns : (i + step) * columns] = quantize(w[slab], name, qc)
    return qvalue, scale


def dequantize(qvalue, scale, n_in: int, dtype=jnp.float32):
    """qvalue * scale back in the canonical shape (for tests and export; the model never does this)."""
    k, out = _view(qvalue.shape, n_in)
    # qwix dequantizes in the scale's dtype: cast it first, so a bf16 scale is not a bf16 product.
    qa = _qarray(jnp.asarray(qvalue).reshape(k, out), jnp.asarray(scale).astype(dtype))
    return qwix.dequantize(qa).reshape(qvalue.shape)


def _qarray(qvalue_2d, scale):
    return qwix.QArray(qvalue=qvalue_2d, scale=scale, zero_point=None, qtype=qvalue_2d.dtype)


def matmul(x_RK, w: QWeight, n_in: int, preferred_element_type=None):
    """x [R, in] @ the quantized weight's 2-D view -> [R, out] (x's dtype unless `preferred_element_type`); qwix
    dequantizes inside the dot (to x's dtype), which XLA fuses into the matmul's operand."""
    k, out = _view(w.qvalue.shape, n_in)
    qa = _qarray(w.qvalue.reshape(k, out), w.scale.astype(x_RK.dtype))
    out_dtype = preferred_element_type or x_RK.dtype
    return qwix.dot_general(x_RK, qa, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)


def weight_bytes(config: CwmConfig, qc: QuantConfig | None, dtype: str = "bfloat16") -> dict[str, int]:
    """Exact bytes of the served parameters: {"quantized" (integer values, int4 packed two per byte as on TPU / GPU),
    "scales", "unquantized" (embedding, norms, an unquantized head, in `dtype`), "total"}."""
    from cwm_jax.model import layer_shapes, top_shapes

    item = jnp.dtype(dtype).itemsize
    shapes = {f"layers.{n}": (config.num_layers, *s) for n, s in layer_shapes(config).items()}
    shapes.update(top_shapes(config))
    out = {"quantized": 0, "scales": 0, "unquantized": 0}
    for key, shape in shapes.items():
        name = key.removeprefix("layers.")
        if qc is None or name not in qc.names:
            out["unquantized"] += math.prod(shape) * item
            continue
        per = shape[1:] if key.startswith("layers.") else shape
        layers = config.num_layers if key.startswith("layers.") else 1
        out["quantized"] += math.prod(shape) * qc.bits // 8
        out["scales"] += layers * math.prod(scale_shape(per, N_IN[name], qc)) * jnp.dtype(qc.scale_dtype).itemsize
    out["total"] = sum(out.values())
    return out


def read(ckpt_dir) -> QuantConfig | None:
    """The quantization of a converted checkpoint folder, or None for a float one."""
    from etils import epath

    path = epath.Path(ckpt_dir) / QUANT_FILE
    if not path.exists():
        return None
    return QuantConfig.from_json(path.read_text(), str(path))


def parse_bits(value) -> QuantConfig | None:
    """None for 16 / "bf16" (no quantization), else a default QuantConfig for 8 or 4 bits (int4 in groups of 128)."""
    if str(value).lower() in ("16", "bf16", "bfloat16", "none"):
        return None
    bits = int(value)
    return QuantConfig(bits=bits, group_size=128 if bits == 4 else None)


__all__ = [
    "QUANT_FILE",
    "QuantConfig",
    "QuantError",
    "QWeight",
    "check_config",
    "dequantize",
    "matmul",
    "quantize",
    "quantize_leaves",
    "read",
    "scale_shape",
    "weight_bytes",
]
