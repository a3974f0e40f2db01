"""The execution tracer (cwm_jax/traces/tracer.py): events, locals and their diffs, limits, and its script entry."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from cwm_jax import chat
from cwm_jax.traces import chat_frames, resolve_locals, trace_call, trace_program, tracer

PY311 = sys.version_info[:2] == (3, 11)


def rendered(result: dict) -> str:
    return chat.segments_to_text(chat.render_trace(chat_frames(result["frames"])))


def events(result: dict) -> list[str]:
    return [f["event"] for f in result["frames"]]


# Programs traced by the tests below; every one also goes through the resolution and parse round-trip checks.
SIMPLE = "def f(x):\n    y = x + 1\n    return y * 2\n"
LOOP = (
    "def add(a, b):\n"
    "    return a + b\n"
    "\n"
    "def f(n):\n"
    "    total = 0\n"
    "    for i in range(n):\n"
    "        total = add(total, i)\n"
    "    return total\n"
)
PARSE = "def parse(s):\n    try:\n        n = int(s)\n    except ValueError as e:\n        n = len(s)\n    return n\n"
FACT = "def fact(n):\n    if n <= 1:\n        return 1\n    return n * fact(n - 1)\n"
GEN = "def gen(n):\n    for i in range(n):\n        yield i * i\n\ndef f(n):\n    return list(gen(n))\n"
UNCAUGHT = "def g(x):\n    return 1 / x\n\ndef f(x):\n    y = g(x)\n    return y\n"
FINALLY = "def f():\n    try:\n        raise KeyError('k')\n    finally:\n        x = 1\n"
CLASS = (
    "import functools\n"
    "\n"
    "def logged(fn):\n"
    "    @functools.wraps(fn)\n"
    "    def wrapper(*args):\n"
    "        return fn(*args)\n"
    "    return wrapper\n"
    "\n"
    "class Acc:\n"
    "    def __init__(self):\n"
    "        self.items = []\n"
    "\n"
    "    def add(self, x):\n"
    "        self.items.append(x)\n"
    "        return self.size()\n"
    "\n"
    "    def size(self):\n"
    "        return len(self.items)\n"
    "\n"
    "    @classmethod\n"
    "    @logged\n"
    "    def make(cls, *xs):\n"
    "        acc = cls()\n"
    "        for x in xs:\n"
    "            acc.add(x)\n"
    "        return acc.items\n"
)
CLOSURE = (
    "def f(x):\n"
    "    count = 0\n"
    "    def inner(y):\n"
    "        nonlocal count\n"
    "        count += 1\n"
    "        return x + y\n"
    "    return inner(2) + inner(3), count\n"
)
COMPREHENSION = "def f(xs):\n    ys = [x * 2 for x in xs if x]\n    return sorted(ys, key=lambda y: -y)\n"
UNPRINTABLE = "class Bad:\n    def __repr__(self):\n        raise RuntimeError('no')\n\n"
UNPRINTABLE += "def f():\n    b = Bad()\n    return b\n"
HUGE = "def f(n):\n    big = list(range(n))\n    text = 'ab' * n\n"
HUGE += "    table = dict.fromkeys(range(n))\n    return len(big)\n"
SPIN = "def f():\n    x = 0\n    while True:\n        x += 1\n"

CASES = {
    "simple": (SIMPLE, "f", "f(3)", {}),
    "loop": (LOOP, "f", "f(3)", {}),
    "parse": (PARSE, "parse", "parse('x')", {}),
    "fact": (FACT, "fact", "fact(4)", {}),
    "gen": (GEN, "f", "f(3)", {}),
    "uncaught": (UNCAUGHT, "f", "f(0)", {}),
    "finally": (FINALLY, "f", "f()", {}),
    "method": (CLASS, "Acc.add", "Acc().add(5)", {}),
    "classmethod": (CLASS, "Acc.make", "Acc.make(1, 2)", {}),
    "closure": (CLOSURE, "f", "f(1)", {}),
    "comprehension": (COMPREHENSION, "f", "f([0, 1, 2])", {}),
    "unprintable": (UNPRINTABLE, "f", "f()", {}),
    "huge": (HUGE, "f", "f(10**5)", {}),
    "spin": (SPIN, "f", "f()", {"max_frames": 60}),
}


# ---------------------------------------------------------------------------------------------------------------
# Byte-exact traces of small programs (worked out by hand from settrace's events)


def test_simple_function_byte_exact():
    result = trace_call(SIMPLE, "f", "f(3)")
    assert rendered(result) == (
        '<|call_sep|>{"x": "3"}<|action_sep|>def f(x):<|frame_sep|>'
        '<|line_sep|>{"x": ".."}<|action_sep|>    y = x + 1<|frame_sep|>'
        '<|line_sep|>{"x": "..", "y": "4"}<|action_sep|>    return y * 2<|frame_sep|>'
        '<|return_sep|><|action_sep|>    return y * 2<|arg_sep|>"8"<|frame_sep|>'
        "<|end_of_text|>"
    )
    assert result["status"] == "ok" and result["complete"] and result["output"] == "8"
    assert [f["lineno"] for f in result["frames"]] == [1, 2, 3, 3]
    assert result["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert result["tracer"] == tracer.TRACER_VERSION
    assert (result["source"], result["entry"], result["call"]) == (SIMPLE, "f", "f(3)")
    assert result["exception"] is None and result["error"] is None


def test_callee_and_loop_byte_exact():
    # The loop line is revisited per iteration; after the callee's return the caller's locals are written in full.
    result = trace_call(LOOP, "f", "f(2)")
    assert rendered(result) == (
        '<|call_sep|>{"n": "2"}<|action_sep|>def f(n):<|frame_sep|>'
        '<|line_sep|>{"n": ".."}<|action_sep|>    total = 0<|frame_sep|>'
        '<|line_sep|>{"n": "..", "total": "0"}<|action_sep|>    for i in range(n):<|frame_sep|>'
        '<|line_sep|>{"n": "..", "total": "..", "i": "0"}<|action_sep|>        total = add(total, i)<|frame_sep|>'
        '<|call_sep|>{"a": "0", "b": "0"}<|action_sep|>def add(a, b):<|frame_sep|>'
        '<|line_sep|>{"a": "..", "b": ".."}<|action_sep|>    return a + b<|frame_sep|>'
        '<|return_sep|><|action_sep|>    return a + b<|arg_sep|>"0"<|frame_sep|>'
        '<|line_sep|>{"n": "2", "total": "0", "i": "0"}<|action_sep|>    for i in range(n):<|frame_sep|>'
        '<|line_sep|>{"n": "..", "total": "..", "i": "1"}<|action_sep|>        total = add(total, i)<|frame_sep|>'
        '<|call_sep|>{"a": "0", "b": "1"}<|action_sep|>def add(a, b):<|frame_sep|>'
        '<|line_sep|>{"a": "..", "b": ".."}<|action_sep|>    return a + b<|frame_sep|>'
        '<|return_sep|><|action_sep|>    return a + b<|arg_sep|>"1"<|frame_sep|>'
        '<|line_sep|>{"n": "2", "total": "1", "i": "1"}<|action_sep|>    for i in range(n):<|frame_sep|>'
        '<|line_sep|>{"n": "..", "total": "..", "i": ".."}<|action_sep|>    return total<|frame_sep|>'
        '<|return_sep|><|action_sep|>    return total<|arg_sep|>"1"<|frame_sep|>'
        "<|end_of_text|>"
    )


def test_caught_exception_byte_exact():
    # Repr strings are JSON-escaped inside the locals object and the value; `e` is unbound again after the handler.
    result = trace_call(PARSE, "parse", "parse('x')")
    error = "ValueError(\\\"invalid literal for int() with base 10: 'x'\\\")"
    assert rendered(result) == (
        '<|call_sep|>{"s": "\'x\'"}<|action_sep|>def parse(s):<|frame_sep|>'
        '<|line_sep|>{"s": ".."}<|action_sep|>    try:<|frame_sep|>'
        '<|line_sep|>{"s": ".."}<|action_sep|>        n = int(s)<|frame_sep|>'
        f'<|exception_sep|><|action_sep|>        n = int(s)<|arg_sep|>"{error}"<|frame_sep|>'
        '<|line_sep|>{"s": ".."}<|action_sep|>    except ValueError as e:<|frame_sep|>'
        f'<|line_sep|>{{"s": "..", "e": "{error}"}}<|action_sep|>        n = len(s)<|frame_sep|>'
        '<|line_sep|>{"s": "..", "n": "1"}<|action_sep|>    return n<|frame_sep|>'
        '<|return_sep|><|action_sep|>    return n<|arg_sep|>"1"<|frame_sep|>'
        "<|end_of_text|>"
    )
    assert result["status"] == "ok" and result["output"] == "1" and result["exception"] is None


# ---------------------------------------------------------------------------------------------------------------
# Every program: ".." resolves to the full locals, and the rendered text parses back


@pytest.mark.parametrize("name", sorted(CASES))
def test_resolving_diffs_gives_full_locals(name):
    source, entry, call, limits = CASES[name]
    diffed = trace_call(source, entry, call, **limits)
    full = trace_call(source, entry, call, diff=False, **limits)
    assert diffed["status"] == full["status"] and len(diffed["frames"]) == len(full["frames"]) > 0
    resolved = resolve_locals(diffed["frames"])
    for i, (d, f, r) in enumerate(zip(diffed["frames"], full["frames"], resolved, strict=True)):
        assert {k: v for k, v in d.items() if k != "locals"} == {k: v for k, v in f.items() if k != "locals"}, i
        if d["event"] in ("call", "line"):
            assert r == f["locals"], (name, i)
            assert tracer.UNCHANGED not in r.values(), (name, i)
        else:
            # The release looks back one frame only: after a return or exception frame that gives {}.
            assert r == (full["frames"][i - 1].get("locals", {}) if i else None), (name, i)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_trace_parses_back(name):
    source, entry, call, limits = CASES[name]
    result = trace_call(source, entry, call, **limits)
    frames = chat_frames(result["frames"])
    assert chat.parse_trace(rendered(result)) == frames
    prompt = chat.segments_to_text(chat.render_trace_prompt(source, entry))
    assert prompt.startswith("<|begin_of_text|><|trace_context_start|>") and chat.TRACE_MARKER in prompt


def test_resolver_follows_the_release_algorithm():
    frames = [
        {"event": "call", "line": "c", "locals": {"a": "1"}},
        {"event": "line", "line": "l1", "locals": {"a": "..", "b": "2"}},
        {"event": "exception", "line": "l1", "value": "E()"},  # transparent
        {"event": "line", "line": "l2", "locals": {"a": "..", "b": ".."}},
        {"event": "return", "line": "l2", "value": "None"},
        {"event": "line", "line": "l3", "locals": {"a": "..", "b": "3"}},  # the walk stops at the return
        {"event": "call", "line": "c", "locals": {"z": ".."}},  # a call's own ".." looks back until a call/return
        {"event": "line", "line": "l4", "locals": {"z": ".."}},  # the call frame ends the walk
    ]
    assert resolve_locals(frames) == [
        {"a": "1"},
        {"a": "1", "b": "2"},
        {"a": "1", "b": "2"},
        {"a": "1", "b": "2"},
        {"a": "1", "b": "2"},
        {"a": "..", "b": "3"},
        {"z": ".."},
        {"z": ".."},
    ]
    assert resolve_locals([{"event": "return", "line": "x", "value": "1"}]) == [None]


def test_a_repr_of_two_dots_is_never_diffed():
    source = "class D:\n    def __repr__(self):\n        return '..'\n\n"
    source += "def f():\n    d = D()\n    x = 1\n    return x\n"
    frames = trace_call(source, "f", "f()")["frames"]
    assert [f["locals"] for f in frames if f["event"] == "line"] == [{}, {"d": ".."}, {"d": "..", "x": "1"}]


# ---------------------------------------------------------------------------------------------------------------
# Recursion, generators, exceptions, classes, closures, comprehensions


def test_recursion_nests_call_and_return_frames():
    result = trace_call(FACT, "fact", "fact(3)")
    assert result["status"] == "ok" and result["output"] == "6"
    assert events(result) == ["call", "line", "line"] * 2 + ["call", "line", "line", "return", "return", "return"]
    assert [f["locals"]["n"] for f in result["frames"] if f["event"] == "call"] == ["3", "2", "1"]
    assert [f["value"] for f in result["frames"] if f["event"] == "return"] == ["1", "2", "6"]
    assert [f["line"] for f in result["frames"][-3:]] == ["        return 1"] + ["    return n * fact(n - 1)"] * 2


def test_generator_resumptions_are_calls_and_yields_are_returns():
    result = trace_call(GEN, "f", "f(2)")
    assert result["output"] == "[0, 1]"
    gen = [f for f in result["frames"][2:-1]]
    assert [f["event"] for f in gen] == ["call", "line", "line", "return"] + ["call", "line", "line", "return"] + [
        "call",
        "line",
        "return",
    ]
    assert [f["value"] for f in gen if f["event"] == "return"] == ["0", "1", "None"]
    # The first call enters at the def; a resumption at the yield it was suspended on, with its locals.
    calls = [f for f in gen if f["event"] == "call"]
    assert [f["line"] for f in calls] == ["def gen(n):", "        yield i * i", "        yield i * i"]
    assert [f["locals"] for f in calls] == [{"n": "2"}, {"n": "2", "i": "0"}, {"n": "2", "i": "1"}]


def test_uncaught_exception_gives_exception_then_return_frames():
    result = trace_call(UNCAUGHT, "f", "f(0)")
    zde = "ZeroDivisionError('division by zero')"
    assert result["status"] == "exception" and result["complete"]
    assert result["exception"] == zde and result["output"] is None
    assert events(result) == ["call", "line", "call", "line", "exception", "return", "exception", "return"]
    for f in result["frames"][4:]:
        assert f["value"] == (zde if f["event"] == "exception" else "None")
    assert [f["line"] for f in result["frames"][-2:]] == ["    y = g(x)"] * 2


def test_exception_through_finally_is_reported_as_raised():
    result = trace_call(FINALLY, "f", "f()")
    assert result["status"] == "exception" and result["exception"] == "KeyError('k')"
    assert events(result) == ["call", "line", "line", "exception", "line", "return"]
    assert result["frames"][-1]["value"] == "None"
    # Caught and replaced by a normal return: status ok.
    swallowed = "def f():\n    try:\n        raise KeyError('k')\n    finally:\n        return 2\n"
    result = trace_call(swallowed, "f", "f()")
    assert result["status"] == "ok" and result["output"] == "2" and "exception" in events(result)


def test_methods_and_classes():
    result = trace_call(CLASS, "Acc.add", "Acc().add(5)")
    assert result["status"] == "ok" and result["output"] == "1"
    first = result["frames"][0]
    assert first["line"] == "    def add(self, x):"
    assert first["locals"] == {"self": "<__cwm_main__.Acc object>", "x": "5"}  # no memory address
    calls = [f["line"] for f in result["frames"] if f["event"] == "call"]
    assert calls == ["    def add(self, x):", "    def size(self):"]
    # A classmethod wrapped by a functools.wraps decorator: unwrapped to find it, its def line (not a decorator's).
    result = trace_call(CLASS, "Acc.make", "Acc.make(1, 2)")
    assert result["status"] == "ok" and result["output"] == "[1, 2]"
    assert result["frames"][0]["line"] == "    def make(cls, *xs):"
    assert result["frames"][0]["locals"] == {"cls": "<class '__cwm_main__.Acc'>", "xs": "(1, 2)"}
    called = [f["line"].strip() for f in result["frames"] if f["event"] == "call"]
    assert called == ["def make(cls, *xs):", "def __init__(self):"] + ["def add(self, x):", "def size(self):"] * 2


def test_closures_show_free_variables():
    result = trace_call(CLOSURE, "f", "f(1)")
    assert result["status"] == "ok" and result["output"] == "(7, 2)"
    inner_calls = [f for f in result["frames"] if f["event"] == "call"][1:]
    assert [f["line"] for f in inner_calls] == ["    def inner(y):"] * 2
    assert inner_calls[0]["locals"] == {"y": "2", "count": "0", "x": "1"}
    assert inner_calls[1]["locals"] == {"y": "3", "count": "1", "x": "1"}


def test_comprehensions_and_library_callbacks():
    result = trace_call(COMPREHENSION, "f", "f([0, 1, 2])")
    assert result["status"] == "ok" and result["output"] == "[4, 2]"
    calls = [f for f in result["frames"] if f["event"] == "call"]
    lambdas = [f for f in calls if f["line"] == "    return sorted(ys, key=lambda y: -y)"]
    assert [f["locals"] for f in lambdas] == [{"y": "2"}, {"y": "4"}]  # called by sorted(), a C function
    listcomps = [f for f in calls if f["line"] == "    ys = [x * 2 for x in xs if x]"]
    if sys.version_info >= (3, 12):
        assert listcomps == []  # PEP 709: inlined into f
    else:
        assert [f["locals"] for f in listcomps] == [{".0": "<list_iterator object>"}]


# ---------------------------------------------------------------------------------------------------------------
# Values


def test_unprintable_values():
    result = trace_call(UNPRINTABLE, "f", "f()")
    text = "<Bad object (repr raised RuntimeError)>"
    assert result["status"] == "ok" and result["output"] == text
    assert result["frames"][2]["locals"] == {"b": text}


def test_huge_values_are_cut_fast():
    start = time.perf_counter()
    result = trace_call(HUGE, "f", "f(10**6)", max_repr=100)
    assert time.perf_counter() - start < 3.0  # mostly building the values; their reprs are bounded
    last = resolve_locals(result["frames"])[-2]
    assert last["big"] == repr(list(range(40)))[:97] + "..."
    assert last["text"] == "'" + "ab" * 48 + "..."
    assert last["table"] == repr(dict.fromkeys(range(30)))[:97] + "..."
    assert all(len(v) <= 100 for f in result["frames"] for v in f.get("locals", {}).values())


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "it's",
        "say \"hi\" and 'bye'",
        "tab\there\n" * 50,
        "x" * 1000 + "'",
        b"\x00'" * 300,
        [1, [2, (3,)], {"k": {4, 5}}, frozenset(), set(), (), 1.5, None] * 20,
        {i: str(i) * i for i in range(30)},
        frozenset({"a"}),
    ],
)
def test_bounded_repr_equals_repr(value):
    for max_repr in (4, 20, 200, 5000):
        text = repr(value)
        assert tracer.safe_repr(value, max_repr) == (text if len(text) <= max_repr else text[: max_repr - 3] + "...")


def test_repr_of_recursive_containers_and_addresses():
    cycle = [1]
    cycle.append(cycle)
    assert tracer.safe_repr(cycle) == "[1, [...]]"
    assert tracer.safe_repr([object()]) == "[<object object>]"
    assert tracer.safe_repr(object(), 10) == "<object..."


# ---------------------------------------------------------------------------------------------------------------
# Limits


def test_infinite_loop_stopped_by_frame_limit():
    result = trace_call(SPIN, "f", "f()", max_frames=50)
    assert result["status"] == "frame_limit" and not result["complete"]
    assert len(result["frames"]) == 50 and result["output"] is None and result["exception"] is None
    assert result["frames"][-1]["line"] in ("    while True:", "        x += 1")


def test_infinite_loop_stopped_by_time_limit():
    start = time.perf_counter()
    result = trace_call(SPIN, "f", "f()", max_frames=10**9, wall_s=0.2)
    assert result["status"] == "time_limit" and not result["complete"]
    assert 0.2 <= time.perf_counter() - start < 2.0
    assert len(result["frames"]) > 10


def test_limit_is_not_caught_by_except_exception(capsys):
    source = "def f():\n    try:\n        x = 0\n        while True:\n            x += 1\n    except Exception:\n"
    source += "        print('caught')\n        return -1\n"
    result = trace_call(source, "f", "f()", max_frames=30)
    assert result["status"] == "frame_limit" and len(result["frames"]) == 30
    assert "caught" not in capsys.readouterr().out


def test_swallowed_limit_is_raised_again(capsys):
    # A handler that swallows the limit lets the program run on; the next traced line raises it again.
    source = (
        "def f():\n"
        "    try:\n"
        "        while True:\n"
        "            pass\n"
        "    except BaseException:\n"
        "        print('swallowed')\n"
        "    y = 0\n"
        "    while True:\n"
        "        y += 1\n"
    )
    result = trace_call(source, "f", "f()", max_frames=20, wall_s=2.0)
    assert result["status"] == "frame_limit" and len(result["frames"]) == 20
    assert capsys.readouterr().out == "swallowed\n"
    assert all(f.get("locals", {}).get("y") is None for f in result["frames"])  # nothing recorded after the limit


def test_limit_in_a_callee_stops_the_whole_program():
    source = "def spin():\n    while True:\n        pass\n\ndef f():\n    try:\n        spin()\n    finally:\n"
    source += "        z = 1\n"
    result = trace_call(source, "f", "f()", max_frames=25)
    assert result["status"] == "frame_limit" and len(result["frames"]) == 25


def test_recursion_near_and_past_the_limit():
    before = sys.getrecursionlimit()
    deep = "def down(n):\n    return 0 if n == 0 else 1 + down(n - 1)\n"
    result = trace_call(deep, "down", "down(300)", max_frames=10**6)
    assert result["status"] == "ok" and result["output"] == "300"
    endless = "def down(n):\n    return down(n + 1)\n"
    result = trace_call(endless, "down", "down(0)", max_frames=10**6)
    assert result["status"] == "error" and "recursion limit" in result["error"] and not result["complete"]
    assert len(result["frames"]) > 1000
    assert sys.getrecursionlimit() == before


def test_limits_are_validated():
    for bad in ({"max_frames": 0}, {"max_repr": 3}, {"wall_s": 0}, {"max_frames": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            trace_call(SIMPLE, "f", "f(1)", **bad)


# ---------------------------------------------------------------------------------------------------------------
# Statuses and errors


def test_entry_not_found_and_syntax_errors():
    with pytest.raises(ValueError, match="'g'"):
        trace_call(SIMPLE, "g", "g(1)")
    with pytest.raises(ValueError, match="'Acc.nope'"):
        trace_call(CLASS, "Acc.nope", "1")
    with pytest.raises(ValueError, match="not a function defined in the source"):
        trace_call("f = len\n", "f", "f([])")
    with pytest.raises(ValueError, match="does not compile"):
        trace_call("def f(:\n    pass\n", "f", "f()")
    with pytest.raises(ValueError, match="not a Python expression"):
        trace_call(SIMPLE, "f", "f(")
    with pytest.raises(ValueError, match="'main'"):
        trace_program(SIMPLE, "main")
    with pytest.raises(ValueError, match="does not compile"):
        trace_program("print(\n", "main")


def test_no_call_and_error_statuses():
    result = trace_call(SIMPLE + "def g():\n    return 1\n", "f", "g()")
    assert result["status"] == "no_call" and result["frames"] == [] and not result["complete"]
    result = trace_call(SIMPLE + "raise RuntimeError('boom')\n", "f", "f(1)")
    assert result["status"] == "error" and "RuntimeError: boom" in result["error"]
    result = trace_call(SIMPLE, "f", "undefined(1)")
    assert result["status"] == "error" and "NameError" in result["error"]
    result = trace_program("def main():\n    pass\nraise SystemExit(3)\n", "main")
    assert result["status"] == "error" and "SystemExit: 3" in result["error"]
    result = trace_program("import sys\ndef main():\n    pass\nsys.exit(0)\n", "main")
    assert result["status"] == "no_call"


def test_only_the_first_invocation_is_traced():
    result = trace_call(SIMPLE, "f", "f(1) + f(2)")
    assert result["output"] == "4" and result["frames"][0]["locals"] == {"x": "1"} and len(result["frames"]) == 4


# ---------------------------------------------------------------------------------------------------------------
# Programs


PROGRAM = "def main():\n    n = int(input())\n    print(n * 2)\nmain()\n"


def test_program_with_stdin(capsys):
    result = trace_program(PROGRAM, "main", stdin="21\n")
    assert capsys.readouterr().out == "42\n"
    assert result["status"] == "ok" and result["call"] is None and result["output"] == "None"
    assert rendered(result) == (
        "<|call_sep|>{}<|action_sep|>def main():<|frame_sep|>"
        "<|line_sep|>{}<|action_sep|>    n = int(input())<|frame_sep|>"
        '<|line_sep|>{"n": "21"}<|action_sep|>    print(n * 2)<|frame_sep|>'
        '<|return_sep|><|action_sep|>    print(n * 2)<|arg_sep|>"None"<|frame_sep|>'
        "<|end_of_text|>"
    )


def test_program_stdin_has_a_buffer(capsys):
    source = (
        "import sys\ndef main():\n    data = sys.stdin.buffer.read().split()\n    print(sum(map(int, data)))\nmain()\n"
    )
    result = trace_program(source, "main", stdin="1 2\r\n3\n")
    assert result["status"] == "ok" and capsys.readouterr().out == "6\n"
    assert result["frames"][2]["locals"] == {"data": "[b'1', b'2', b'3']"}


def test_program_runs_as_main_and_traces_its_thread(capsys):
    source = (
        "import sys, threading\n"
        "class Solver:\n"
        "    def solve(self, n):\n"
        "        return n + 1\n"
        "def main():\n"
        "    print(__name__, sys.argv, Solver().solve(int(sys.stdin.readline())))\n"
        "if __name__ == '__main__':\n"
        "    sys.setrecursionlimit(10**5)\n"
        "    threading.Thread(target=main).start()\n"
    )
    before = sys.getrecursionlimit()
    result = trace_program(source, "Solver.solve", stdin="4\n")
    assert capsys.readouterr().out == "__main__ ['main.py'] 5\n"
    assert result["status"] == "ok" and result["output"] == "5" and events(result) == ["call", "line", "return"]
    assert sys.getrecursionlimit() == before


# ---------------------------------------------------------------------------------------------------------------
# Script entry


def test_main_round_trip(tmp_path, capsys):
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"mode": "call", "source": SIMPLE, "entry": "f", "call": "f(3)"}))
    assert tracer.main([str(job), str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(trace_call(SIMPLE, "f", "f(3)")))
    assert not (tmp_path / "out.json.tmp").exists()

    # A line frame comes before its line runs: stopped at the print's frame, the print does not happen.
    spec = {"mode": "program", "source": PROGRAM, "entry": "main", "stdin": "5\n", "limits": {"max_frames": 2}}
    job.write_text(json.dumps(spec))
    assert tracer.main([str(job), str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "frame_limit" and len(result["frames"]) == 2 and capsys.readouterr().out == ""
    spec["limits"] = {}
    job.write_text(json.dumps(spec))
    assert tracer.main([str(job), str(out)]) == 0
    assert json.loads(out.read_text())["status"] == "ok" and capsys.readouterr().out == "10\n"


@pytest.mark.parametrize(
    "spec, why",
    [
        ({"mode": "run", "source": "", "entry": "f"}, "'mode'"),
        ({"mode": "call", "source": SIMPLE, "entry": "f"}, "'call'"),
        ({"mode": "call", "source": SIMPLE, "entry": "f", "call": "f(1)", "limits": {"frames": 1}}, "'limits'"),
        ({"mode": "call", "source": SIMPLE, "entry": "f", "call": "f(1)", "limits": {"wall_s": -1}}, "wall_s"),
        ({"mode": "call", "source": "def f(:", "entry": "f", "call": "f(1)"}, "does not compile"),
        ({"mode": "program", "source": SIMPLE, "entry": "f", "stdin": 3}, "'stdin'"),
        ([1, 2], "JSON object"),
    ],
)
def test_main_rejects_bad_jobs(tmp_path, capsys, spec, why):
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps(spec))
    assert tracer.main([str(job), str(out)]) == 2
    assert why in capsys.readouterr().err and not out.exists()
    assert tracer.main([str(job)]) == 2
    assert tracer.main([str(tmp_path / "missing.json"), str(out)]) == 2


FD_READER = (
    "import os\ndef main():\n    words = open(0).read().split()\n    print(len(words), words)\nos.chdir('..')\nmain()\n"
)


@pytest.mark.parametrize(
    "spec, real_stdin, printed",
    [
        ({"mode": "program", "source": PROGRAM, "entry": "main"}, "8\n", "16\n"),
        ({"mode": "program", "source": FD_READER, "entry": "main", "stdin": "a\nb c\n"}, "", "3 ['a', 'b', 'c']\n"),
    ],
)
def test_script_runs_standalone(tmp_path, spec, real_stdin, printed):
    # Copied alone into a directory and run isolated (-I), as the sandbox does: no cwm_jax on the path. The job's
    # stdin is behind file descriptor 0 (open(0) reads it); without one the program reads the process's stdin.
    shutil.copy(tracer.__file__, tmp_path / "tracer.py")
    (tmp_path / "job.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-I", "tracer.py", "job.json", "out.json"],
        cwd=tmp_path,
        input=real_stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == printed
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["status"] == "ok" and result["complete"] and result["frames"][0]["line"] == "def main():"
