"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this folder on sys.path)."""

import json
import os


def write_json(path: str, result: dict) -> None:
    """Write `result` to `path` through a temporary name, so a failed run leaves no half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
