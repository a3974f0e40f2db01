"""Execution tracer producing CWM-format traces (spec section 4) of Python code run in this process.

Standard library only and independent of cwm_jax: the file is copied into a sandbox's working directory and run as a
script (`python tracer.py JOB.json OUT.json`, see `main`); `trace_call` and `trace_program` also work in-process.

What a trace holds (decisions of this tracer; the release's tracer is not public):

- Events are exactly `sys.settrace`'s call / line / return / exception events of frames whose code comes from the
  traced source (compiled with the filename SOURCE_FILENAME), recorded only while the entry invocation is on the
  stack: from the call event of the first invocation of the entry function to that invocation's return event
  (included), on the thread that invoked it. Callees in the source are stepped into; library code is not traced, but
  source-defined callbacks called from library code are (a `key=` lambda). Generators: a resumption is a call (its
  action is the line of the yield it resumes at), a yield is a return with the yielded value. An exception
  propagating out of a frame gives that frame's exception frame then its return frame with value "None". An entry
  that is itself a generator function is traced up to its first yield (that is its invocation's return event).
  Comprehensions are their own frames on 3.11 (`<listcomp>`, with the iterator local ".0") and inlined on 3.12+
  (PEP 709); nothing special is done, and every result records the Python version ("python": "3.11"), so byte-exact
  expectations are per version.
- The action (`line`) is the source line as written (indentation kept, no newline; the source is traced without the
  entry marker). For a call it is the line at `frame.f_lineno`, except that a decorator line (starts with "@") is
  advanced to the line holding the `def` (or `class`) keyword; for other events the line at `frame.f_lineno`.
- Locals of call and line frames are `{name: repr string}` of `frame.f_locals` in its order (closure cells and free
  variables included, as f_locals has them). A repr string is `repr(value)` with memory addresses removed
  (" at 0x7f..." -> "") so traces are deterministic, cut to `max_repr` characters as `s[:max_repr - 3] + "..."`; a
  repr that raises becomes "<TYPE object (repr raised ERROR)>". list, tuple, dict, set, frozenset, str and bytes
  (exact types) are written by a bounded writer that stops after max_repr characters and gives the same text as
  repr() (so a 10**6-element list costs microseconds, and a value's text does not depend on its size; this replaces
  a reprlib fallback, whose sorted dict keys and elided strings would differ from repr). Return values and exception
  instances use the same repr ("ZeroDivisionError('division by zero')").
- Locals are diffed the way the release's resolver (`resolve_locals`) undoes: a call frame and the first call/line
  frame after a return frame carry full values; every later call/line frame writes ".." for a name whose repr
  string equals the one in the previous call/line frame (exception frames are transparent). A value whose repr is
  literally ".." is always written in full, and a reader cannot tell it from the marker.
- Limits truncate cleanly: more than `max_frames` frames or `wall_s` seconds (checked with time.monotonic at each
  event; the clock starts when tracing is switched on: before the program runs for trace_program, before the call
  is evaluated for trace_call) stop recording and stop the program by raising TraceLimitReached from the trace
  function, a BaseException so `except Exception:` cannot swallow it; status is "frame_limit" or "time_limit",
  `complete` is False, and the frames recorded so far are kept. It is raised only in frames of the source (raising
  inside threading or importlib would corrupt them). CPython removes a trace function that raises, so when user
  code swallows the exception (`except BaseException:`, bare `except:`), the exception re-installs the tracer when
  it is released and the next traced event raises it again; a handler that keeps it alive (`except BaseException as
  e: saved = e`) or a loop that catches it on every turn is stopped only by the sandbox. Code that produces no events
  (a loop in C; a loop in the source before the entry is first called, where only call events are watched) is
  likewise the sandbox's wall limit's job, not the tracer's.
- The recursion limit is raised by HEADROOM frames while tracing (also above a limit the program sets), because the
  trace function runs one frame deeper than the traced code; a program therefore gets its RecursionError that many
  frames later than untraced. At that point CPython cannot call the trace function either and removes it, so a
  program that reaches the recursion limit gets status "error" (frames up to its deepest call are kept).
- The traced code runs in this process, on this thread; threads it starts through `threading` are traced too (the
  entry is traced on the thread that first invokes it) and are joined before the result is made, as the interpreter
  would at exit. A run swaps process-wide state (sys.modules["__main__"], sys.argv, sys.stdin, the recursion limit)
  and restores it after, so runs in one process go one at a time.
- trace_program gives the program `stdin` as a text stream over bytes (`sys.stdin.buffer` works); `main` puts a
  job's stdin behind file descriptor 0 itself, so `open(0)` and `os.read(0, n)` read it too.

Result of `trace_call` / `trace_program` (a JSON-ready dict): {"tracer": TRACER_VERSION, "python": "3.11", "source",
"entry", "call" (None for a program), "status": "ok" | "exception" (the entry raised) | "frame_limit" | "time_limit"
| "no_call" (the entry was never invoked) | "error" (the code failed before the entry was called, or tracing was
lost; message in "error"), "complete": bool (the entry's return frame was recorded), "frames": [{"event", "line",
"lineno", "locals"} for call/line, {"event", "line", "lineno", "value"} for return/exception], "output": repr string
of the entry's return value or None, "exception": repr string of the exception that left the entry or None,
"error": str or None}. Frames feed `cwm_jax.traces.chat_frames` / `chat.render_trace`; render an incomplete trace
without its end token.
"""

