"""The data config schema (`default_data_config`, `source_config`), its validation, and `DataError`.

    data.sources      list of source ConfigDicts (below), mixed by weight
    data.shuffle      shuffle records (each source every epoch, then the mixture of sources)
    data.pack         pack documents into rows of seq_len (False: one document per row, truncated / padded)
    data.num_workers  grain worker processes (0: in this process; batches depend on it, not on process count)

A source: name, kind ("jsonl", "parquet", "arrayrecord", "tfds", "stdlib"), path (file, folder or glob; the dataset
name for tfds; a glob under the standard library for stdlib), format ("text", "chat", "trace", "tokens"), field (the
record key holding the text / messages / trace record / token ids), weight (> 0), split and data_dir (tfds only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_collections

KINDS = ("jsonl", "parquet", "arrayrecord", "tfds", "stdlib")
FORMATS = ("text", "chat", "trace", "tokens")
_SOURCE_DEFAULTS = dict(name="", kind="", path="", format="text", field="text", weight=1.0, split="train", data_dir="")
_DATA_KEYS = ("sources", "shuffle", "pack", "num_workers")


class DataError(ValueError):
    """Bad data input: a missing file, an empty glob, a malformed record or config value."""


def source_config(**fields) -> ml_collections.ConfigDict:
    """A source ConfigDict with the defaults of the schema filled in; `fields` override them (unknown keys raise)."""
    unknown = sorted(set(fields) - set(_SOURCE_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data source keys {unknown}; a source has {sorted(_SOURCE_DEFAULTS)}")
    return ml_collections.ConfigDict({**_SOURCE_DEFAULTS, **fields})


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults: the Python standard library's top-level modules as text (every machine has
    them, so `make demo` needs no download), shuffled and packed, read in this process."""
    cfg = ml_collections.ConfigDict()
    cfg.sources = [source_config(name="stdlib", kind="stdlib", path="*.py")]
    cfg.shuffle = True
    cfg.pack = True
    cfg.num_workers = 0
    return cfg


def check_data_config(data_cfg: Mapping) -> list[ml_collections.ConfigDict]:
    """Validates `data_cfg` and returns its sources with defaults filled in; DataError naming the bad key."""
    unknown = sorted(set(data_cfg.keys()) - set(_DATA_KEYS))
    if unknown:
        raise DataError(f"unknown data config keys {unknown}; expected {list(_DATA_KEYS)}")
    sources = list(data_cfg.get("sources") or [])
    if not sources:
        raise DataError("data.sources is empty; give at least one source (see cwm_jax.data.source_config)")
    workers = data_cfg.get("num_workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"data.num_workers must be an integer >= 0, found {workers!r}")
    out, names = [], set()
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        if not isinstance(src, Mapping | ml_collections.ConfigDict):
            raise DataError(f"{key} must be a ConfigDict or dict, found {type(src).__name__}")
        try:
            src = source_config(**dict(src.items()))
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
        src.name = src.name or f"{src.kind}{i}"
        key = f"{key} ({src.name!r})"
        if src.name in names:
            raise DataError(f"{key}: two sources are named {src.name!r}; give each source its own name")
        names.add(src.name)
        if src.kind not in KINDS:
            raise DataError(f"{key}.kind is {src.kind!r}; expected one of {KINDS}")
        if src.format not in FORMATS:
            raise DataError(f"{key}.format is {src.format!r}; expected one of {FORMATS}")
        if src.kind == "stdlib" and src.format != "text":
            raise DataError(f"{key}: kind 'stdlib' gives text documents, but format is {src.format!r}; use 'text'")
        if not src.path and src.kind != "stdlib":
            raise DataError(f"{key}.path is empty; give a file, folder or glob (the dataset name for tfds)")
        weight = src.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"{key}.weight must be a positive number, found {weight!r}")
        if not isinstance(src.field, str) or not src.field:
            raise DataError(f"{key}.field must be a non-empty record key, found {src.field!r}")
        out.append(src)
    return out
