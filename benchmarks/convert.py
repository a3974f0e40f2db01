"""Conversion throughput and host memory: cwm-convert against the raw read speed of the same files, in one run.

Builds a synthetic CWM-shaped transformers checkpoint (the release's vocab, head_dim and GQA ratio at half width,
bf16, sharded like the release), reads every byte of it once (the raw read speed) and copies it with `cp -r` (a
floor for anything that reads and writes every byte), then runs `cwm-convert hf-to-orbax` (zstd, and
`--compression none`) and `cwm-convert orbax-to-hf` in subprocesses and reports GB/s over the conversion (the
command's own timing, from its summary line) and over the subprocess's wall time (with Python and JAX start-up), the
ratio to the raw read, and each conversion's peak RSS over the largest tensor. Targets (conversion issue): throughput
at least half the raw read speed; peak RSS under 2x the largest tensor + 1 GB. Every read starts from a cold page
cache.

    python benchmarks/convert.py [--size-gb 4] [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import write_json


def synthetic_config(size_gb: float):
    """A CWM-shaped config (vocab 128256, head_dim 128, 6:1 GQA, release layer pattern) of about `size_gb` in bf16."""
    from cwm_jax.config import cwm_32b, param_count, release_layer_types

    base = dict(hidden_size=3072, num_heads=24, num_kv_heads=4, intermediate_size=10752)
    one = cwm_32b(num_layers=1, layer_types=release_layer_types(1), **base)
    two = cwm_32b(num_layers=2, layer_types=release_layer_types(2), **base)
    per_layer = param_count(two) - param_count(one)
    fixed = param_count(one) - per_layer
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return cwm_32b(num_layers=layers, layer_types=release_layer_types(layers), **base)


def write_synthetic(folder: str, config, shard_bytes: int) -> int:
    """Random bf16 weights as sharded safetensors + index + config.json; returns the largest tensor's bytes."""
    import ml_dtypes

    from cwm_jax import hf

    rng = np.random.default_rng(0)
    largest = 0

    def leaves():
        nonlocal largest
        for path, _, shape, _ in hf.hf_layout(config).values():
            array = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            largest = max(largest, array.nbytes)
            yield path, array

    hf.write_hf_streaming(folder, config, leaves(), max_shard_bytes=shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return largest


def evict(folder: str) -> None:
    """Drop a folder's files from the page cache, so reads come from the disk (clean pages only: sync first)."""
    os.sync()
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: str) -> int:
    """Bytes of every file under `folder` (a checkpoint's size on disk, before block rounding)."""
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)


def raw_read(folder: str) -> tuple[int, float]:
    """Read every byte of the folder's safetensors files once; returns (bytes, seconds)."""
    buffer = bytearray(64 << 20)
    total = 0
    start = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    total += n
    return total, time.perf_counter() - start


def copy_tree(src: str, dst: str) -> float:
    """`cp -r src dst` and a sync (the written bytes reach the disk, as Orbax's fsyncs make them); returns seconds."""
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", src, dst], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst, ignore_errors=True)
    return seconds


def run_convert(args: list[str]) -> tuple[float, float, int]:
    """Run `python -m cwm_jax.convert ARGS` in a subprocess; returns (wall seconds, the conversion's own seconds,
    its peak RSS in bytes).

    The conversion's seconds and peak come from the summary line the command prints (its own clock from the first
    read to the committed output, its own VmHWM): the rusage of a child also counts what this process held when it
    forked.
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cwm_jax.convert", *args, "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cwm-convert {' '.join(args)} failed: {proc.stderr.strip()}")
    print(proc.stdout.strip())
    peak_gb = float(re.search(r"peak RSS ([0-9.]+) GB", proc.stdout).group(1))
    own = float(re.search(r" GB in ([0-9.]+) s", proc.stdout).group(1))
    return seconds, own, int(peak_gb * 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="synthetic checkpoint size in GB (bf16)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="safetensors shard size of the source")
    parser.add_argument("--workdir", help="where to build (default: a temporary folder, removed at the end)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="cwm-bench-convert-")
    os.makedirs(work, exist_ok=True)
    src, orbax_dst, hf_dst = (os.path.join(work, n) for n in ("hf", "orbax", "hf-back"))
    try:
        config = synthetic_config(args.size_gb)
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        print(f"building a {config.num_layers}-layer CWM-shaped checkpoint of ~{args.size_gb:g} GB in {src} ...")
        largest = write_synthetic(src, config, int(args.shard_gb * 1e9))
        files = sum(name.endswith(".safetensors") for name in os.listdir(src))
        # Every measurement starts from a cold page cache: the source is read from the disk each time.
        evict(src)
        nbytes, read_s = raw_read(src)
        evict(src)
        copy_s = copy_tree(src, os.path.join(work, "copy"))
        rows, stored = [], {}
        for name, extra in (("hf-to-orbax --compression none", ["--compression", "none"]), ("hf-to-orbax", [])):
            evict(src)
            rows.append((name, *run_convert(["hf-to-orbax", src, orbax_dst, "--overwrite", *extra])))
            stored[name] = folder_bytes(orbax_dst)
        evict(orbax_dst)
        rows.append(("orbax-to-hf", *run_convert(["orbax-to-hf", orbax_dst, hf_dst, "--overwrite"])))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    raw_gbs = nbytes / read_s / 1e9
    copy_gbs = nbytes / copy_s / 1e9
    budget = 2 * largest + 1e9
    results = {
        "bytes": nbytes,
        "orbax_bytes": stored,
        "largest_tensor_bytes": largest,
        "raw_read_gb_s": raw_gbs,
        "copy_gb_s": copy_gbs,
        "layers": config.num_layers,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        "runs": {},
    }
    print(
        f"\n{nbytes / 1e9:.2f} GB in {files} files; largest tensor {largest / 1e9:.2f} GB; "
        f"raw read {raw_gbs:.2f} GB/s (cold page cache); cp -r + sync {copy_gbs:.2f} GB/s "
        f"({copy_gbs / raw_gbs:.2f} of the raw read)"
    )
    print(
        f"{'command':<31} {'GB/s / raw':>10} {'GB/s / cp':>9} {'RSS / largest':>13} {'GB/s':>6} {'s':>6} "
        f"{'wall GB/s':>9} {'wall s':>6} {'peak RSS GB':>11}  speed  memory"
    )
    for name, wall, seconds, rss in rows:
        gbs, wall_gbs = nbytes / seconds / 1e9, nbytes / wall / 1e9
        fast, small = gbs >= raw_gbs / 2, rss <= budget
        print(
            f"{name:<31} {gbs / raw_gbs:>10.2f} {gbs / copy_gbs:>9.2f} {rss / largest:>13.2f} {gbs:>6.2f} "
            f"{seconds:>6.1f} {wall_gbs:>9.2f} {wall:>6.1f} {rss / 1e9:>11.2f}  {'met' if fast else 'MISSED':<6} "
            f"{'met' if small else 'MISSED'}"
        )
        results["runs"][name] = {
            "seconds": seconds,
            "wall_seconds": wall,
            "gb_s": gbs,
            "peak_rss_bytes": rss,
            "speed_target_met": fast,
            "memory_target_met": small,
        }
    print("Orbax checkpoint size: " + ", ".join(f"{name} {n / 1e9:.2f} GB" for name, n in stored.items()))
    print(
        f"targets: speed >= half the raw read ({raw_gbs / 2:.2f} GB/s); memory <= 2 x largest + 1 GB "
        f"({budget / 1e9:.2f} GB)"
    )
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
