"""Decode speed of int8 and int4 weights against bf16 on the same tiny CWM, and the 32B model's serving memory.

Builds a random CWM-shaped model (hidden 512, 8 layers [the release's global / local pattern], 8 heads / 2 KV heads,
head_dim 64, MLP 1536, vocab 8192, window 256; every width a multiple of 128), saves it as a bf16 converted
checkpoint, quantizes it with `cwm-convert quantize` to int8 (per output channel) and int4 (groups of 128), loads all
three with `cwm_jax.load` and times greedy `generate` from `--prompt-len`-token prompts at each batch size: the wall
clock of a whole call (prefill + `--new-tokens` decode steps, no stop ids, so every call makes exactly that many
tokens), best of `--repeats` after one untimed warm-up call that pays the compile. Compute is bf16 throughout; on
a GPU it runs the same.
Then the 32B memory table (`cwm_jax.serving`, GB = 1e9 bytes): weights at bf16, int8, int4 with an int4 head and int4
with a bf16 head, and the longest context that fits with ring-buffer KV caches on one 32, 40 and 80 GB device.
`--calibrate` also compiles the 32B `prefill` and `decode` ahead of time for one TPU chip (needs libtpu, no TPU;
about 5 minutes) and prints XLA's peak beside `serving_bytes` (the table in `cwm_jax/serving.py`).

    python benchmarks/quant.py [--batch 1 8] [--new-tokens 128] [--prompt-len 32] [--repeats 3] [--calibrate]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np
from common import environment, write_json
from generate import best_of

DEVICE_GB = (32, 40, 80)
WIDTHS = {"bf16": None, "int8": dict(bits=8), "int4": dict(bits=4, group_size=128)}
# (bits, group, head, context, batch, step, TPU topology): the compiled cases of cwm_jax/serving.py's table.
CALIBRATION = [
    (16, None, True, 8192, 1, "prefill", "v5p:1x1x1"),
    (16, None, True, 8192, 1, "decode", "v5p:1x1x1"),
    (16, None, True, 32768, 1, "prefill", "v5p:1x1x1"),
    (8, None, True, 8192, 1, "prefill", "v5p:1x1x1"),
    (8, None, True, 32768, 1, "prefill", "v5p:1x1x1"),
    (8, None, True, 32768, 1, "decode", "v5p:1x1x1"),
    (8, None, True, 131072, 1, "prefill", "v5p:1x1x1"),
    (8, None, True, 16384, 4, "prefill", "v5p:1x1x1"),
    (4, 128, True, 16384, 1, "prefill", "v6e:1x1"),
    (4, 128, True, 16384, 1, "decode", "v6e:1x1"),
]


def bench_config():
    from cwm_jax.config import cwm_tiny

    return cwm_tiny(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=1536,
        sliding_window=256,
        max_position_embeddings=2048,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def load_models(folder: str) -> dict:
    """{"bf16": model, "int8": model, "int4": model}: one random model, saved, quantized and loaded back."""
    from flax import nnx

    import cwm_jax
    from cwm_jax import checkpoint, quant
    from cwm_jax.convert.cli import quantize

    config = bench_config()
    src = os.path.join(folder, "bf16")
    checkpoint.save_streaming(src, config, checkpoint.model_leaves(cwm_jax.CwmModel(config, rngs=nnx.Rngs(0))))
    models = {}
    for name, fields in WIDTHS.items():
        path = src
        if fields is not None:
            path = os.path.join(folder, name)
            quantize(src, path, quant.QuantConfig(**fields), quiet=True)
        models[name] = cwm_jax.load(path)
    return models


def measure(batches, new_tokens: int, prompt_len: int, repeats: int) -> list[dict]:
    """One row per width and batch size: best seconds, tokens/s, the first (compiling) call, and the ratio to bf16."""
    from cwm_jax.generate import generate

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        models = load_models(folder)

    def run(model, prompts):
        return generate(model, prompts, new_tokens, stop_ids=[])  # no stop ids: exactly new_tokens each

    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(3, bench_config().vocab_size, (batch, prompt_len)).tolist()
        base = None
        for name, model in models.items():
            first, best, out = best_of(repeats, run, model, prompts)
            assert all(len(o) == new_tokens for o in out), [len(o) for o in out]
            tok_s = batch * new_tokens / best
            base = base or tok_s
            rows.append(
                {
                    "width": name,
                    "batch": batch,
                    "s": best,
                    "tok_s": tok_s,
                    "vs_bf16": tok_s / base,
                    "first_call_s": first,
                }
            )
    return rows


def memory_rows() -> list[dict]:
    """The 32B model's weights and longest context per device size, per width (int4 with and without its head)."""
    from cwm_jax import quant, serving
    from cwm_jax.config import cwm_32b

    config = cwm_32b()
    widths = {
        "bf16": None,
        "int8": quant.QuantConfig(bits=8),
        "int4 (int4 head)": quant.QuantConfig(bits=4, group_size=128),
        "int4 (bf16 head)": quant.QuantConfig(bits=4, group_size=128, head=False),
    }
    rows = []
    for name, qc in widths.items():
        row = {"width": name, "weights_gb": quant.weight_bytes(config, qc)["total"] / serving.GB}
        for gb in DEVICE_GB:
            row[f"context_{gb}gb"] = serving.max_context(config, qc, gb * serving.GB)
        rows.append(row)
    return rows


