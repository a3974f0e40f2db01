"""Sandbox throughput: trivial programs per second through `cwm_jax.rl.sandbox.Pool` against running them bare.

Runs `--programs` copies of two trivial programs, `python -I -c "print(1)"` (the interpreter sandboxed programs get,
`sandbox.python_executable()`) and `/bin/true`, through `Pool.map` with `--workers` threads for each backend
(`--backend`, default every usable one), and the same programs through `subprocess.run` from as many threads without
any isolation (the baseline). Prints the ratios first (sandboxed / bare programs per second: the cost of isolation),
then a table: programs per second and the median wall time of one program (Result.wall_s; the baseline's own
`subprocess.run` time). Every sandboxed run must end "ok". `--smoke` runs 10 programs of each (CI).

    python benchmarks/sandbox.py [--programs 200] [--workers N] [--backend B] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import time

from common import write_json

from cwm_jax.rl import sandbox


def programs() -> dict[str, tuple[str, ...]]:
    """The trivial programs timed: name -> argv."""
    return {"python": (sandbox.python_executable(), "-I", "-c", "print(1)"), "true": ("/bin/true",)}


def bare(argv: tuple[str, ...], count: int, workers: int) -> tuple[float, list[float]]:
    """(seconds for all, seconds per program) running `argv` `count` times without isolation from `workers` threads."""

    def one(_):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, env={"PATH": sandbox.PATH})
        return time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as executor:
        each = list(executor.map(one, range(count)))
    return time.perf_counter() - start, each


def sandboxed(argv: tuple[str, ...], count: int, workers: int, backend: str) -> tuple[float, list[float]]:
    """(seconds for all, Result.wall_s per program) running `argv` `count` times through a Pool."""
    jobs = [sandbox.Job(argv=argv) for _ in range(count)]
    start = time.perf_counter()
    with sandbox.Pool(workers, backend=backend) as pool:
        results = list(pool.map(jobs))
    seconds = time.perf_counter() - start
    failed = [result for result in results if not result.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} sandboxed runs of {argv} failed, e.g. {failed[0]}")
    return seconds, [result.wall_s for result in results]


def main(argv: list[str] | None = None) -> int:
    """Time the programs bare and through each backend; print ratios and a table; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200, help="runs of each program (default 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads (default: CPU count)")
    parser.add_argument("--backend", choices=sandbox.BACKENDS, help="default: every usable backend")
    parser.add_argument("--smoke", action="store_true", help="10 programs of each (CI)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    count = 10 if args.smoke else args.programs
    if count < 1 or args.workers < 1:
        parser.error(f"--programs and --workers must be positive, got {count} and {args.workers}")
    backends = [args.backend] if args.backend else sandbox.backends()
    if not backends:
        print("no sandbox backend works on this machine (install bubblewrap or util-linux, allow user namespaces)")
        return 1

    rows = []
    for name, program in programs().items():
        seconds, each = bare(program, count, args.workers)
        base = count / seconds
        rows.append(dict(backend="none", program=name, programs_per_s=base, p50_ms=1e3 * statistics.median(each)))
        for backend in backends:
            seconds, each = sandboxed(program, count, args.workers, backend)
            rate = count / seconds
            rows.append(
                dict(
                    backend=backend,
                    program=name,
                    programs_per_s=rate,
                    p50_ms=1e3 * statistics.median(each),
                    ratio=rate / base,
                )
            )

    print(f"sandboxed / unsandboxed programs per second ({count} programs, {args.workers} workers):")
    for row in rows:
        if "ratio" in row:
            print(f"  {row['backend']:<8} {row['program']:<7} {row['ratio']:.3f}")
    print()
    print("| backend | program | workers | programs/s | ms per program (p50) |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['program']} | {args.workers} | {row['programs_per_s']:.1f} "
            f"| {row['p50_ms']:.1f} |"
        )
    if args.json:
        result = {
            "benchmark": "sandbox",
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "root": os.geteuid() == 0,
            "programs": count,
            "workers": args.workers,
            "rows": rows,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
