"""Trace data, evaluation and the neural debugger: `cwm-data traces`, `cwm_jax.traces.evaluate`, `cwm-debug`.

The model-dependent parts run on a scripted generator here (it replays a real trace, honouring forced events as a
perfect model would), so the debugger's stepping and the scores are checked against hand-worked expectations; the
trained tiny model is exercised in tests/test_traces_model.py.
"""

import json

import pytest

from cwm_jax.chat import Frame
from cwm_jax.data.cli import main as data_main
from cwm_jax.traces import chat_frames, debugger, evaluate, frame_dicts, run

SOURCE = """\
def double(v):
    return v * 2


def f(x):
    y = double(x)
    z = y + 1
    return z
"""


@pytest.fixture(scope="module")
def real():
    """The real trace of f(3) from the tracer in a sandbox."""
    result = run.trace(SOURCE, "f", call="f(3)")
    assert result["status"] == "ok" and result["complete"] and result["output"] == "7", result
    return result


def test_real_trace_steps_into_the_callee(real):
    events = [(fr["event"], fr["line"].strip()) for fr in real["frames"]]
    assert events == [
        ("call", "def f(x):"),
        ("line", "y = double(x)"),
        ("call", "def double(v):"),
        ("line", "return v * 2"),
        ("return", "return v * 2"),
        ("line", "z = y + 1"),
        ("line", "return z"),
        ("return", "return z"),
    ]


class ScriptedGenerator:
    """Stands in for `Generator` in the debugger and the evaluation: the next frame of a real trace; a forced event
    skips ahead to the next frame with that event in the current scope (callees' frames skipped), as a perfect model
    would answer; past the entry's return it ends the trace."""

    def __init__(self, frames):
        self.real = chat_frames(frames)
        self.positions = []  # real index of each frame the caller holds

        class _Config:
            max_position_embeddings = 4096

        self.model = type("M", (), {"config": _Config})()

    def predict_frames(self, source, entry, frames=(), *, event=None, one_frame=False, **kw):
        del self.positions[len(frames) :]
        while len(self.positions) < len(frames):  # frames the caller supplied itself (the real call frame)
            self.positions.append(len(self.positions))
        i = self.positions[-1] + 1 if self.positions else 0
        if event is not None:
            depth = 0
            while i < len(self.real) and not (depth == 0 and self.real[i].event == event):
                depth += {"call": 1, "return": -1}.get(self.real[i].event, 0)
                i += 1
        if i >= len(self.real):
            return [], True
        if not one_frame:
            self.positions += range(i, len(self.real))
            return self.real[i:], True
        self.positions.append(i)
        return [self.real[i]], False


def test_debugger_commands_follow_the_release(real):
    gen = ScriptedGenerator(real["frames"])
    dbg = debugger.NeuralDebugger(gen, SOURCE, "f", real=real)
    frames = chat_frames(real["frames"])
    assert dbg.current == frames[0]  # the real call frame: the inputs
    assert dbg.step() == frames[1]  # after a call, step forces a line frame
    assert dbg.next() == frames[5]  # over double(): its call, then its return is forced, then the next frame
    assert dbg.locals() == {"x": "3", "y": "6"}  # ".." resolved
    assert dbg.back() == frames[4] and dbg.back() == frames[2]  # next never predicted double's line frame
    dbg.reset()
    assert dbg.step() == frames[1] and dbg.step() == frames[2]  # step goes into the callee
    assert dbg.out() == frames[5]  # runs to double's return, then one frame more
    assert dbg.out() == frames[7] or dbg.done  # f's return; nothing follows it
    assert dbg.real_frame() == frames[len(dbg.frames) - 1]
    dbg.out()
    assert dbg.done and dbg.error is None


def test_debugger_predicts_the_call_frame_without_a_real_trace(real):
    dbg = debugger.NeuralDebugger(ScriptedGenerator(real["frames"]), SOURCE, "f")
    assert dbg.current.event == "call" and dbg.real_frame() is None


def test_repl_reads_commands(real):
    dbg = debugger.NeuralDebugger(ScriptedGenerator(real["frames"]), SOURCE, "f", real=real)
    commands = iter(["s", "p", "p x", "p nope", "r", "n", "wat", "h", "q"])
    out = []
    debugger.repl(dbg, read=lambda prompt: next(commands), write=lambda x: out.append(str(x)))
    text = "\n".join(out)
    assert "-> def f(x):" in text and "->     y = double(x)" in text and "->     z = y + 1" in text
    assert "{'x': '3'}" in text and "\n3\n" in text and "no such variable: nope" in text
    assert "real: ->     y = double(x)" in text and "unknown command 'wat'" in text and "s, step" in text


def test_find_entry():
    marked = SOURCE.replace("def f(x):", "def f(x):  # << START_OF_TRACE")
    assert debugger.find_entry(marked) == (SOURCE, "f")
    with pytest.raises(debugger.DebugError, match="found 0 lines marked"):
        debugger.find_entry(SOURCE)
    with pytest.raises(debugger.DebugError, match="is not a function's `def` line"):
        debugger.find_entry(SOURCE.replace("    z = y + 1", "    z = y + 1  # << START_OF_TRACE"))


