"""cwm_jax.rl.harness: `cwm-eval code` / `cwm-eval math` end to end on solutions with known pass rates, once on a random
tiny model, and pass@k against a brute-force count over all k-subsets."""

import argparse
import itertools
import json
import math
import re

import pytest

from cwm_jax.rl import harness, sandbox
from cwm_jax.rl.harness import pass_at_k

needs_sandbox = pytest.mark.skipif(not sandbox.backends(), reason="no sandbox backend works here")


def cli(argv: list[str]) -> int:
    """`cwm-eval` with only the harness's commands, as eval_cli wires them."""
    parser = argparse.ArgumentParser(prog="cwm-eval")
    sub = parser.add_subparsers(dest="command", required=True)
    harness.add_code_parser(sub)
    harness.add_math_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def reply(code: str) -> str:
    return f"Let me write it.\n</think>\n```python\n{code}\n```"


CODE_TASKS = [
    {"task_id": "add", "question": "Print the sum of two integers.", "tests": [{"input": "1 2\n", "output": "3\n"}]},
    {
        "task_id": "rev",
        "question": "Print each line reversed.",
        "tests": [{"input": "abc\n", "output": "cba\n"}, {"input": "xy\nz\n", "output": "yx\nz\n"}],
    },
    {"task_id": "sq", "question": "Square a number.", "asserts": "assert sq(3) == 9\nassert sq(-2) == 4"},
]
# Per task, in order: add passes then fails, rev fails then passes, sq fails twice.
CODE_SOLUTIONS = [
    ("add", reply("a, b = map(int, input().split())\nprint(a + b)")),
    ("rev", reply("import sys\nfor line in sys.stdin:\n    print(line.rstrip('\\n'))")),  # not reversed
    ("add", reply("print(0)")),
    ("sq", reply("def sq(x):\n    return 2 * x")),  # sq(3) = 6
    ("rev", reply("import sys\nfor line in sys.stdin:\n    print(line.rstrip('\\n')[::-1])")),
    ("sq", "I will square it but I ran out of tokens"),  # no answer
]


