"""Compile Pallas kernels for TPU without a TPU: abstract devices of a topology from libtpu, ahead-of-time compile.

    compiled = compile_for_tpu(fn, *shape_dtype_structs, generation="v5p")

runs `fn` (a function of arrays, typically one calling `pl.pallas_call`) inside `jax.shard_map` on a one-device mesh
of the generation's smallest topology, lowers and compiles it with Mosaic, and returns the compiled executable (its
`memory_analysis()` and `cost_analysis()` are the compiler's). Needs libtpu (`pip install -e .[tpu]`), not a TPU.
Interpret mode checks a kernel's numbers on the CPU; this checks that its block shapes, memory spaces and layouts are
ones the TPU compiler accepts.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The smallest topology of each generation that libtpu describes; one chip of it is enough for a kernel.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


@functools.cache
def tpu_device(generation: str):
    """One abstract TPU device of `generation` (a key of TOPOLOGIES)."""
    from jax.experimental import topologies

    if generation not in TOPOLOGIES:
        raise ValueError(f"unknown TPU generation {generation!r}; known: {', '.join(TOPOLOGIES)}")
    if not has_libtpu():
        raise RuntimeError("compiling for TPU needs libtpu: pip install -e .[tpu]")
    # Abstract devices hold no TPU: let another process (a test worker, cwm-plan) load libtpu beside this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[generation]).devices[0]


def compile_for_tpu(fn, *args: jax.ShapeDtypeStruct, generation: str = "v5p"):
    """Lower and compile `fn(*args)` for one abstract TPU chip of `generation`, inside `jax.shard_map`."""
    mesh = Mesh(np.array([tpu_device(generation)]), ("x",))
    replicated = NamedSharding(mesh, PartitionSpec())
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args]
    return jax.jit(mapped).lower(*specs).compile()
