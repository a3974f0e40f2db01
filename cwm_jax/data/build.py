"""JSONL / Parquet records -> ArrayRecord shards of JSON records, the input `kind="arrayrecord"` reads back.

Shards are `data-00000-of-0000N.array_record` (one record per chunk, `group_size:1`, for fast random access), written
into a temporary folder beside the output and renamed to it when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cwm_jax.data.config import DataError
from cwm_jax.data.sources import parse_json_record, resolve_files

SHARD_NAME = "data-{:05d}-of-{:05d}.array_record"


def build_arrayrecord(
    sources: list[str],
    out: str,
    *,
    fmt: str | None = None,
    field: str = "text",
    records_per_shard: int = 10000,
    overwrite: bool = False,
) -> dict:
    """Writes every record of `sources` (files, folders or globs; `fmt` "jsonl" or "parquet", None: by file ending)
    as JSON into ArrayRecord shards under `out`. Each record must hold `field`. Returns a summary dict (records,
    shards, bytes, seconds, out)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    start = time.perf_counter()
    if records_per_shard <= 0:
        raise DataError(f"--records-per-shard must be positive, found {records_per_shard}")
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    inputs = _input_files(sources, fmt)
    total = sum(_count(path, kind) for path, kind in inputs)
    if total == 0:
        raise DataError(f"no records in {', '.join(sources)}")
    num_shards = math.ceil(total / records_per_shard)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written, shard, writer = 0, 0, None
        with tqdm(total=total, unit="rec", desc=f"cwm-data build {out_path.name}") as bar:
            for path, kind in inputs:
                for record in _records(path, kind, field):
                    if writer is None:
                        writer = ArrayRecordWriter(str(tmp / SHARD_NAME.format(shard, num_shards)), "group_size:1")
                    writer.write(record)
                    written += 1
                    bar.update()
                    if written % records_per_shard == 0:
                        writer.close()
                        writer, shard = None, shard + 1
        if writer is not None:
            writer.close()
        size = sum(f.stat().st_size for f in tmp.iterdir())
        if out_path.exists():
            shutil.rmtree(out_path)
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(records=written, shards=num_shards, bytes=size, seconds=time.perf_counter() - start, out=str(out))


def _input_files(sources: list[str], fmt: str | None) -> list[tuple[str, str]]:
    files = []
    for src in sources:
        kind = fmt or ("parquet" if src.endswith(".parquet") else "jsonl")
        files += [(f, fmt or ("parquet" if f.endswith(".parquet") else "jsonl")) for f in resolve_files(src, kind, src)]
    return files


def _count(path: str, kind: str) -> int:
    if kind == "parquet":
        return _parquet_file(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.rstrip(b"\r\n"))


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a Parquet file ({e})") from None


def _records(path: str, kind: str, field: str) -> Iterator[bytes]:
    if kind == "parquet":
        pf = _parquet_file(path)
        row = 0
        for batch in pf.iter_batches():
            for record in batch.to_pylist():
                yield _encode(record, field, f"{path} row {row}")
                row += 1
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.rstrip(b"\r\n"):  # blank lines are skipped as the jsonl source skips them
                where = f"{path} line {number}"
                yield _encode(parse_json_record(line, where), field, where)


def _encode(record: dict, field: str, where: str) -> bytes:
    if field not in record:
        raise DataError(f"{where}: record has no field {field!r}; its keys: {sorted(record)}")
    try:
        return json.dumps(record, ensure_ascii=False, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: record cannot be written as JSON ({e})") from None


def _json_default(value):
    # Parquet gives binary columns as bytes and some numbers as numpy scalars.
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
