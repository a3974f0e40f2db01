"""Python execution traces in CWM's format (spec section 4): making them, and using them for data, evaluation and
debugging.

- `tracer`: the tracer (standard library only; copied into a sandbox and run there as a script, or called
  in-process): `trace_call`, `trace_program`, `resolve_locals` (the release's resolution of ".." locals).
- `run` runs the tracer inside the sandbox, `corpus` builds trace data sets (cwm-data), `evaluate` scores predicted
  traces (cwm-eval trace) and `debugger` is the neural debugger (cwm-debug); each is imported on its own.

`chat_frames` turns the tracer's result frames into `cwm_jax.chat.Frame`s for `chat.render_trace`; `frame_dicts`
turns Frames (e.g. a model's predicted ones) back into the tracer's dicts, for `resolve_locals` and scoring.
"""

from __future__ import annotations

from cwm_jax import chat
from cwm_jax.traces.tracer import resolve_locals, trace_call, trace_program

__all__ = ["chat_frames", "frame_dicts", "resolve_locals", "trace_call", "trace_program"]


def chat_frames(frames: list[dict]) -> list[chat.Frame]:
    """The tracer's result frames (dicts with "event", "line", and "locals" or "value") as chat.Frame objects.

    Raises ValueError (from chat.Frame) for a frame whose event, locals or value is malformed, and KeyError naming a
    missing "event" or "line".
    """
    out = []
    for f in frames:
        has_locals = f["event"] in ("call", "line")
        out.append(chat.Frame(f["event"], f.get("locals") if has_locals else None, f["line"], f.get("value")))
    return out


def frame_dicts(frames) -> list[dict]:
    """chat.Frame objects as the tracer's frame dicts ({"event", "locals", "line", "value"}), `chat_frames` inverse."""
    return [dict(event=f.event, locals=f.locals, line=f.source_line, value=f.value) for f in frames]
