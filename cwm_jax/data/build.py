"""JSONL / Parquet records -> ArrayRecord shards of JSON records, the input `kind="arrayrecord"` reads back.

Shards are `data-00000-of-0000N.array_record` (one record per chunk, `group_size:1`, for fast random access), written
into a temporary folder beside the output and renamed to it when complete.
"""

from __future__ import annotations

import json
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


class ShardWriter:
    """Writes records (bytes) into ArrayRecord shards of `records_per_shard` records, in a temporary folder beside
    `out`. `commit()` names the shards `data-i-of-N` and renames the folder to `out` (replacing it only with
    `overwrite`); leaving the `with` block without a commit (an error, Ctrl-C) removes the temporary folder, so `out`
    is either absent, as it was, or complete. Raises DataError if `out` exists without `overwrite`."""

    def __init__(self, out, *, records_per_shard: int = 10000, overwrite: bool = False):
        if records_per_shard <= 0:
            raise DataError(f"--records-per-shard must be positive, found {records_per_shard}")
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        self.records_per_shard = records_per_shard
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.records, self._shards, self._writer = 0, [], None

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            self._shards.append(self.tmp / f"shard-{len(self._shards):05d}")
            self._writer = ArrayRecordWriter(str(self._shards[-1]), "group_size:1")
        self._writer.write(record)
        self.records += 1
        if self.records % self.records_per_shard == 0:
            self._writer.close()
            self._writer = None

    def commit(self) -> dict:
        """Closes the last shard, names the shards, moves the folder to `out`; returns (records, shards, bytes, out).
        Raises DataError when no record was written (nothing is left at `out`)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self.records:
            raise DataError(f"no records to write to {self.out}")
        for i, shard in enumerate(self._shards):
            shard.rename(self.tmp / SHARD_NAME.format(i, len(self._shards)))
        size = sum(f.stat().st_size for f in self.tmp.iterdir())
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return dict(records=self.records, shards=len(self._shards), bytes=size, out=str(self.out))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # after a commit the folder is gone already


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
    start = time.perf_counter()
    with ShardWriter(out, records_per_shard=records_per_shard, overwrite=overwrite) as writer:
        inputs = _input_files(sources, fmt)
        total = sum(_count(path, kind) for path, kind in inputs)
        if total == 0:
            raise DataError(f"no records in {', '.join(sources)}")
        with tqdm(total=total, unit="rec", desc=f"cwm-data build {writer.out.name}") as bar:
            for path, kind in inputs:
                for record in _records(path, kind, field):
                    writer.write(record)
                    bar.update()
        summary = writer.commit()
    return dict(summary, seconds=time.perf_counter() - start)


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