from __future__ import annotations

import builtins
import dis
import functools
import io
import json
import linecache
import os
import re
import sys
import tempfile
import threading
import time
import types

TRACER_VERSION = 1
SOURCE_FILENAME = "<cwm-source>"
CALL_FILENAME = "<cwm-call>"
STATUSES = ("ok", "exception", "frame_limit", "time_limit", "no_call", "error")
DEFAULT_MAX_FRAMES = 1000
DEFAULT_MAX_REPR = 200
DEFAULT_WALL_S = 5.0
UNCHANGED = ".."

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_DEF_LINE = re.compile(r"\s*(async\s+def|def|class)\b")
_NEWLINE = re.compile(r"\r\n|\r|\n")
# A return event whose frame stopped on one of these returned normally; any other instruction means unwinding.
_NORMAL_EXIT = {dis.opmap[name] for name in ("RETURN_VALUE", "RETURN_CONST", "YIELD_VALUE") if name in dis.opmap}
# Stack frames kept free above the program's recursion limit for the trace function (called one frame deeper than
# the traced frame): without them a program reaching the limit would make the trace function fail, and CPython then
# removes it. The program's own RecursionError therefore comes this many frames later than without tracing.
HEADROOM = 50
_RECURSIVE = {list: "[...]", tuple: "(...)", dict: "{...}", set: "set(...)", frozenset: "frozenset(...)"}


class TraceLimitReached(BaseException):
    """Raised inside the traced program when a limit is reached; `status` is "frame_limit" or "time_limit"."""

    def __init__(self, status: str, tracer: _Tracer | None = None):
        super().__init__(status)
        self.status = status
        self.tracer = tracer

    def __del__(self):
        # Released by a user handler that swallowed it: trace again so the next line stops the program.
        tracer = self.tracer
        if tracer is not None:
            try:
                tracer.rearm()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------------------------
# Repr strings


class _Full(Exception):
    """The bounded writer has written enough."""


def _string_prefix_repr(s: str | bytes, need: int) -> str:
    # Text whose first `need` characters are those of repr(s) (addresses removed); repr picks its quote from the
    # whole string, so the prefix is written with a probe that forces the same quote.
    quote_is_double = ("'" in s and '"' not in s) if isinstance(s, str) else (b"'" in s and b'"' not in s)
    probe: str | bytes = "'" if quote_is_double else "'\""
    if isinstance(s, bytes):
        probe = probe.encode()
    size = need + 64
    while size < len(s):
        text = _ADDRESS.sub("", repr(s[:size] + probe))
        stable = len(text) - 4  # the probe's escaped characters and the closing quote
        if stable > need:
            return text[:stable]
        size *= 4
    return _ADDRESS.sub("", repr(s))