@pytest.fixture
def code_files(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", CODE_TASKS)
    solutions = write_jsonl(tmp_path / "solutions.jsonl", [{"task_id": t, "completion": c} for t, c in CODE_SOLUTIONS])
    return tasks, solutions


@needs_sandbox
def test_code_eval_known_pass_rates(code_files, tmp_path, capsys):
    tasks, solutions = code_files
    out = tmp_path / "results.jsonl"
    assert cli(["code", "--solutions", solutions, "--tasks", tasks, "--k", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # pass@1 = mean(1/2, 1/2, 0) = 1/3; pass@2 = mean(1, 1, 0) = 2/3.
    assert printed == [
        "tasks: 3, samples per task: 2",
        "pass@1: 0.3333",
        "pass@2: 0.6667",
        "statuses: wrong_answer 3, passed 2, no_code 1",
    ]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["sample"], r["passed"], r["status"]) for r in records] == [
        ("add", 0, True, "passed"),
        ("add", 1, False, "wrong_answer"),
        ("rev", 0, False, "wrong_answer"),
        ("rev", 1, True, "passed"),
        ("sq", 0, False, "wrong_answer"),
        ("sq", 1, False, "no_code"),
    ]
    assert records[0]["completion"] == CODE_SOLUTIONS[0][1]
    assert records[2]["detail"] == "case 1/2: input 'abc\\n', expected 'cba\\n', got 'abc\\n'"
    assert records[4]["detail"] == "case 1/1: exited with status 1: 'assert sq(3) == 9 | AssertionError'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "solutions.jsonl", "tasks.jsonl"]  # no tmp


@needs_sandbox
def test_evaluate_code_summary(code_files):
    tasks = harness.load_code_tasks(code_files[0])
    by_task = harness.load_solutions(code_files[1], [t["task_id"] for t in tasks])
    seen = []
    summary = harness.evaluate_code(tasks, by_task, ks=(1, 2, 3), workers=2, on_sample=seen.append)
    assert summary["pass_at_k"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}  # k=3 > n=2: not averaged
    assert summary["per_task"][0] == {"task_id": "add", "n": 2, "correct": 1, "pass_at_k": {1: 0.5, 2: 1.0}}
    assert summary["samples_per_task"] == [2, 2, 2]
    assert seen == summary["records"]


MATH_TASKS = [
    {"task_id": "half", "problem": "What is 1 divided by 2?", "answer": "\\frac{1}{2}"},
    {"unique_id": "thousand", "problem": "What is 10 cubed?", "answer": "1000"},
    {"task_id": 3, "problem": "Solve x + y = 3, x - y = -1.", "solution": "So $\\boxed{(1, 2)}$."},
]
MATH_SOLUTIONS = [
    ("half", "1/2.\n</think>\nThe answer is $\\boxed{0.5}$."),
    ("half", "1/2.\n</think>\n$\\boxed{\\dfrac12}$"),
    ("half", "1/2.\n</think>\n$\\boxed{2}$"),
    ("thousand", "10^3.\n</think>\nThe answer is 1,000."),
    ("thousand", "10^3.\n</think>\n\\boxed{100}"),
    ("thousand", "10^3 is"),  # cut: no answer
    (3, "Add them.\n</think>\n$(x, y) = \\boxed{\\left(1, 2\\right)}$"),
    (3, "Add them.\n</think>\n\\boxed{(2, 1)}"),
    (3, "Add them.\n</think>\n\\boxed{(1,2)}"),
]


def test_math_eval_known_pass_rates(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", MATH_TASKS)
    solutions = write_jsonl(tmp_path / "sol.jsonl", [{"task_id": t, "completion": c} for t, c in MATH_SOLUTIONS])
    out = tmp_path / "results.jsonl"
    assert cli(["math", "--solutions", solutions, "--tasks", tasks, "--k", "1", "2", "3", "--out", str(out)]) == 0
    # Correct per task: 2, 1, 2 of 3. pass@1 = (2/3 + 1/3 + 2/3) / 3 = 5/9; pass@2 = (1 + 2/3 + 1) / 3 = 8/9
    # (1 - C(2,2)/C(3,2) = 2/3 for one correct of three); pass@3 = 1.
    assert capsys.readouterr().out.splitlines() == [
        "tasks: 3, samples per task: 3",
        f"pass@1: {5 / 9:.4f}",
        f"pass@2: {8 / 9:.4f}",
        "pass@3: 1.0000",
        "statuses: passed 5, wrong_answer 3, no_answer 1",
    ]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["passed"] for r in records] == [True, True, False, True, False, False, True, False, True]
    assert [(r["task_id"], r["predicted"], r["expected"]) for r in records[3:6]] == [
        ("thousand", "1,000", "1000"),
        ("thousand", "100", "1000"),
        ("thousand", None, "1000"),
    ]
    assert records[6]["expected"] == "(1, 2)" and records[6]["task_id"] == "3"


def test_limit_and_missing_solutions(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", MATH_TASKS)
    solutions = write_jsonl(tmp_path / "sol.jsonl", [{"task_id": "half", "completion": "x\n</think>\n\\boxed{1/2}"}])
    assert cli(["math", "--solutions", solutions, "--tasks", tasks, "--limit", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["tasks: 1, samples per task: 1", "pass@1: 1.0000"]
    assert cli(["math", "--solutions", solutions, "--tasks", tasks]) == 2
    err = capsys.readouterr().err
    assert err == f"cwm-eval math: error: {solutions}: no completion for task 'thousand', '3'; add lines for them or " \
        "evaluate fewer (--limit)\n"  # fmt: skip


@pytest.mark.parametrize(
    "command, line, record, match",
    [
        ("code", 2, "not json", "not valid JSON"),
        ("code", 2, [1, 2], "expected a JSON object"),
        ("code", 2, {"question": "q", "tests": [{"input": "", "output": ""}]}, "needs 'task_id'"),
        ("code", 2, {"task_id": "a", "question": "q", "tests": [{"input": "", "output": ""}]}, "appears twice"),
        ("code", 2, {"task_id": "b", "question": "q"}, "either 'tests'"),
        ("code", 2, {"task_id": "b", "question": "q", "tests": []}, "non-empty list"),
        ("code", 2, {"task_id": "b", "question": "q", "tests": [{"input": "1"}]}, r"tests\[0\]"),
        ("code", 2, {"task_id": "b", "question": "", "asserts": "assert 1"}, "needs 'question'"),
        ("code", 2, {"task_id": "b", "question": "q", "asserts": "assert 1", "starter": 3}, "starter"),
        ("math", 2, {"task_id": "b", "problem": "p"}, "needs 'answer'"),
        ("math", 2, {"task_id": "b", "answer": "1"}, "needs 'problem'"),
    ],
)
def test_bad_task_file(tmp_path, capsys, command, line, record, match):
    first = {"task_id": "a", "question": "q", "tests": [{"input": "", "output": ""}]}
    if command == "math":
        first = {"task_id": "a", "problem": "p", "answer": "1"}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(first) + "\n" + (record if isinstance(record, str) else json.dumps(record)) + "\n")
    solutions = write_jsonl(tmp_path / "sol.jsonl", [{"task_id": "a", "completion": "x"}])
    assert cli([command, "--solutions", solutions, "--tasks", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cwm-eval {command}: error: {path} line {line}: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_other_errors_exit_2(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", MATH_TASKS[:1])
    solutions = write_jsonl(tmp_path / "sol.jsonl", [{"task_id": "half", "completion": "x"}])
    cases = [
        (["--solutions", solutions, "--tasks", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
        (["--solutions", solutions, "--tasks", tasks, "--k", "2"], "--k 2 needs at least 2 samples per task"),
        (["--solutions", solutions, "--tasks", tasks, "--k", "0"], "k must be at least 1"),
        (["--solutions", solutions, "--tasks", tasks, "--limit", "0"], "--limit must be at least 1"),
        (["--checkpoint", str(tmp_path), "--tasks", tasks, "-n", "2", "--k", "5"], "--k 5 needs at least 5"),
        (["--checkpoint", str(tmp_path / "nothing"), "--tasks", tasks], "nothing"),  # CheckpointError
    ]
    for argv, message in cases:
        assert cli(["math", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cwm-eval math: error: ") and message in err and err.count("\n") == 1, err
    code_tasks = write_jsonl(tmp_path / "code.jsonl", CODE_TASKS[:1])
    code_solutions = write_jsonl(tmp_path / "code_sol.jsonl", [{"task_id": "add", "completion": "x"}])
    assert cli(["code", "--solutions", code_solutions, "--tasks", code_tasks, "--workers", "0"]) == 2
    assert capsys.readouterr().err == "cwm-eval code: error: --workers must be a positive integer, got 0\n"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "half"}])
    assert cli(["math", "--solutions", bad, "--tasks", tasks]) == 2
    assert f"{bad} line 1: needs 'completion'" in capsys.readouterr().err


# --- prompts and sampling ---------------------------------------------------------------------------------------------


def test_prompts():
    stdio = harness.code_messages({"question": "Q?\n", "tests": [{"input": "", "output": ""}]})
    assert stdio == [{"role": "user", "content": "Q?\n\n" + harness.CODE_STDIO_INSTRUCTION}]
    func = harness.code_messages({"question": "Q?", "tests": {"asserts": "assert f(1)"}, "starter": "def f(x):\n"})
    assert func[0]["content"] == (
        f"Q?\n\n{harness.CODE_FUNCTION_INSTRUCTION}\n\nStart from this code:\n```python\ndef f(x):\n```"
    )
    assert harness.math_messages({"problem": "1+1?"}) == [
        {"role": "user", "content": "1+1?\n\nPlease reason step by step, and put your final answer within \\boxed{}."}
    ]


def test_sampling_defaults_are_the_releases():
    from cwm_jax import generator

    assert (harness.TEMPERATURE, harness.TOP_P) == (generator.TEMPERATURE, generator.TOP_P)
    parser = argparse.ArgumentParser()
    harness.add_code_parser(parser.add_subparsers())
    args = parser.parse_args(["code", "--checkpoint", "c", "--tasks", "t"])
    assert (args.temperature, args.top_p, args.samples, args.k, args.max_new_tokens, args.seed) == (
        1.0,
        0.95,
        1,
        [1],
        2048,
        0,
    )


def test_sample_completions_asks_one_sample_chat_call_in_reasoning_mode():
    class Scripted:
        def __init__(self):
            self.calls = []

        def sample_chat(self, messages, n, **kwargs):
            self.calls.append((messages, n, kwargs))
            return [f"text {i}" for i in range(n)]

    gen = Scripted()
    texts = harness.sample_completions(gen, [{"role": "user", "content": "q"}], 3, seed=7, max_new_tokens=5)
    assert texts == ["text 0", "text 1", "text 2"]
    assert gen.calls == [
        ([{"role": "user", "content": "q"}], 3, dict(reasoning=True, max_new_tokens=5, temperature=1.0, top_p=0.95,
                                                    seed=7))
    ]  # fmt: skip


# --- pass@k -----------------------------------------------------------------------------------------------------------


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(2, 1, 1) == 0.5
    assert pass_at_k(10, 0, 5) == 0.0
    # Large n: the closed form's binomials would overflow a float; 1 - C(n-c, k)/C(n, k) with exact integers.
    assert pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100), rel=1e-12)
    for bad in [(2, 3, 1), (2, 1, 3), (2, 1, 0), (2, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*bad)


# --- a model ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 2-layer CWM with the byte tokenizer, as a converted checkpoint; returns its folder."""
    from etils import epath
    from flax import nnx

    from cwm_jax import checkpoint
    from cwm_jax.config import cwm_tiny
    from cwm_jax.model import CwmModel
    from cwm_jax.tokenizer import load_tokenizer
    from cwm_jax.train.export import tokenizer_files

    root = tmp_path_factory.mktemp("tiny")
    tok = load_tokenizer("byte")
    config = cwm_tiny(
        vocab_size=tok.vocab_size,
        num_layers=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_id,
        eos_token_ids=tok.stop_ids,
    )
    (root / "scratch").mkdir()
    files = tokenizer_files("byte", epath.Path(root / "scratch"))
    folder = str(root / "ckpt")
    checkpoint.save_streaming(folder, config, checkpoint.model_leaves(CwmModel(config, rngs=nnx.Rngs(0))), files=files)
    return folder


@needs_sandbox
def test_model_mode_on_a_random_model(tiny_checkpoint, tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "two.jsonl", CODE_TASKS[1:])  # a stdin/stdout task and an assert task
    out = tmp_path / "results.jsonl"
    argv = ["--checkpoint", tiny_checkpoint, "--tasks", tasks, "-n", "2", "--k", "1", "2", "--max-new-tokens", "16"]
    assert cli(["code", *argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == ["tasks: 2, samples per task: 2", "pass@1: 0.0000", "pass@2: 0.0000"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["sample"], r["passed"]) for r in records] == [
        ("rev", 0, False),
        ("rev", 1, False),
        ("sq", 0, False),
        ("sq", 1, False),
    ]
    assert records[0]["completion"] != records[1]["completion"]  # seeds 0 and 1
    math_tasks = write_jsonl(tmp_path / "math.jsonl", MATH_TASKS[:1])
    argv = ["--checkpoint", tiny_checkpoint, "--tasks", math_tasks, "-n", "2", "--max-new-tokens", "16"]
    assert cli(["math", *argv]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["tasks: 1, samples per task: 2", "pass@1: 0.0000"]


def test_cwm_eval_entry_point_dispatches_math(tmp_path, capsys):
    """`cwm-eval math` through cwm_jax.eval_cli.main, as the console script runs it."""
    from cwm_jax.eval_cli import main as eval_main

    tasks = tmp_path / "math.jsonl"
    tasks.write_text(json.dumps({"task_id": "m1", "problem": "1+1?", "answer": "2"}) + "\n")
    solutions = tmp_path / "sol.jsonl"
    lines = [
        {"task_id": "m1", "completion": "r\n</think>\n\\boxed{2}"},
        {"task_id": "m1", "completion": "r\n</think>\n3"},
    ]
    solutions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert eval_main(["math", "--solutions", str(solutions), "--tasks", str(tasks)]) == 0
    assert "pass@1" in capsys.readouterr().out


@needs_sandbox
def test_cwm_eval_entry_point_dispatches_code(tmp_path, capsys):
    """`cwm-eval code` through cwm_jax.eval_cli.main (its grading runs the program in the sandbox)."""
    from cwm_jax.eval_cli import main as eval_main

    code_tasks = tmp_path / "code.jsonl"
    code_tasks.write_text(json.dumps({"task_id": "c1", "question": "echo", "tests": [{"input": "a\n", "output": "a"}]}))
    code_sol = tmp_path / "code_sol.jsonl"
    code_sol.write_text(json.dumps({"task_id": "c1", "completion": "r\n</think>\n```python\nprint(input())\n```"}))
    assert eval_main(["code", "--solutions", str(code_sol), "--tasks", str(code_tasks)]) == 0
    assert "pass@1: 1.000" in capsys.readouterr().out