def compiled_peak(config, qc, context: int, batch: int, step: str, topology: str) -> int:
    """XLA's peak bytes (arguments + outputs + temporaries - aliased) of generate's `prefill` (a prompt of context -
    768 tokens) or `decode` (16 steps) for `config` quantized by `qc`, compiled for one chip of a TPU `topology`."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import NamedSharding

    from cwm_jax import generate as gen
    from cwm_jax import serving, sharding
    from cwm_jax.model import CwmModel

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chips_per_host_bounds=[1, 1, 1])
    mesh = sharding.make_mesh(fsdp=1, tensor=1, devices=desc.devices)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CwmModel(config, quant_config=qc, rngs=nnx.Rngs(0))))
    state = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        abstract,
        sharding.param_shardings(abstract, mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

    def abstract_cache(x, axes):
        spec = sharding.logical_to_spec(axes, x.shape, mesh)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    with jax.set_mesh(mesh):
        cache = jax.tree.map(
            abstract_cache,
            jax.eval_shape(lambda: gen.init_cache(config, batch, context)),
            gen.KVCache(*([gen.CACHE_AXES] * 4), ("act_batch", None)),
            is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
        )
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        if step == "prefill":

            def prefill(state, tokens, lengths, cache):
                return gen.prefill(nnx.merge(graphdef, state), tokens, lengths, cache, chunk=serving.PREFILL_CHUNK)

            prompt = jax.ShapeDtypeStruct((batch, context - 768), jnp.int32)
            lowered = jax.jit(prefill).lower(state, prompt, lengths, cache)
        else:

            def decode(state, logits, lengths, cache, key):
                return gen.decode(nnx.merge(graphdef, state), logits, lengths, cache, key, max_new_tokens=16)

            logits = jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32)
            key = jax.eval_shape(lambda: jax.random.key(0))
            lowered = jax.jit(decode).lower(state, logits, lengths, cache, key)
        mem = lowered.compile().memory_analysis()
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def calibrate() -> list[dict]:
    """The CALIBRATION cases: XLA's compiled peak beside serving_bytes' total, in GB."""
    from cwm_jax import quant, serving
    from cwm_jax.config import cwm_32b

    config = cwm_32b()
    rows = []
    for bits, group, head, context, batch, step, topology in CALIBRATION:
        qc = None if bits == 16 else quant.QuantConfig(bits=bits, group_size=group, head=head)
        peak = compiled_peak(config, qc, context, batch, step, topology)
        total = serving.serving_bytes(config, qc, context, batch)["total"]
        width = "bf16" if qc is None else f"int{bits}"
        rows.append(
            {
                "width": width,
                "context": context,
                "batch": batch,
                "step": step,
                "topology": topology,
                "peak_gb": peak / serving.GB,
                "estimate_gb": total / serving.GB,
            }
        )
        print(f"  compiled {step} {width} S {context} B {batch} on {topology}", flush=True)
    return rows


def main(argv=None) -> int:
    """Measure, print the ratios and the tables; optionally write JSON. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the best is kept")
    parser.add_argument("--calibrate", action="store_true", help="compile the 32B steps for a TPU chip (libtpu)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1:
        print("error: want positive --batch, --new-tokens, --prompt-len, --repeats", file=sys.stderr)
        return 2
    if args.prompt_len + args.new_tokens > bench_config().max_position_embeddings:
        print(f"error: --prompt-len + --new-tokens exceed {bench_config().max_position_embeddings}", file=sys.stderr)
        return 2

    rows = measure(args.batch, args.new_tokens, args.prompt_len, args.repeats)
    env = environment()
    ratios = "; ".join(
        f"batch {b}: "
        + ", ".join(f"{r['width']} {r['vs_bf16']:.2f}x" for r in rows if r["batch"] == b and r["width"] != "bf16")
        for b in args.batch
    )
    print(f"decode tokens/s against bf16 on {env['device']} ({env['backend']}): {ratios}")
    c = bench_config()
    print(
        f"\nrandom CWM-shaped model: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} / {c.num_kv_heads} "
        f"heads x {c.head_dim}, MLP {c.intermediate_size}, vocab {c.vocab_size}; bf16 compute; "
        f"{args.new_tokens} new tokens from {args.prompt_len}-token prompts, greedy, best of {args.repeats}"
    )
    print("\n| width | batch | tok/s | vs bf16 | s | first call s |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['width']} | {r['batch']} | {r['tok_s']:.0f} | {r['vs_bf16']:.2f} | {r['s']:.3f} "
            f"| {r['first_call_s']:.2f} |"
        )
    memory = memory_rows()
    print(
        "\ncwm_32b(): weights and the longest context that fits one device (ring-buffer KV caches, batch 1, GB = 1e9)\n"
    )
    head = " | ".join(f"context on {gb} GB" for gb in DEVICE_GB)
    print(f"| width | weights GB | {head} |\n|---|---:|" + "---:|" * len(DEVICE_GB))
    for r in memory:
        contexts = " | ".join(f"{r[f'context_{gb}gb']:,}" for gb in DEVICE_GB)
        print(f"| {r['width']} | {r['weights_gb']:.2f} | {contexts} |")
    calibration = None
    if args.calibrate:
        print("\ncompiling the 32B prefill and decode for one TPU chip ...", flush=True)
        calibration = calibrate()
        print("\n| width | context | batch | step | topology | XLA peak GB | serving_bytes GB | estimate / peak |")
        print("|---|---:|---:|---|---|---:|---:|---:|")
        for r in calibration:
            print(
                f"| {r['width']} | {r['context']} | {r['batch']} | {r['step']} | {r['topology']} | {r['peak_gb']:.2f} "
                f"| {r['estimate_gb']:.2f} | {r['estimate_gb'] / r['peak_gb']:.2f} |"
            )

    if args.json:
        result = {
            "benchmark": "quant",
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "repeats": args.repeats,
            "model": dataclasses.asdict(c),
            **env,
            "rows": rows,
            "memory_32b": memory,
            "calibration": calibration,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