def _write(value, out: list[str], used: list[int], limit: int, path: set[int]) -> None:
    def put(text: str) -> None:
        out.append(text)
        used[0] += len(text)
        if used[0] > limit:
            raise _Full

    kind = type(value)
    if kind is str or kind is bytes:
        need = limit - used[0] + 1
        put(_ADDRESS.sub("", repr(value)) if len(value) <= need else _string_prefix_repr(value, need))
        return
    if kind not in _RECURSIVE:
        put(_ADDRESS.sub("", repr(value)))
        return
    if id(value) in path:
        put(_RECURSIVE[kind])
        return
    if not value:
        put({list: "[]", tuple: "()", dict: "{}", set: "set()", frozenset: "frozenset()"}[kind])
        return
    path.add(id(value))
    try:
        opening, closing = {list: ("[", "]"), tuple: ("(", ")"), dict: ("{", "}"), set: ("{", "}")}.get(
            kind, ("frozenset({", "})")
        )
        put(opening)
        for i, item in enumerate(value.items() if kind is dict else value):
            if i:
                put(", ")
            if kind is dict:
                _write(item[0], out, used, limit, path)
                put(": ")
                _write(item[1], out, used, limit, path)
            else:
                _write(item, out, used, limit, path)
        put("," + closing if kind is tuple and len(value) == 1 else closing)
    finally:
        path.discard(id(value))


