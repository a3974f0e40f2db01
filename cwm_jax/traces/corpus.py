"""`cwm-data traces SRC OUT`: a corpus of functions with inputs, or programs with stdin, -> CWM trace records.

Input (SRC, one or more):
- JSONL files of records, one per line:
  `{"source": ..., "entry": "f", "calls": ["f(1)", "f(2)"]}` (or `"call": "f(1)"`): a function and the calls to
  trace, each a Python expression evaluated after the source has run; or
  `{"source": ..., "entry": "main", "stdin": "3\\n" | ["3\\n", "4\\n"]}`: a program run as __main__ with each stdin,
  tracing the first invocation of `entry` (default "main"). An optional "id" is carried into the output.
- Folders: every `*.jsonl` in them as above, and every `NAME.py` as a program whose inputs are the files
  `NAME.in` and `NAME.*.in` beside it (none: one run with empty stdin), entry `--entry` (default "main").

Every job runs the tracer in its own sandbox (`cwm_jax.traces.run`), `--workers` at a time. Traces whose entry
returned or raised (status "ok" or "exception") are written; the rest (frame or time limit, a sandbox limit, an
error before the entry ran, an entry never called) are counted, and the summary names the first reason per status.

Output: ArrayRecord shards in the folder OUT (`data-i-of-N.array_record`), or one JSONL file when OUT ends in
".jsonl". Each record: `{"trace": {"source", "entry", "frames"}, "id", "call", "stdin", "status", "output",
"exception", "python", "tracer"}`, i.e. format "trace" with field "trace" for the training data sources
(`configs/tiny_traces.py`). OUT appears only when complete.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from cwm_jax.data.build import ShardWriter
from cwm_jax.data.config import DataError
from cwm_jax.data.sources import iter_json_records
from cwm_jax.traces import run


def read_corpus(sources: list[str], *, entry: str = "main") -> Iterator[tuple[str, dict]]:
    """(where, record) for every trace job of `sources`: records normalised to {"source", "entry", "id", and "call"
    or "stdin"}, one per call or stdin. Raises DataError naming the file and line of a bad record."""
    for src in sources:
        path = Path(src)
        if path.is_dir():
            for f in sorted(path.glob("*.jsonl")):
                yield from _jsonl_jobs(f)
            for f in sorted(path.glob("*.py")):
                yield from _program_jobs(f, entry)
        elif path.is_file():
            yield from _jsonl_jobs(path)
        else:
            raise DataError(f"{src}: no such file or folder")


def _jsonl_jobs(path: Path) -> Iterator[tuple[str, dict]]:
    for number, where, record in iter_json_records(path):
        for job in record_jobs(record, where, f"{path.name}:{number}"):
            yield where, job


def record_jobs(record: dict, where: str, default_id: str) -> list[dict]:
    """The trace jobs of one corpus record (one per call or stdin; see the module docstring), normalised to {"source",
    "entry", "id", and "call" or "stdin"}. Raises DataError naming `where` for a bad record."""
    source, entry = record.get("source"), record.get("entry", "main")
    if not isinstance(source, str) or not isinstance(entry, str):
        raise DataError(f"{where}: a record needs 'source' (a string) and 'entry' (a function name)")
    calls = record.get("calls", [record["call"]] if "call" in record else None)
    stdins = record.get("stdin")
    if (calls is None) == (stdins is None):
        raise DataError(f"{where}: a record needs either 'calls' (or 'call') or 'stdin'; its keys: {sorted(record)}")
    base = dict(source=source, entry=entry, id=record.get("id", default_id))
    if calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, str) for c in calls):
            raise DataError(f"{where}: 'calls' must be a list of Python expressions (strings)")
        return [dict(base, call=call) for call in calls]
    stdins = [stdins] if isinstance(stdins, str) else stdins
    if not isinstance(stdins, list) or not all(isinstance(x, str) for x in stdins):
        raise DataError(f"{where}: 'stdin' must be a string or a list of strings")
    return [dict(base, stdin=stdin) for stdin in stdins]


def _program_jobs(path: Path, entry: str) -> Iterator[tuple[str, dict]]:
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    inputs = sorted({*path.parent.glob(f"{path.stem}.in"), *path.parent.glob(f"{path.stem}.*.in")})
    for stdin_file in inputs or [None]:
        stdin = stdin_file.read_text(encoding="utf-8") if stdin_file else ""
        name = stdin_file.name if stdin_file else path.name
        yield str(path), dict(source=source, entry=entry, id=name, stdin=stdin)


def output_record(job: dict, result: dict) -> dict:
    """The record written for one trace (see the module docstring)."""
    trace = dict(source=job["source"], entry=job["entry"], frames=result["frames"])
    keep = ("status", "output", "exception", "python", "tracer")
    return dict(
        trace=trace, id=job["id"], call=job.get("call"), stdin=job.get("stdin"), **{k: result.get(k) for k in keep}
    )


def build_traces(
    sources: list[str],
    out: str,
    *,
    entry: str = "main",
    limits: run.TraceLimits | None = None,
    workers: int | None = None,
    records_per_shard: int = 10000,
    overwrite: bool = False,
) -> dict:
    """Traces every job of `sources` into `out` (see the module docstring). Returns a summary: jobs, records (written),
    frames, bytes, seconds, out, failed ({status: count}) and reasons ({status: first reason})."""
    start = time.perf_counter()
    limits = limits or run.TraceLimits()
    jobs = [job for _, job in read_corpus(sources, entry=entry)]  # every record is checked before anything runs
    if not jobs:
        raise DataError(f"no trace jobs in {', '.join(sources)}")
    out_path = Path(out)
    as_jsonl = out_path.suffix == ".jsonl"
    if out_path.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    failed, reasons, frames, written = collections.Counter(), {}, 0, 0
    results = run.trace_jobs(jobs, limits=limits, workers=workers)
    bar = tqdm(total=len(jobs), unit="trace", desc=f"cwm-data traces {out_path.name}")
    with bar, _writer(out_path, as_jsonl, records_per_shard, overwrite) as write:
        for job, result in zip(jobs, results, strict=True):
            bar.update()
            if result["status"] in run.COMPLETE and result.get("complete"):
                write(json.dumps(output_record(job, result), ensure_ascii=False).encode("utf-8"))
                written += 1
                frames += len(result["frames"])
            else:
                failed[result["status"]] += 1
                reasons.setdefault(result["status"], f"{job['id']}: {result.get('error') or result['status']}")
            bar.set_postfix(written=written, failed=sum(failed.values()), refresh=False)
        if not written:
            raise DataError(f"no trace completed; failed: {dict(failed)}; first reasons: {reasons}")
        summary = write.commit()
    return dict(
        summary,
        jobs=len(jobs),
        frames=frames,
        failed=dict(failed),
        reasons=reasons,
        seconds=time.perf_counter() - start,
    )


class _writer:
    """ShardWriter for a folder of shards, or the same interface over one JSONL file (temporary name, renamed)."""

    def __init__(self, out: Path, as_jsonl: bool, records_per_shard: int, overwrite: bool):
        self.shards = None if as_jsonl else ShardWriter(out, records_per_shard=records_per_shard, overwrite=overwrite)
        if as_jsonl:
            self.out, self.records = out, 0
            out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in commit or __exit__)

    def __call__(self, record: bytes) -> None:
        if self.shards is not None:
            self.shards.write(record)
        else:
            self.file.write(record + b"\n")
            self.records += 1

    def commit(self) -> dict:
        if self.shards is not None:
            return self.shards.commit()
        self.file.close()
        if not self.records:
            raise DataError(f"no complete trace to write to {self.out}")
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.out)
        return dict(records=self.records, shards=1, bytes=size, out=str(self.out))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.shards is not None:
            self.shards.__exit__(*exc)
        else:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
