"""Random-access record sources: JSONL, Parquet, ArrayRecord (JSON records), TFDS and the Python standard library.

Every source is a sequence of `(where, record)`: `where` names the file and line / row / record index for error
messages, `record` is a dict. Sources open files lazily and pickle without them, so grain worker processes can use them.
"""

from __future__ import annotations

import bisect
import glob
import json
import mmap
import os
import sysconfig
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from etils import epath

from cwm_jax.data.config import DataError

# File endings a folder is searched for, per kind.
SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "arrayrecord": (".array_record", ".arrayrecord")}
# Folders of the standard library that hold no library code to train on.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def resolve_files(path: str, kind: str, what: str) -> list[str]:
    """The sorted files a source path names: a file, a folder (its files ending in SUFFIXES[kind]) or a glob."""
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{what}: the glob {path!r} matches no file")
        return files
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.endswith(SUFFIXES[kind]))
        if not files:
            raise DataError(f"{what}: the folder {path} holds no {' or '.join(SUFFIXES[kind])} file")
        return files
    if not p.is_file():
        raise DataError(f"{what}: {path}: no such file or folder")
    return [str(p)]


class JsonlSource:
    """One JSON object per line over one or more files; blank lines are skipped. Lines are indexed once (offsets)."""

    def __init__(self, files: list[str]):
        self.files = files
        self._starts, self._ends, self._lines = [], [], []
        for f in files:
            starts, ends, lines = _index_lines(f)
            self._starts.append(starts)
            self._ends.append(ends)
            self._lines.append(lines)
        self._offsets = np.cumsum([0] + [len(s) for s in self._starts]).tolist()
        self._fds: dict[int, int] = {}

    def __len__(self):
        return self._offsets[-1]

    def __getitem__(self, index: int):
        k = bisect.bisect_right(self._offsets, index) - 1
        i = index - self._offsets[k]
        start, end = int(self._starts[k][i]), int(self._ends[k][i])
        where = f"{self.files[k]} line {int(self._lines[k][i])}"
        fd = self._fds.get(k)
        if fd is None:
            fd = self._fds[k] = os.open(self.files[k], os.O_RDONLY)
        return where, parse_json_record(os.pread(fd, end - start, start), where)

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Start and end byte offsets and 1-based numbers of the non-blank lines.
    size = os.path.getsize(path)
    if size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        data = np.frombuffer(m, np.uint8)
        newlines = np.flatnonzero(data == ord("\n"))
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [size]])
        lengths = ends - starts
        # A line holding only "\r" (or nothing) is blank; whitespace-only lines are left to fail as bad JSON.
        blank = (lengths == 0) | ((lengths == 1) & (data[np.minimum(starts, size - 1)] == ord("\r")))
        del data
    keep = ~blank
    return starts[keep], ends[keep], np.flatnonzero(keep) + 1


def parse_json_record(data: bytes, where: str) -> dict:
    """A JSON object from `data`; DataError naming `where` if it is not valid JSON or not an object."""
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (a record with fields), found {type(record).__name__}")
    return record


def iter_json_records(path) -> Iterator[tuple[int, str, dict]]:
    """(line number, "FILE line N", record) for each non-blank line of JSONL file `path` (`parse_json_record`; a
    local path or gs://...)."""
    with epath.Path(path).open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                where = f"{path} line {number}"
                yield number, where, parse_json_record(line, where)


