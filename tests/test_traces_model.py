"""The world-model pipeline end to end on a tiny model: traces from `cwm-data traces`, training by the training loop
(configs/tiny_traces.py), `cwm-eval trace` and `cwm-debug` (the model is trained once per session, tests/conftest.py).
"""

import io
import json

from cwm_jax.eval_cli import main as eval_main
from cwm_jax.traces import debugger

LIMIT = 7  # the held-out calls, one per function of configs/data/trace_corpus.jsonl
MAX_NEW_TOKENS = 300


def _evaluate(checkpoint, tasks, out, capsys) -> dict:
    argv = ["trace", "--checkpoint", str(checkpoint), "--tasks", str(tasks), "--limit", str(LIMIT)]
    assert eval_main([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == LIMIT and f"tasks: {LIMIT}" in printed

    def pooled(key):
        return sum(r[key][0] for r in results) / sum(r[key][1] for r in results)

    summary = dict(lines=pooled("lines"), locals=pooled("locals"), output=sum(r["output"] for r in results) / LIMIT)
    assert f"next-line accuracy: {summary['lines']:.3f}" in printed  # the printed figure is the per-task pool
    return summary


def test_trained_model_beats_the_untrained_one(trained_trace_model, tmp_path, capsys):
    held_out = trained_trace_model["held_out"]
    trained = _evaluate(trained_trace_model["trained"], held_out, tmp_path / "trained.jsonl", capsys)
    untrained = _evaluate(trained_trace_model["untrained"], held_out, tmp_path / "untrained.jsonl", capsys)
    print("trained", trained, "untrained", untrained)
    # A random model writes no parseable frame; after a minute of training the model writes the trace format and
    # copies the right source lines for a good share of the frames of calls it never saw.
    assert untrained["lines"] == 0.0 and untrained["locals"] == 0.0
    assert trained["lines"] >= 0.3, trained
    assert trained["locals"] > untrained["locals"], trained


def test_cwm_debug_cli(trained_trace_model, tmp_path, monkeypatch, capsys):
    program = tmp_path / "prog.py"
    program.write_text(
        "def double(v):\n    return v * 2\n\n\ndef f(x):  # << START_OF_TRACE\n    y = double(x)\n    return y + 1\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("s\nn\np\nr\nb\nreset\nq\n"))
    argv = [str(program), "--checkpoint", str(trained_trace_model["trained"]), "--call", "f(3)"]
    assert debugger.main(argv) == 0
    out = capsys.readouterr().out
    assert "entry f, real trace of f(3)" in out and out.count("-> def f(x):") >= 2  # the start, and after reset
    assert "{'x': '3'" in out and "real: ->" in out

    assert debugger.main([str(program), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "cwm-debug: error:" in capsys.readouterr().err
