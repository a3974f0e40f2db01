"""`cwm-data`: build ArrayRecord training shards from JSONL or Parquet records.

    cwm-data build SRC [SRC ...] --out DIR [--format jsonl|parquet] [--field text] [--records-per-shard 10000]

Each record is written as JSON (UTF-8) into `DIR/data-00000-of-0000N.array_record`, ..., which a data source of kind
"arrayrecord" reads back with the same formats. Known errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from cwm_jax.data.build import build_arrayrecord
from cwm_jax.data.config import DataError


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
