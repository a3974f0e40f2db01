"""The tracer inside the sandbox: trace untrusted functions and programs, one or many at once.

Each job runs `cwm_jax/traces/tracer.py` (standard library only, copied into the sandbox's private working directory)
under `cwm_jax.rl.sandbox`: a fresh interpreter in its own namespaces, with wall, CPU, memory, process and output
limits. The tracer writes its result to `out.json`, which the sandbox hands back. A job the sandbox stopped (a C-level
loop past the wall limit, a memory bomb) comes back as a result with no frames and the sandbox's status.

    from cwm_jax.traces import run
    result = run.trace("def f(x):\\n    return x + 1\\n", "f", call="f(2)")
    result["status"], result["output"], result["frames"]
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from cwm_jax.rl import sandbox

TRACER_FILE = Path(__file__).with_name("tracer.py")
# Statuses of a trace that is whole and usable as training data: the entry returned or raised.
COMPLETE = ("ok", "exception")


@dataclasses.dataclass(frozen=True)
class TraceLimits:
    """Tracer limits (frames, characters per repr, seconds of tracing) and the sandbox's limits around it. The sandbox's
    wall limit is the tracer's plus `wall_margin_s`, for the interpreter's start and the result's write."""

    max_frames: int = 1000
    max_repr: int = 200
    wall_s: float = 5.0
    wall_margin_s: float = 5.0
    memory_mb: int = 512
    max_procs: int = 16
    max_output_bytes: int = 1 << 16

    def sandbox_limits(self) -> sandbox.Limits:
        wall = self.wall_s + self.wall_margin_s
        return sandbox.Limits(
            wall_s=wall,
            cpu_s=wall,
            memory_mb=self.memory_mb,
            max_procs=self.max_procs,
            max_output_bytes=self.max_output_bytes,
        )

    def tracer_limits(self) -> dict:
        return dict(max_frames=self.max_frames, max_repr=self.max_repr, wall_s=self.wall_s)


def job(source: str, entry: str, *, call: str | None = None, stdin: str | None = None, limits=TraceLimits()) -> dict:
    """The tracer's job for a function call (`call`, a Python expression such as "f(3)") or a program run with
    `stdin` (call None): `source` is run, and the first invocation of `entry` ("name" or "Class.method") traced."""
    if call is not None and stdin is not None:
        raise ValueError(f"a trace job is a call ({call!r}) or a program with stdin, not both")
    mode = "call" if call is not None else "program"
    spec = dict(mode=mode, source=source, entry=entry, limits=limits.tracer_limits())
    if call is not None:
        spec["call"] = call
    else:
        spec["stdin"] = stdin or ""
    return spec


def _sandbox_job(spec: Mapping) -> sandbox.Job:
    files = {"tracer.py": TRACER_FILE.read_bytes(), "job.json": json.dumps(spec)}
    argv = (sandbox.python_executable(), "-I", "tracer.py", "job.json", "out.json")
    return sandbox.Job(argv=argv, files=files, collect=("out.json",))


def _result(spec: Mapping, res: sandbox.Result) -> dict:
    """The tracer's result dict, or, when the sandbox stopped the tracer before it wrote one, a result with no frames
    whose status is the sandbox's ("timeout", "memory_limit", ...) and whose error says why."""
    out = res.files.get("out.json")
    if out is not None:
        try:
            result = json.loads(out)
        except json.JSONDecodeError as e:
            why = f"the tracer's out.json is not JSON ({e})"
        else:
            result["stdout"] = res.stdout.decode("utf-8", "replace")
            return result
    else:
        why = res.reason
        if res.stderr:
            why += ": " + res.stderr.decode("utf-8", "replace").strip().splitlines()[-1][:300]
    status = res.status if res.status not in ("ok", "error") else "error"
    return dict(
        source=spec["source"],
        entry=spec["entry"],
        call=spec.get("call"),
        status=status,
        complete=False,
        frames=[],
        output=None,
        exception=None,
        error=why,
        stdout=res.stdout.decode("utf-8", "replace"),
    )


def trace_many(specs: Iterable[Mapping], *, limits=TraceLimits(), workers: int | None = None) -> Iterator[dict]:
    """Results of tracer jobs (see `job`), in order, `workers` sandboxes at a time (default: one per CPU)."""
    specs = list(specs)
    with sandbox.Pool(workers, limits=limits.sandbox_limits()) as pool:
        for spec, res in zip(specs, pool.map(_sandbox_job(s) for s in specs), strict=True):
            yield _result(spec, res)


def trace_jobs(jobs: Iterable[Mapping], *, limits: TraceLimits | None = None, workers: int | None = None):
    """`trace_many` of corpus jobs ({"source", "entry", and "call" or "stdin"}, as `corpus.record_jobs` makes them)."""
    limits = limits or TraceLimits()
    specs = [job(j["source"], j["entry"], call=j.get("call"), stdin=j.get("stdin"), limits=limits) for j in jobs]
    return trace_many(specs, limits=limits, workers=workers)


def trace(source: str, entry: str, *, call: str | None = None, stdin: str | None = None, limits=TraceLimits()) -> dict:
    """One trace (see `job` and `trace_many`): the tracer's result dict (status, complete, frames, output, ...)."""
    spec = job(source, entry, call=call, stdin=stdin, limits=limits)
    j = _sandbox_job(spec)
    return _result(spec, sandbox.run(j.argv, files=j.files, collect=j.collect, limits=limits.sandbox_limits()))
