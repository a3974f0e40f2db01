"""World-model evaluation: the model predicts execution traces, scored against the real ones (`cwm-eval trace`).

For each task (a function and a call), the real trace comes from the tracer in a sandbox (`cwm_jax.traces.run`). The
model gets the trace-prediction prompt (the source with its entry marked) and the real call frame, which carries the
inputs, and predicts the rest of the trace until it closes it (`Generator.predict_frames`; greedy by default).

Scores, pooled over the tasks' frames after the call frame (frame i of the prediction against frame i of the real
trace; a missing or extra frame counts as wrong):
- output exact match (CruxEval-O style): the value of the entry's return frame (for an entry that raised, its last
  exception frame) equals the real one's repr string exactly;
- next-line accuracy: same event and same source line;
- locals accuracy: for the real call / line frames, the predicted frame's locals, with ".." resolved as the release's
  debugger resolves them (`tracer.resolve_locals`), equal the real resolved locals (every name and value).

Tasks file (JSONL): corpus records as `cwm-data traces` reads them (`{"source", "entry", "call"}` or `"calls"`), or
records that `cwm-data traces OUT.jsonl` wrote (they carry their trace and are not run again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cwm_jax.data.config import DataError
from cwm_jax.data.sources import iter_json_records
from cwm_jax.traces import chat_frames, frame_dicts, run
from cwm_jax.traces.corpus import record_jobs
from cwm_jax.traces.tracer import resolve_locals


def load_tasks(path, *, limits: run.TraceLimits | None = None, workers: int | None = None) -> tuple[list, dict]:
    """Tasks of a JSONL file: ([{"id", "source", "entry", "call", "frames", "output", "exception", "status"}], skipped
    {status: count}). Records without a trace are traced first (in sandboxes); only complete traces (the entry
    returned or raised) become tasks. Raises DataError naming the file and line of a bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such tasks file")
    tasks, to_run = [], []
    for number, where, record in iter_json_records(path):
        default_id = f"{path.name}:{number}"
        if isinstance(record.get("trace"), dict):
            t = record["trace"]
            if not {"source", "entry", "frames"} <= set(t):
                raise DataError(f"{where}: a trace record needs 'source', 'entry' and 'frames'")
            keep = dict(call=record.get("call"), output=record.get("output"), exception=record.get("exception"))
            tasks.append(
                dict(id=record.get("id", default_id), source=t["source"], entry=t["entry"], frames=t["frames"],
                     status=record.get("status", "ok"), **keep)
            )  # fmt: skip
        else:
            to_run += record_jobs(record, where, default_id)
    skipped: dict[str, int] = {}
    for job, result in zip(to_run, run.trace_jobs(to_run, limits=limits, workers=workers), strict=True):
        if result["status"] in run.COMPLETE and result.get("complete") and result["frames"]:
            tasks.append(dict(job, **{k: result[k] for k in ("frames", "output", "exception", "status")}))
        else:
            skipped[result["status"]] = skipped.get(result["status"], 0) + 1
    return tasks, skipped


def entry_result(frames: Sequence[dict]) -> tuple[str | None, str | None]:
    """(return value, exception value) of the entry: the first frame's scope, followed through nested call / return
    frames. The return value is that of the frame that leaves the entry; the exception value is the last exception
    frame of the entry's own scope before it (None when there is none)."""
    depth, exception = 0, None
    for f in frames:
        if f["event"] == "call":
            depth += 1
        elif f["event"] == "return":
            if depth == 1:
                return f["value"], exception
            depth -= 1
        elif f["event"] == "exception" and depth == 1:
            exception = f["value"]
    return None, exception


def score(real: Sequence[dict], predicted: Sequence[dict], *, raised: bool = False) -> dict:
    """Scores of one prediction (frames as dicts, the real call frame first in both): output (bool: the entry's
    return value, or with `raised` the exception that left it, equals the real one), lines and locals as (matches,
    total) over the frames after the first."""
    real_locals, pred_locals = resolve_locals(list(real)), resolve_locals(list(predicted))
    lines = locals_ = locals_total = 0
    for i in range(1, len(real)):
        p = predicted[i] if i < len(predicted) else None
        if p is not None and p["event"] == real[i]["event"] and p["line"] == real[i]["line"]:
            lines += 1
        if real[i]["event"] in ("call", "line"):
            locals_total += 1
            if p is not None and p["event"] in ("call", "line") and pred_locals[i] == real_locals[i]:
                locals_ += 1
    which = 1 if raised else 0  # an entry that raised "returns" None (settrace's return event): compare exceptions
    output = entry_result(predicted)[which] == entry_result(real)[which]
    return dict(output=output, lines=(lines, len(real) - 1), locals=(locals_, locals_total))


def evaluate(
    generator,
    tasks: Sequence[dict],
    *,
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    seed: int = 0,
    on_task: Callable[[dict], None] | None = None,
) -> dict:
    """Predicts and scores every task (see the module docstring); returns {"tasks", "output_exact",
    "line_accuracy", "locals_accuracy", "closed" (share of predictions the model ended), "results": per task}.
    `on_task(result)` is called after each task (for progress)."""
    results = []
    for i, task in enumerate(tasks):
        real = task["frames"]
        first = chat_frames(real[:1])
        predicted, closed = generator.predict_frames(
            task["source"], task["entry"], first, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i
        )
        pred = frame_dicts(first + predicted)
        s = score(real, pred, raised=task.get("status") == "exception")
        result = dict(
            id=task["id"], entry=task["entry"], call=task.get("call"), real_output=entry_result(real)[0],
            predicted_output=entry_result(pred)[0], closed=closed, frames=len(real), predicted_frames=len(pred), **s,
        )  # fmt: skip
        results.append(result)
        if on_task:
            on_task(result)
    n = len(results)

    def pooled(key):
        total = sum(r[key][1] for r in results)
        return sum(r[key][0] for r in results) / total if total else 0.0

    return dict(
        tasks=n,
        output_exact=sum(r["output"] for r in results) / n if n else 0.0,
        line_accuracy=pooled("lines"),
        locals_accuracy=pooled("locals"),
        closed=sum(r["closed"] for r in results) / n if n else 0.0,
        results=results,
    )
