"""Logical-axis sharding: rules from logical names to mesh axes, the mesh helper, sharded initialisation.

Every parameter carries logical axes (`logical_axes` metadata: `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `layers`); activations are constrained with `act_*` names. One rules table maps both to the mesh axes
`data`, `fsdp`, `tensor`, `sequence`. A mesh axis that does not divide a dimension is dropped for that dimension
(replicated), so a 2-KV-head tiny model still runs on tensor=4.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP shards the embed dimension of every weight; tensor parallelism shards heads, MLP width and vocab.
DEFAULT_RULES: Rules = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_active_rules: list[Rules] = [DEFAULT_RULES]


@contextlib.contextmanager
def use_rules(rules: Rules):
    """Use `rules` for activation constraints (and as the default for shardings) inside the block.

    `constrain` reads the rules when a function is traced: a jitted function already traced (and cached by JAX)
    keeps the rules it was traced with, so enter this block before the first call of the function it should affect.
    """
    _active_rules.append(tuple(rules))
    try:
        yield
    finally:
        _active_rules.pop()


def current_rules() -> Rules:
    return _active_rules[-1]


def resolve_axis_sizes(sizes: dict[str, int], device_count: int, prefix: str = "") -> dict[str, int]:
    """Mesh axis sizes with the one -1 ("the rest of the devices") resolved; ValueError naming `{prefix}{axis}` when
    they are not positive integers or -1 or do not fill exactly `device_count` devices."""
    sizes = dict(sizes)
    for axis, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v == 0 or v < -1:
            raise ValueError(f"{prefix}{axis} must be a positive integer or -1, got {v!r}")
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1 ('the rest'), got {', '.join(prefix + a for a in free)}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if device_count % known:
            raise ValueError(
                f"{prefix}{free[0]}=-1 cannot fill {device_count} devices: the other axes' product {known} does not "
                "divide it"
            )
        sizes[free[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        shown = " x ".join(f"{prefix}{a}={v}" for a, v in sizes.items())
        raise ValueError(f"{shown} needs {math.prod(sizes.values())} devices, but there are {device_count}")
    return sizes


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1, *, devices: Sequence | None = None
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, sequence); one size may be -1, meaning "the rest of the devices"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _mesh_axis_sizes(mesh, kinds: tuple[AxisType, ...] = (AxisType.Auto, AxisType.Explicit)) -> dict[str, int]:
    """Sizes of the axes of `mesh` (a Mesh or an AbstractMesh) whose type is one of `kinds`."""
    types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
    return {
        name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, types, strict=True) if kind in kinds
    }


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None, rules: Rules | None = None
) -> PartitionSpec:
    """PartitionSpec for logical axes (`None` entries stay replicated); KeyError for a logical axis with no rule.

    A mesh axis is used at most once per spec (the first dimension that asks for it gets it). With `mesh`, axes the
    mesh lacks (or holds as Manual, inside shard_map) are dropped; with `shape` too, so is an axis whose size, times
    that of the axes already kept for the dimension, does not divide the dimension (so ("data", "fsdp") may keep
    only one of them).
    """
    return _spec(logical_axes, shape, None if mesh is None else _mesh_axis_sizes(mesh), rules)


def _spec(logical_axes, shape, sizes: dict[str, int] | None, rules: Rules | None) -> PartitionSpec:
    table = dict(current_rules() if rules is None else rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match the rank of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if sizes is not None:
                if axis not in sizes:
                    continue
                if shape is not None and shape[i] % (sizes[axis] * math.prod(sizes[a] for a in kept)):
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def constrain(x, logical_axes: Sequence[str | None]):
    """Constrain an activation's sharding under the current mesh (`jax.set_mesh`); a no-op without one.

    Uses the active rules (`use_rules`) and drops mesh axes that do not divide a dimension, so any batch size or
    head count compiles on any mesh. Only Auto mesh axes are constrained: Manual ones (inside shard_map) cannot be,
    and Explicit ones already fix the sharding in the array's type.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    sizes = _mesh_axis_sizes(mesh, (AxisType.Auto,))
    if not sizes:
        return x
    return jax.lax.with_sharding_constraint(x, _spec(logical_axes, x.shape, sizes, None))


def param_specs(tree, mesh=None, rules: Rules | None = None):
    """PartitionSpecs for a tree of `nnx.Variable`s (a model's state, or an abstract one) from `logical_axes`.

    A Variable without `logical_axes` (and any leaf that is not a Variable) is replicated.
    """

    def spec(v):
        if not isinstance(v, nnx.Variable):
            return PartitionSpec()
        axes = v.get_metadata().get("logical_axes")
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(axes, v.shape, mesh, rules)

    return jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(tree, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings for a tree of `nnx.Variable`s on `mesh`."""
    specs = param_specs(tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(make_model, mesh: Mesh, rules: Rules | None = None):
    """Build `make_model()` (an NNX module factory) with each parameter created directly in its shard on `mesh`.

    The model is traced abstractly first, then initialised under `jax.jit` with the parameters' shardings as
    outputs: no host or single device ever holds the whole model. Random values never depend on the sharding, so
    the same seed gives bit-identical parameters on any mesh, equal to those of a jitted `nnx.state(make_model())`
    on one device; with `jax_threefry_partitionable` (JAX's default) the random bits are also generated shard by
    shard. Against an eager (un-jitted) `make_model()` they may differ in the last bit: under jit XLA folds
    `normal(key) * stddev` into one multiply (reassociating sqrt(2) * stddev), which op-by-op dispatch cannot.
    """
    if not getattr(jax.config, "jax_threefry_partitionable", True):
        warnings.warn(
            "jax_threefry_partitionable is off: XLA may generate each random parameter whole on every device",
            stacklevel=2,
        )
    graphdef, init = _sharded_init(make_model, mesh, rules)
    with jax.set_mesh(mesh), use_rules(current_rules() if rules is None else rules):
        state = init()
    return nnx.merge(graphdef, state)


def _sharded_init(make_model, mesh: Mesh, rules: Rules | None = None):
    """The model's graphdef and a jitted function creating its state in shards (call it under `jax.set_mesh`)."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = param_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(make_model())

    return graphdef, jax.jit(init, out_shardings=shardings)
