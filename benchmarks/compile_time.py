"""Compile time of the tiny CWM's forward and loss gradient at two depths (the scanned layers should make it flat).

Each measurement is the wall clock of `jax.jit(f).lower(...).compile()` on abstract inputs (nothing executes), best of
`--repeats` fresh compiles after one untimed warm-up; JAX's caches are cleared and a new function object is traced
before every compile.

    python benchmarks/compile_time.py [--depths 8 64] [--seq-len 256] [--batch 2] [--repeats 3] [--json PATH]

Shapes: B batch, T positions, V vocab.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from common import environment, write_json
from flax import nnx

from cwm_jax.config import cwm_tiny, release_layer_types
from cwm_jax.model import CwmModel


def abstract_model(depth: int):
    """(graphdef, abstract params state) of the tiny model at `depth` layers; no parameter is materialised."""
    config = cwm_tiny(num_layers=depth, layer_types=release_layer_types(depth))
    model = nnx.eval_shape(lambda: CwmModel(config, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def make_forward(graphdef):
    """A fresh forward function (params, tokens [B, T]) -> fp32 logits [B, T, V]."""

    def forward(params, tokens_BT):
        return nnx.merge(graphdef, params)(tokens_BT)

    return forward


def make_grad(graphdef):
    """A fresh function (params, tokens [B, T], targets [B, T]) -> (mean cross-entropy, its gradient w.r.t. params)."""

    def loss(params, tokens_BT, targets_BT):
        logits_BTV = nnx.merge(graphdef, params)(tokens_BT)
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1))

    return jax.value_and_grad(loss)


def compile_seconds(fn, args) -> float:
    """Wall-clock seconds of trace + lower + compile of `fn`, from cleared caches (so nothing is reused)."""
    jax.clear_caches()
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def measure(depths, seq_len: int, batch: int, repeats: int) -> list[dict]:
    """One row per depth: {"depth", "forward_s", "grad_s"}, each the best of `repeats` fresh compiles."""
    tokens_BT = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    models = {depth: abstract_model(depth) for depth in depths}
    cases = {
        "forward_s": lambda graphdef, params: (make_forward(graphdef), (params, tokens_BT)),
        "grad_s": lambda graphdef, params: (make_grad(graphdef), (params, tokens_BT, tokens_BT)),
    }
    # The first compile in a process pays one-time backend and LLVM set-up; keep it out of every measurement.
    for case in cases.values():
        compile_seconds(*case(*models[depths[0]]))
    best = {(depth, key): float("inf") for depth in depths for key in cases}
    # Repeats are the outer loop so a burst of load on a shared machine hits every depth alike, not one of them.
    for _ in range(repeats):
        for depth in depths:
            for key, case in cases.items():
                best[depth, key] = min(best[depth, key], compile_seconds(*case(*models[depth])))
    return [{"depth": depth, **{key: best[depth, key] for key in cases}} for depth in depths]


def main(argv=None) -> int:
    """Measure, print the ratios (last / first depth) and the table; optionally write JSON. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 64], help="layer counts (first is the baseline)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh compiles per measurement; the best is kept")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if len(args.depths) < 2 or min(args.depths) < 1 or args.seq_len < 1 or args.batch < 1 or args.repeats < 1:
        print("error: want at least two --depths >= 1 and positive --seq-len, --batch, --repeats", file=sys.stderr)
        return 2

    rows = measure(args.depths, args.seq_len, args.batch, args.repeats)
    base, deep = rows[0], rows[-1]
    ratios = {key: deep[key] / base[key] for key in ("forward_s", "grad_s")}
    name = f"{deep['depth']}/{base['depth']}"
    print(f"ratio {name} layers: forward {ratios['forward_s']:.2f}x, grad {ratios['grad_s']:.2f}x")
    print("\n| depth | forward s | grad s |\n|---:|---:|---:|")
    for row in rows:
        print(f"| {row['depth']} | {row['forward_s']:.2f} | {row['grad_s']:.2f} |")

    if args.json:
        result = {
            "benchmark": "compile_time",
            "seq_len": args.seq_len,
            "batch": args.batch,
            "repeats": args.repeats,
            **environment(),
            "rows": rows,
            "ratios": {name: ratios},
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