class ParquetSource:
    """Rows of Parquet files, reading only `field`. Row groups are decoded whole and a few are cached, so random
    access to large files is slow: convert them with `cwm-data build` to ArrayRecord for shuffled training."""

    _CACHE = 4

    def __init__(self, files: list[str], field: str):
        import pyarrow.parquet as pq

        self.files, self.field = files, field
        self._groups = []  # (file index, row group, first row)
        self._file_starts = []  # first row of each file
        starts = [0]
        for k, f in enumerate(files):
            self._file_starts.append(starts[-1])
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as e:  # pyarrow raises several types for a file that is not Parquet
                raise DataError(f"{f}: not a Parquet file ({e})") from None
            names = meta.schema.to_arrow_schema().names
            if field not in names:
                raise DataError(f"{f}: no column {field!r} (the source's field); columns: {names}")
            for g in range(meta.num_row_groups):
                self._groups.append((k, g, starts[-1]))
                starts.append(starts[-1] + meta.row_group(g).num_rows)
        self._starts = starts
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return self._starts[-1]

    def __getitem__(self, index: int):
        g = bisect.bisect_right(self._starts, index) - 1
        k, group, first = self._groups[g]
        values = self._group(g)
        return f"{self.files[k]} row {index - self._file_starts[k]}", {self.field: values[index - first]}

    def _group(self, g: int) -> list:
        import pyarrow.parquet as pq

        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        k, group, _ = self._groups[g]
        values = pq.ParquetFile(self.files[k]).read_row_group(group, columns=[self.field]).column(0).to_pylist()
        with self._lock:
            self._cache[g] = values
            while len(self._cache) > self._CACHE:
                self._cache.popitem(last=False)
        return values

    def __getstate__(self):
        return {**self.__dict__, "_cache": OrderedDict(), "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


class ArrayRecordSource:
    """JSON-encoded records (UTF-8 bytes) of ArrayRecord files, as `cwm-data build` writes them."""

    def __init__(self, files: list[str]):
        import grain
        from array_record.python.array_record_module import ArrayRecordReader

        self.files = files
        counts = []
        for f in files:
            try:
                reader = ArrayRecordReader(f)
            except Exception as e:  # array_record raises RuntimeError / ValueError with C++ messages
                raise DataError(f"{f}: not an ArrayRecord file ({e})") from None
            counts.append(reader.num_records())
            reader.close()
        self._offsets = np.cumsum([0] + counts).tolist()
        self._source = grain.sources.ArrayRecordDataSource(files)

    def __len__(self):
        return self._offsets[-1]

    def __getitem__(self, index: int):
        k = bisect.bisect_right(self._offsets, index) - 1
        where = f"{self.files[k]} record {index - self._offsets[k]}"
        return where, parse_json_record(self._source[index], where)


class TfdsSource:
    """A TFDS dataset split through `tfds.data_source` (ArrayRecord-backed; no TensorFlow needed)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(f"tfds source {name!r} needs tensorflow-datasets: pip install 'cwm-jax[data]' ({e})") from e
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:  # TFDS raises its own error types for unknown names, splits and missing data
            raise DataError(f"tfds dataset {name!r} split {split!r} (data_dir {data_dir!r}): {e}") from None
        self.name, self.split = name, split

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index: int):
        record = self._source[index]
        where = f"tfds {self.name}[{self.split}] record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a feature dict, found {type(record).__name__}")
        return where, {k: _plain(v) for k, v in record.items()}


def _plain(value):
    # TFDS gives text as bytes and sequences as numpy arrays; formats expect str and lists.
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def stdlib_files(pattern: str = "*.py") -> list[str]:
    """The running Python's standard library files matching `pattern` (relative to its root), sorted, without
    site-packages and test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in root.glob(pattern or "*.py"):
        rel = f.relative_to(root)
        if f.is_file() and not _STDLIB_SKIP.intersection(rel.parts[:-1]):
            files.append(str(f))
    return sorted(files)


class StdlibSource:
    """Each standard library file one record `{field: its text}`."""

    def __init__(self, pattern: str, field: str):
        self.files, self.field = stdlib_files(pattern), field
        if not self.files:
            raise DataError(f"stdlib source: {pattern!r} matches no file under {sysconfig.get_paths()['stdlib']}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        # A few stdlib files declare a legacy encoding; a replaced byte does no harm to training text.
        return path, {self.field: Path(path).read_bytes().decode("utf-8", errors="replace")}


def open_source(src) -> JsonlSource | ParquetSource | ArrayRecordSource | TfdsSource | StdlibSource:
    """The record source of a checked source config (see `config.check_data_config`)."""
    what = f"data source {src.name!r} ({src.kind})"
    if src.kind == "jsonl":
        source = JsonlSource(resolve_files(src.path, "jsonl", what))
    elif src.kind == "parquet":
        source = ParquetSource(resolve_files(src.path, "parquet", what), src.field)
    elif src.kind == "arrayrecord":
        source = ArrayRecordSource(resolve_files(src.path, "arrayrecord", what))
    elif src.kind == "tfds":
        source = TfdsSource(src.path, src.split, src.data_dir)
    else:
        source = StdlibSource(src.path, src.field)
    if len(source) == 0:
        raise DataError(f"{what}: {src.path!r} holds no records")
    return source