def test_scores_by_hand(real):
    frames = real["frames"]
    perfect = evaluate.score(frames, frames)
    # 7 frames after the call frame, 5 of them call / line frames (1, 2, 3, 5, 6) with locals.
    assert perfect == dict(output=True, lines=(7, 7), locals=(5, 5))
    # Only the call frame predicted: every later frame is missing.
    assert evaluate.score(frames, frames[:1]) == dict(output=False, lines=(0, 7), locals=(0, 5))
    # One wrong value in the line frame after double() returns (z = y + 1 with y "5"), and a wrong output.
    wrong = json.loads(json.dumps(frames))
    wrong[5]["locals"]["y"] = "5"
    wrong[7]["value"] = "6"
    # Frame 6's y is ".." and resolves to frame 5's wrong value: both frames' locals are wrong.
    assert evaluate.score(frames, wrong) == dict(output=False, lines=(7, 7), locals=(3, 5))
    assert evaluate.entry_result(frames) == ("7", None)


def test_entry_result_of_an_exception():
    frames = frame_dicts(
        [
            Frame("call", {"x": "0"}, "def g(x):"),
            Frame("line", {"x": ".."}, "    return 1 / x"),
            Frame("exception", None, "    return 1 / x", "ZeroDivisionError('division by zero')"),
            Frame("return", None, "    return 1 / x", "None"),
        ]
    )
    assert evaluate.entry_result(frames) == ("None", "ZeroDivisionError('division by zero')")
    assert evaluate.score(frames, frames[:3], raised=True)["output"]  # the exception is what counts
    assert not evaluate.score(frames, frames[:3])["output"]


def test_evaluate_on_a_scripted_model(real, tmp_path):
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text(json.dumps({"source": SOURCE, "entry": "f", "calls": ["f(3)", "f(10)"]}) + "\n")
    tasks, skipped = evaluate.load_tasks(tasks_file)
    assert [t["output"] for t in tasks] == ["7", "21"] and skipped == {}
    summary = evaluate.evaluate(ScriptedGenerator(real["frames"]), tasks[:1])
    assert summary["output_exact"] == 1.0 and summary["line_accuracy"] == 1.0 and summary["locals_accuracy"] == 1.0
    # f(3)'s frames replayed after f(10)'s call frame: the lines are right; of the locals only frame 1's (x ".." ->
    # the real call frame's 10) are, double's v and the later y and z are f(3)'s.
    summary = evaluate.evaluate(ScriptedGenerator(real["frames"]), tasks[1:])
    assert summary["output_exact"] == 0.0 and summary["line_accuracy"] == 1.0 and summary["locals_accuracy"] == 0.2


def test_cwm_data_traces(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    records = [
        {"source": SOURCE, "entry": "f", "calls": ["f(1)", "f(2)", "f('a')"]},  # f('a') raises TypeError: kept
        {"source": "def loop(n):\n    while True:\n        n += 1\n", "entry": "loop", "call": "loop(0)"},
        {"source": "def g(:\n", "entry": "g", "call": "g()"},
        {"id": "prog", "source": "def main():\n    n = int(input())\n    print(n * 2)\n\nmain()\n", "stdin": "21\n"},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    programs = tmp_path / "programs"
    programs.mkdir()
    (programs / "echo.py").write_text("def main():\n    s = input()\n    print(s[::-1])\n\nmain()\n")
    (programs / "echo.in").write_text("abc\n")
    (programs / "echo.2.in").write_text("xy\n")
    out = tmp_path / "traces"
    args = [str(corpus), str(programs), str(out), "--workers", "2", "--max-frames", "50", "--wall-s", "2"]
    assert data_main(["traces", *args]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 traces" in printed and "of 8 jobs" in printed, printed
    assert "1 frame_limit" in printed and "1 error" in printed, printed
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    shards = sorted(str(p) for p in out.iterdir())
    written = [json.loads(r) for r in ArrayRecordDataSource(shards)]
    by_call = {r["call"] or r["stdin"]: r for r in written}
    assert by_call["f(2)"]["output"] == "5" and by_call["f('a')"]["status"] == "exception"
    assert by_call["21\n"]["trace"]["frames"][-1] == {"event": "return", "line": "    print(n * 2)", "lineno": 3,
                                                      "value": "None"}  # fmt: skip
    assert {by_call[s]["trace"]["frames"][2]["locals"]["s"] for s in ("abc\n", "xy\n")} == {"'abc'", "'xy'"}
    # Readable by the training data pipeline as format "trace".
    from cwm_jax.data.formats import encode_document
    from cwm_jax.tokenizer import load_tokenizer

    doc = encode_document("shard", written[0], "trace", "trace", load_tokenizer("byte"))
    assert len(doc["ids"]) == len(doc["train"]) and 0 < doc["train"].sum() < len(doc["train"])

    # Bad input: one line on stderr, exit 2, nothing at OUT.
    (tmp_path / "bad.jsonl").write_text('{"source": "x = 1", "entry": "f"}\n')
    for argv, message in [
        ([str(corpus), str(out)], "already exists; pass --overwrite"),
        ([str(tmp_path / "bad.jsonl"), str(tmp_path / "o1")], "bad.jsonl line 1: a record needs either 'calls'"),
        ([str(tmp_path / "nope.jsonl"), str(tmp_path / "o2")], "nope.jsonl: no such file"),
    ]:
        assert data_main(["traces", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
