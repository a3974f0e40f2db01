"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this folder on sys.path)."""

import json
import os
import platform


def environment() -> dict:
    """What a benchmark ran on, for its JSON."""
    import jax

    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str, result: dict) -> None:
    """Write `result` to `path` through a temporary name, so a failed run leaves no half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