def safe_repr(value, max_repr: int = DEFAULT_MAX_REPR) -> str:
    """The repr string of `value` as traces write it: repr() without memory addresses, cut to `max_repr` chars.

    Takes any value; returns a str of at most `max_repr` characters. Never raises for an ordinary exception in the
    value's __repr__ (the text then names the type and the error).
    """
    out: list[str] = []
    try:
        _write(value, out, [0], max_repr, set())
    except _Full:
        pass
    except Exception as e:
        out = [f"<{type(value).__name__} object (repr raised {type(e).__name__})>"]
    text = "".join(out)
    return text if len(text) <= max_repr else text[: max_repr - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# The tracer


class _Tracer:
    """State of one traced run; `global_trace` is installed with sys.settrace, `local_trace` on traced frames."""

    def __init__(self, source: str, entry_match, *, max_frames: int, max_repr: int, wall_s: float, diff: bool):
        self.lines = _NEWLINE.split(source)
        self.entry_match = entry_match  # code object -> bool
        self.max_frames, self.max_repr, self.diff = max_frames, max_repr, diff
        self.deadline = time.monotonic() + wall_s
        self.recursion_limit = sys.getrecursionlimit()
        self.frames: list[dict] = []
        self.prev_locals: dict[str, str] | None = None
        self.entry_frame = None
        self.thread: int | None = None
        self.done = False  # the entry invocation returned
        self.active = True  # cleared when the run is over, so late events and released exceptions do nothing
        self.limit: str | None = None
        self.limit_thread: int | None = None
        self.raised = False
        self.output: str | None = None
        self.exception: str | None = None

    # -- trace functions

    def global_trace(self, frame, event, arg):
        code = frame.f_code
        # Library code is neither traced nor interrupted (raising inside threading or importlib would corrupt them).
        if not self.active or code.co_filename != SOURCE_FILENAME:
            return None
        if self.limit is not None:
            self._stop(self.limit)
        if self.done:
            return None
        self._check_time()
        if self.entry_frame is None:
            if not self.entry_match(code):
                return None
            self.entry_frame, self.thread = frame, threading.get_ident()
        elif threading.get_ident() != self.thread:
            return None
        self._event(frame, event, arg)
        return self.local_trace

    def local_trace(self, frame, event, arg):
        if not self.active:
            return None
        if self.limit is not None:
            self._stop(self.limit)
        if self.done:
            return None
        self._check_time()
        self._event(frame, event, arg)
        if event == "return" and frame is self.entry_frame:
            self._finish(frame, arg)
            return None
        return self.local_trace

    # -- recording

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            self._stop("time_limit")
        if sys.getrecursionlimit() != self.recursion_limit:
            # The program set its own limit: keep the tracer's headroom above it.
            self.recursion_limit = sys.getrecursionlimit() + HEADROOM
            sys.setrecursionlimit(self.recursion_limit)

    def _stop(self, status: str):
        if self.limit is None:
            self.limit, self.limit_thread = status, threading.get_ident()
        # Not bound to a local: the traceback would hold this frame, keeping the exception alive past its handler.
        raise TraceLimitReached(self.limit, self)

    def _event(self, frame, event: str, arg) -> None:
        if len(self.frames) >= self.max_frames:
            self._stop("frame_limit")
        record = self._record(frame, event, arg)
        if event == "exception" and frame is self.entry_frame:
            self.exception = record["value"]
        self.frames.append(record)

    def _record(self, frame, event: str, arg) -> dict:
        code, lineno = frame.f_code, frame.f_lineno
        if event == "call":
            lineno = self._def_line(code, lineno)
        line = self.lines[lineno - 1] if lineno is not None and 0 < lineno <= len(self.lines) else ""
        lineno = lineno if lineno is not None else 0
        if event in ("call", "line"):
            prev = None if event == "call" or not self.diff else self.prev_locals
            full = {str(k): safe_repr(v, self.max_repr) for k, v in frame.f_locals.items()}
            written = full
            if prev is not None:
                written = {k: UNCHANGED if v != UNCHANGED and prev.get(k) == v else v for k, v in full.items()}
            self.prev_locals = full
            return {"event": event, "line": line, "lineno": lineno, "locals": written}
        if event == "return":
            value = safe_repr(arg, self.max_repr)
            self.prev_locals = None
        else:
            exc_type, exc, _ = arg
            value = safe_repr(exc if exc is not None else exc_type, self.max_repr)
        return {"event": event, "line": line, "lineno": lineno, "value": value}

    def _def_line(self, code, lineno: int | None) -> int | None:
        # A decorated def starts at its first decorator; the action is the line with the `def` itself.
        if lineno is None or lineno != code.co_firstlineno or code.co_name.startswith("<"):
            return lineno
        if not 0 < lineno <= len(self.lines) or not self.lines[lineno - 1].lstrip().startswith("@"):
            return lineno
        for i in range(lineno, len(self.lines)):
            if _DEF_LINE.match(self.lines[i]):
                return i + 1
        return lineno

    def _finish(self, frame, arg) -> None:
        self.done = True
        lasti = frame.f_lasti
        self.raised = lasti >= 0 and frame.f_code.co_code[lasti] not in _NORMAL_EXIT
        if not self.raised:
            self.output = safe_repr(arg, self.max_repr)
        sys.settrace(None)  # nothing more to record on this thread

    def rearm(self) -> None:
        """Re-install the trace functions after a limit (a user handler swallowed TraceLimitReached)."""
        if not self.active or self.limit is None or threading.get_ident() != self.limit_thread:
            return
        sys.settrace(self.global_trace)
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename == SOURCE_FILENAME:
                frame.f_trace = self.local_trace
            frame = frame.f_back


# ---------------------------------------------------------------------------------------------------------------
# Running


def _check_limits(max_frames, max_repr, wall_s) -> None:
    if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1:
        raise ValueError(f"max_frames must be an int >= 1, found {max_frames!r}")
    if not isinstance(max_repr, int) or isinstance(max_repr, bool) or max_repr < 4:
        raise ValueError(f"max_repr must be an int >= 4 (room for '...'), found {max_repr!r}")
    if not isinstance(wall_s, int | float) or isinstance(wall_s, bool) or not wall_s > 0:
        raise ValueError(f"wall_s must be a number > 0 (seconds), found {wall_s!r}")


def _compile_source(source: str):
    if not isinstance(source, str):
        raise ValueError(f"source must be a str, found {type(source).__name__}")
    try:
        # dont_inherit: the tracer's own `from __future__` imports must not change the traced code.
        return compile(source, SOURCE_FILENAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"source does not compile: {type(e).__name__}: {e}") from None


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _check_entry_defined(code: types.CodeType, entry: str) -> None:
    if not any(c.co_qualname == entry for c in _code_objects(code) if c is not code):
        defined = sorted({c.co_qualname for c in _code_objects(code) if c is not code and "<" not in c.co_qualname})
        raise ValueError(f"entry {entry!r} is not a function defined in the source; functions there: {defined}")


def _find_entry_code(namespace: dict, entry: str) -> types.CodeType:
    parts = entry.split(".")
    if parts[0] not in namespace:
        raise ValueError(f"entry {entry!r}: the source defines no global {parts[0]!r}")
    obj = namespace[parts[0]]
    for i, part in enumerate(parts[1:], 1):
        # Static lookup through the MRO, so descriptors (staticmethod, classmethod, property) are seen unwrapped.
        owner = next((k for k in getattr(obj, "__mro__", ()) if part in vars(k)), None)
        if owner is None:
            raise ValueError(f"entry {entry!r}: {'.'.join(parts[:i])} has no attribute {part!r} (a class expected)")
        obj = vars(owner)[part]
    for _ in range(100):  # unwrap decorators (functools.wraps), staticmethod/classmethod, partial, property
        if isinstance(obj, staticmethod | classmethod):
            obj = obj.__func__
        elif isinstance(obj, property) and obj.fget is not None:
            obj = obj.fget
        elif getattr(obj, "__wrapped__", None) is not None:
            obj = obj.__wrapped__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        else:
            break
    code = getattr(obj, "__code__", None)
    if not isinstance(code, types.CodeType) or code.co_filename != SOURCE_FILENAME:
        raise ValueError(
            f"entry {entry!r} is a {type(obj).__name__}, not a function defined in the source (a def was expected)"
        )
    return code


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _run(
    source: str,
    entry: str,
    call: str | None,
    stdin: str | None,
    *,
    max_frames: int,
    max_repr: int,
    wall_s: float,
    diff: bool,
) -> dict:
    _check_limits(max_frames, max_repr, wall_s)
    code = _compile_source(source)
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"entry must be a function name ('name' or 'Class.method'), found {entry!r}")
    if call is None:
        _check_entry_defined(code, entry)
    call_code = None
    if call is not None:
        if not isinstance(call, str):
            raise ValueError(f"call must be a str (a Python expression), found {type(call).__name__}")
        try:
            call_code = compile(call, CALL_FILENAME, "eval", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise ValueError(f"call {call!r} is not a Python expression: {e}") from None

    module_name = "__main__" if call is None else "__cwm_main__"
    module = types.ModuleType(module_name)
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    saved_main = sys.modules.get(module_name)
    saved_argv, saved_stdin, saved_limit = sys.argv, sys.stdin, sys.getrecursionlimit()
    saved_trace, saved_thread_trace, saved_hook = sys.gettrace(), threading.gettrace(), threading.excepthook
    saved_lines = linecache.cache.get(SOURCE_FILENAME)
    threads_before = set(threading.enumerate())

    def quiet_hook(args):
        # A thread stopped by a limit is part of the trace's outcome, not an error to print.
        if not (isinstance(args.exc_type, type) and issubclass(args.exc_type, TraceLimitReached)):
            saved_hook(args)

    tracer: _Tracer | None = None
    failure: BaseException | None = None
    try:
        sys.modules[module_name] = module
        linecache.cache[SOURCE_FILENAME] = (len(source), None, source.splitlines(True), SOURCE_FILENAME)
        threading.excepthook = quiet_hook
        if call is None:
            sys.argv = ["main.py"]
            if stdin is not None:
                # A text stream over bytes, like the real stdin: `sys.stdin.buffer` works, newlines are universal.
                sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8")
            sys.setrecursionlimit(saved_limit + HEADROOM)
            tracer = _Tracer(
                source,
                lambda c: c.co_qualname == entry and c.co_filename == SOURCE_FILENAME,
                max_frames=max_frames,
                max_repr=max_repr,
                wall_s=wall_s,
                diff=diff,
            )
            failure = _traced(tracer, lambda: exec(code, namespace))
            _join_new_threads(threads_before, tracer)
        else:
            try:
                exec(code, namespace)
            except BaseException as e:
                return _result(source, entry, call, None, error=f"the source raised {_describe(e)}")
            entry_code = _find_entry_code(namespace, entry)
            sys.setrecursionlimit(saved_limit + HEADROOM)
            tracer = _Tracer(
                source, lambda c: c is entry_code, max_frames=max_frames, max_repr=max_repr, wall_s=wall_s, diff=diff
            )
            failure = _traced(tracer, lambda: eval(call_code, namespace))
    finally:
        if tracer is not None:
            tracer.active = False
        sys.settrace(saved_trace)
        threading.settrace(saved_thread_trace)
        threading.excepthook = saved_hook
        sys.argv, sys.stdin = saved_argv, saved_stdin
        sys.setrecursionlimit(saved_limit)
        if saved_main is None:
            sys.modules.pop(module_name, None)
        else:
            sys.modules[module_name] = saved_main
        if saved_lines is None:
            linecache.cache.pop(SOURCE_FILENAME, None)
        else:
            linecache.cache[SOURCE_FILENAME] = saved_lines
    return _result(source, entry, call, tracer, failure=failure)


def _traced(tracer: _Tracer, run) -> BaseException | None:
    """Run `run()` with the tracer installed; returns the exception it raised, if any."""
    try:
        try:
            threading.settrace(tracer.global_trace)
            sys.settrace(tracer.global_trace)
            run()
        finally:
            # Before the exception is released: a released TraceLimitReached must not re-install the tracer.
            sys.settrace(None)
            threading.settrace(None)
            if tracer.done or tracer.limit is not None:
                tracer.active = False
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (None, 0):
            return None
        e.__traceback__ = None  # frames of the traced program need not outlive the run
        return e
    return None


def _join_new_threads(before: set, tracer: _Tracer) -> None:
    # The interpreter joins non-daemon threads at exit; a program that traces its entry in a thread relies on it.
    for thread in set(threading.enumerate()) - before:
        if not thread.daemon and thread is not threading.current_thread():
            thread.join(max(0.0, tracer.deadline - time.monotonic()) + 1.0)
    tracer.active = tracer.active and not any(t.is_alive() for t in set(threading.enumerate()) - before)


def _result(
    source: str,
    entry: str,
    call: str | None,
    tracer: _Tracer | None,
    *,
    failure: BaseException | None = None,
    error: str | None = None,
) -> dict:
    frames = tracer.frames if tracer is not None else []
    output = exception = None
    complete = False
    if tracer is None:
        status = "error"
    elif tracer.limit is not None:
        status = tracer.limit
    elif tracer.done:
        status, complete = ("exception" if tracer.raised else "ok"), True
        output, exception = tracer.output, tracer.exception if tracer.raised else None
        if tracer.raised and exception is None and failure is not None:
            exception = safe_repr(failure, tracer.max_repr)
    elif tracer.entry_frame is None:
        if failure is not None:
            status, error = "error", f"raised before the entry was called: {_describe(failure)}"
        else:
            status = "no_call"
    elif tracer.deadline < time.monotonic():
        status = "time_limit"  # the entry's thread was still running when the run was given up
    elif isinstance(failure, RecursionError):
        # At the limit CPython cannot call the trace function either and removes it: the unwinding is not seen.
        status = "error"
        error = f"the traced code reached the recursion limit, where tracing stops: {_describe(failure)}"
    else:
        status = "error"
        error = "the entry's return was not seen: the trace function was removed (the program reached the recursion "
        error += "limit or replaced the trace function) or the entry's thread was left running"
    return {
        "tracer": TRACER_VERSION,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "source": source,
        "entry": entry,
        "call": call,
        "status": status,
        "complete": complete,
        "frames": frames,
        "output": output,
        "exception": exception,
        "error": error,
    }


def trace_call(
    source: str,
    entry: str,
    call: str,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_repr: int = DEFAULT_MAX_REPR,
    wall_s: float = DEFAULT_WALL_S,
    diff: bool = True,
) -> dict:
    """Trace the first invocation of `entry` while evaluating the expression `call` (e.g. "f(3, 'ab')").

    `source` runs untraced as a fresh module (own globals, __name__ "__cwm_main__"), then `call` is evaluated in it
    with tracing on. `entry` is "name" or "Class.method", looked up in the module (decorators made with
    functools.wraps, staticmethod and classmethod are unwrapped). With `diff` False every frame has full locals.
    Returns the result dict (module docstring: tracer, python, source, entry, call, status, complete, frames,
    output, exception, error). Exceptions of the traced code are reported in it; raises ValueError when the
    source or call does not compile, the entry is not a function of the source, or a limit is not valid.
    """
    return _run(source, entry, call, None, max_frames=max_frames, max_repr=max_repr, wall_s=wall_s, diff=diff)


def trace_program(
    source: str,
    entry: str,
    *,
    stdin: str | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_repr: int = DEFAULT_MAX_REPR,
    wall_s: float = DEFAULT_WALL_S,
    diff: bool = True,
) -> dict:
    """Run `source` as __main__ (sys.argv ["main.py"]) and trace the first invocation of `entry`.

    With `stdin` (a str) the program reads it through sys.stdin (a text stream with a `.buffer`; reading file
    descriptor 0 itself, as `open(0)` does, still reads the real stdin: `main` puts the job's stdin there); without it
    the program reads the real stdin. Its prints go to the real stdout. `entry` is matched by qualified name ("name"
    or "Class.method"). Returns the result dict (call
    None); status "error" when the program failed before calling the entry, "no_call" when it ended without calling
    it. Raises ValueError when the source does not compile or defines no function `entry`, or a limit is not valid.
    """
    if stdin is not None and not isinstance(stdin, str):
        raise ValueError(f"stdin must be a str or None, found {type(stdin).__name__}")
    return _run(source, entry, None, stdin, max_frames=max_frames, max_repr=max_repr, wall_s=wall_s, diff=diff)


def resolve_locals(frames: list[dict]) -> list[dict | None]:
    """The release's resolution of ".." in `frames` (result frames: dicts with "event" and "locals" or "value").

    Returns one entry per frame: for call/line frames their full locals, for return/exception frames the resolved
    locals of the previous frame (None for a first frame, {} when the previous frame is a return or exception frame,
    which has no locals: the release looks back one frame only). A ".." is taken from the nearest earlier frame whose
    locals have the name with another value; the walk stops after a call frame (whose locals are checked) or at a
    return frame. A ".." that cannot be resolved stays "..".
    """
    resolved: list[dict | None] = []
    for i, frame in enumerate(frames):
        j = i if frame["event"] in ("call", "line") else i - 1
        if j < 0:
            resolved.append(None)
            continue
        out = dict(frames[j].get("locals") or {})
        for name, value in out.items():
            if value != UNCHANGED:
                continue
            for k in range(j - 1, -1, -1):
                earlier = frames[k]
                found = (earlier.get("locals") or {}).get(name, UNCHANGED)
                if found != UNCHANGED:
                    out[name] = found
                    break
                if earlier["event"] in ("call", "return"):
                    break
        resolved.append(out)
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Script entry

_USAGE = "usage: python tracer.py JOB.json OUT.json"
_LIMIT_KEYS = {"max_frames", "max_repr", "wall_s"}


def _read_job(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    if not isinstance(job, dict):
        raise ValueError(f"expected a JSON object, found {type(job).__name__}")
    if job.get("mode") not in ("call", "program"):
        raise ValueError(f"'mode' must be 'call' or 'program', found {job.get('mode')!r}")
    for key in ("source", "entry") + (("call",) if job["mode"] == "call" else ()):
        if not isinstance(job.get(key), str):
            raise ValueError(f"{key!r} must be a string, found {type(job.get(key)).__name__}")
    if job["mode"] == "program" and not isinstance(job.get("stdin"), str | None):
        raise ValueError(f"'stdin' must be a string or null, found {type(job['stdin']).__name__}")
    limits = job.get("limits") or {}
    if not isinstance(limits, dict) or not set(limits) <= _LIMIT_KEYS:
        found = sorted(limits) if isinstance(limits, dict) else type(limits).__name__
        raise ValueError(f"'limits' must be an object with keys among {sorted(_LIMIT_KEYS)}, found {found}")
    _check_limits(
        limits.get("max_frames", DEFAULT_MAX_FRAMES),
        limits.get("max_repr", DEFAULT_MAX_REPR),
        limits.get("wall_s", DEFAULT_WALL_S),
    )
    return job


def _trace_program_with_stdin(job: dict, folder: str, limits: dict) -> dict:
    # The job's stdin goes behind file descriptor 0 itself, so input(), sys.stdin.buffer, open(0) and os.read(0, n)
    # all read it; a file rather than a pipe, which would block on a text larger than its buffer.
    try:
        saved_fd = os.dup(0)
    except OSError:  # started with fd 0 closed
        saved_fd = None
    saved_stdin = sys.stdin
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(job["stdin"].encode("utf-8"))
            f.seek(0)
            os.dup2(f.fileno(), 0)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        return trace_program(job["source"], job["entry"], **limits)
    finally:
        # main() may be called in-process (tests): give the caller its stdin back.
        if saved_fd is None:
            os.close(0)
        else:
            os.dup2(saved_fd, 0)
            os.close(saved_fd)
        sys.stdin = saved_stdin


def main(argv: list[str] | None = None) -> int:
    """Script entry: `python tracer.py JOB.json OUT.json`.

    JOB is {"mode": "call" | "program", "source", "entry", "call" (call mode), "stdin" (program mode, optional: the
    real stdin is read without it), "limits": {"max_frames", "max_repr", "wall_s"} (optional)}. Writes the result
    dict as JSON to OUT.json (through OUT.json.tmp and os.replace). Returns 0 when OUT.json was written, 2 for a bad
    job (unreadable file, wrong fields, source that does not compile, entry not defined; message on stderr).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 2:
        print(f"{_USAGE} (expected 2 arguments, found {len(args)})", file=sys.stderr)
        return 2
    job_path, out_path = args[0], os.path.abspath(args[1])  # absolute: the program may change directory
    try:
        job = _read_job(job_path)
        limits = job.get("limits") or {}
        if job["mode"] == "call":
            result = trace_call(job["source"], job["entry"], job["call"], **limits)
        elif job.get("stdin") is not None:
            result = _trace_program_with_stdin(job, os.path.dirname(out_path), limits)
        else:
            result = trace_program(job["source"], job["entry"], **limits)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        print(f"tracer: bad job {job_path}: {e}", file=sys.stderr)
        return 2
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # A thread of the program is still running (given up on at the wall limit): do not wait for it at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
