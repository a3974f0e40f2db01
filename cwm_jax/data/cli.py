"""`cwm-data`: build ArrayRecord training shards from JSONL or Parquet records, or from traced programs.

    cwm-data build SRC [SRC ...] --out DIR [--format jsonl|parquet] [--field text] [--records-per-shard 10000]
    cwm-data traces SRC [SRC ...] OUT [--workers N] [--entry main] [--max-frames 1000] [--max-repr 200] [--wall-s 5]
        [--memory-mb 512] [--records-per-shard 10000] [--overwrite]

`build`: each record is written as JSON (UTF-8) into `DIR/data-00000-of-0000N.array_record`, ..., which a data source
of kind "arrayrecord" reads back with the same formats. `traces`: functions with calls, or programs with stdin, run in
sandboxes under the tracer, written as trace records (`cwm_jax.traces.corpus`). Known errors print one line on stderr
and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from cwm_jax.data.build import build_arrayrecord
from cwm_jax.data.config import DataError
from cwm_jax.rl.sandbox import SandboxError
from cwm_jax.traces.corpus import build_traces
from cwm_jax.traces.run import TraceLimits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cwm-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write JSONL / Parquet records as ArrayRecord shards")
    build.add_argument("sources", nargs="+", metavar="SRC", help="JSONL or Parquet files, folders or globs")
    build.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    build.add_argument("--format", choices=("jsonl", "parquet"), help="input format (default: by file ending)")
    build.add_argument("--field", default="text", help="the field every record must hold (default: text)")
    build.add_argument("--records-per-shard", type=int, default=10000)
    build.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    traces = sub.add_parser("traces", help="trace functions / programs in sandboxes into trace records")
    traces.add_argument("sources", nargs="+", metavar="SRC", help="JSONL corpus files or folders (see cwm_jax.traces)")
    traces.add_argument("out", metavar="OUT", help="output folder of ArrayRecord shards, or a .jsonl file")
    traces.add_argument("--workers", type=int, default=None, help="sandboxes at a time (default: one per CPU)")
    traces.add_argument("--entry", default="main", help="entry function of folder programs (default: main)")
    defaults = TraceLimits()
    traces.add_argument("--max-frames", type=int, default=defaults.max_frames, help="frames per trace")
    traces.add_argument("--max-repr", type=int, default=defaults.max_repr, help="characters per value repr")
    traces.add_argument("--wall-s", type=float, default=defaults.wall_s, help="seconds of tracing per job")
    traces.add_argument("--memory-mb", type=int, default=defaults.memory_mb, help="memory per sandbox")
    traces.add_argument("--records-per-shard", type=int, default=10000)
    traces.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "traces":
        return _traces(args)
    try:
        s = build_arrayrecord(
            args.sources,
            args.out,
            fmt=args.format,
            field=args.field,
            records_per_shard=args.records_per_shard,
            overwrite=args.overwrite,
        )
    except (DataError, OSError) as e:
        print(f"cwm-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {s['records']} records in {s['shards']} shards ({s['bytes'] / 1e6:.2f} MB) to {s['out']} "
        f"in {s['seconds']:.1f} s"
    )
    return 0


def _traces(args) -> int:
    try:
        limits = TraceLimits(
            max_frames=args.max_frames, max_repr=args.max_repr, wall_s=args.wall_s, memory_mb=args.memory_mb
        )
        s = build_traces(
            args.sources,
            args.out,
            entry=args.entry,
            limits=limits,
            workers=args.workers,
            records_per_shard=args.records_per_shard,
            overwrite=args.overwrite,
        )
    except (DataError, SandboxError, OSError) as e:
        print(f"cwm-data traces: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {s['records']} traces ({s['frames']} frames, {s['bytes'] / 1e6:.2f} MB) of {s['jobs']} jobs to "
        f"{s['out']} in {s['seconds']:.1f} s"
    )
    for status, count in sorted(s["failed"].items()):
        print(f"  not written: {count} {status} (first: {s['reasons'][status]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
