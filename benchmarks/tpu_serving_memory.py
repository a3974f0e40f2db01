"""Does the 32B model serve on a TPU slice? Compile its decode step ahead of time for a TPU topology and read the
compiler's memory analysis per chip, on a CPU host (needs libtpu: `pip install "jax[tpu]==<installed jax>"`).

    python benchmarks/tpu_serving_memory.py [--topology v5e:2x4] [--context 131072] [--batch 1] [--tensor 8]

Parameters are bf16 and sharded by the project's rules (heads, KV heads, MLP and vocab over `tensor`); the KV cache is
the ring-buffer cache of `cwm_jax.generate` (full context on the 17 global layers, W slots on the local ones), sharded
over KV heads. The step is one new token per sequence against a full cache, with the cache donated.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding

from cwm_jax import generate as gen
from cwm_jax import sharding
from cwm_jax.config import cwm_32b
from cwm_jax.model import CwmModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x4", help="TPU topology name, e.g. v5e:2x4, v5p:2x2x1, v6e:2x4")
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=8, help="tensor-parallel width (the rest of the chips: fsdp)")
    args = parser.parse_args(argv)

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = sharding.make_mesh(fsdp=-1, tensor=args.tensor, devices=devices)
    config = cwm_32b()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: CwmModel(config, rngs=nnx.Rngs(0))))
    param_shardings = sharding.param_shardings(abstract_state, mesh)
    state = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        abstract_state,
        param_shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    cache_shape = jax.eval_shape(lambda: gen.init_cache(config, args.batch, args.context))

    with jax.set_mesh(mesh):
        cache_specs = jax.tree.map(
            lambda x, axes: NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh)),
            cache_shape,
            gen.KVCache(*([gen.CACHE_AXES] * 4), ("act_batch", None)),
            is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
        )
        cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache_shape, cache_specs)
        tokens = jax.ShapeDtypeStruct((args.batch, 1), jnp.int32)

        def step(state, tokens_B1, positions_B1, cache):
            model = nnx.merge(graphdef, state)
            logits_B1V, cache = gen.forward_cached(model, tokens_B1, positions_B1, cache)
            return jnp.argmax(logits_B1V[:, -1], axis=-1), cache

        compiled = jax.jit(step, donate_argnums=3).lower(state, tokens, tokens, cache).compile()
    mem = compiled.memory_analysis()
    gib = 2**30
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / len(devices) / gib
    cache_gib = gen.kv_cache_bytes(config, args.context, args.batch) / gib
    print(
        f"{args.topology} ({len(devices)} chips, mesh {dict(mesh.shape)}), 32B bf16, batch {args.batch}, "
        f"context {args.context}"
    )
    print(
        f"per chip: arguments {mem.argument_size_in_bytes / gib:.2f} GiB (params ~{params:.2f}, whole cache "
        f"{cache_gib:.2f} GiB over the tensor axis), temporaries {mem.temp_size_in_bytes / gib:.2f} GiB, "
        f"outputs {mem.output_size_in_bytes / gib:.2f} GiB, aliased {mem.alias_size_in_bytes / gib:.2f} GiB"
    )
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    print(f"peak per chip (arguments + temporaries + outputs - aliased): {total / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
