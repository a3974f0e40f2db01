"""Block / warp / stage sweep of the Triton flash kernel on a GPU (T 8192 causal, 48/8 heads, H 128, bf16).

    python benchmarks/gpu_sweep.py [--smoke]
Prints ms of the forward and forward+backward per configuration (median of 5 after a warm call).
"""

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from cwm_jax.kernels import flash_gpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    B, T, N, K, H = (1, 64, 4, 2, 16) if args.smoke else (1, 8192, 48, 8, 128)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(x, (B, T, K, H), jnp.bfloat16) for x in keys[1:])
    grid = [(32, 32, 4, 2)] if args.smoke else list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
    for bq, bk, warps, stages in grid:
        kw = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages, interpret=args.smoke)
        fwd = jax.jit(lambda q, k, v, kw=kw: flash_gpu.flash_attention(q, k, v, **kw))
        fb = jax.jit(jax.grad(lambda q, k, v, kw=kw: flash_gpu.flash_attention(q, k, v, **kw).sum(), (0, 1, 2)))
        row = []
        for f in (fwd, fb):
            try:
                jax.block_until_ready(f(q, k, v))
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    jax.block_until_ready(f(q, k, v))
                    ts.append(time.perf_counter() - t)
                row.append(f"{statistics.median(ts) * 1e3:8.2f}")
            except Exception as e:  # noqa: BLE001  (a configuration Triton rejects: report and go on)
                row.append(f"fail {type(e).__name__}")
        print(f"bq {bq:4d} bk {bk:4d} warps {warps} stages {stages}: fwd {row[0]} ms  fwd+bwd {row[1]} ms", flush=True)


if __name__ == "__main__":
    main()
