"""cwm_jax.rl.rewards: format, code (run in the sandbox) and math rewards, each against hand-worked verdicts."""

import pytest

from cwm_jax.rl import rewards, sandbox
from cwm_jax.rl.rewards import (
    CodeVerdict,
    answers_equal,
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    judge_code,
    math_reward,
    normalize_answer,
    run_tests,
    score,
    think_format_ok,
)
from cwm_jax.rl.sandbox import Limits, Pool

needs_sandbox = pytest.mark.skipif(not sandbox.backends(), reason="no sandbox backend works here")
# Tight limits keep the timeout and flood cases short; the memory limit leaves room for the interpreter.
LIMITS = Limits(wall_s=2.0, cpu_s=2.0, memory_mb=256, max_output_bytes=64 << 10)

ADD_TESTS = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "10 -4\n", "output": "6"},
    {"input": "0 0\n", "output": "0\n"},
]
ADD_ASSERTS = {"asserts": "assert add(1, 2) == 3\nassert add(10, -4) == 6"}


def completion(code: str, *, fence: str = "python") -> str:
    """A reasoning-mode completion whose answer holds `code` in a fenced block."""
    return f"Add the two numbers.\n</think>\nHere is the program:\n```{fence}\n{code}\n```\n"


# --- format -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ok",
    [
        ("I add them.\n</think>\n3", True),
        ("<think>\nI add them.\n</think>\n3", True),  # the prompt's "<think>\n" repeated is allowed
        ("I add them.\n</think>\n3<|eot_id|>", True),  # a trailing stop token is not part of the answer
        ("I add them and then", False),  # cut inside the reasoning: no answer
        ("I add them.\n</think>\n", False),  # empty answer
        ("I add them.\n</think>\n  \n", False),  # blank answer
        ("\n</think>\n3", False),  # no reasoning
        ("a\n</think>\nb\n</think>\nc", False),  # a second think tag in the answer
        ("a\n</think>\n<think>\nb", False),
        ("I add them.</think>3", False),  # the tag needs its line breaks
    ],
)
def test_format_reward(text, ok):
    assert think_format_ok(text) is ok
    assert format_reward(text) == (1.0 if ok else 0.0)


# --- code extraction --------------------------------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_block():
    answer = "First try:\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\nSample output:\n```text\n2\n```\n"
    assert extract_code(answer) == "print(2)\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # untagged
    assert extract_code("```Python3 title\nx = 1\n```") == "x = 1\n"  # tag case and a trailing note
    assert extract_code("  ```python\n  if x:\n      y()\n  ```") == "if x:\n    y()\n"  # indented: dedented


@pytest.mark.parametrize(
    "answer",
    [
        "no code at all",
        "```python\nprint(1)\n",  # never closed (cut)
        "```python\n\n   \n```",  # blank
        "```cpp\nint main() {}\n```",  # another language
        "inline ```print(1)``` only",
    ],
)
def test_extract_code_none(answer):
    assert extract_code(answer) is None


def test_normalize_output():
    assert rewards.normalize_output("3  \r\n4\t\n\n\n") == "3\n4"
    assert rewards.normalize_output("\n3") == "\n3"  # leading blank lines count


# --- running code -----------------------------------------------------------------------------------------------------

ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)"


@needs_sandbox
@pytest.mark.parametrize(
    "code, status, cases_passed",
    [
        (ADD_PROGRAM, "passed", 3),
        ("a, b = map(int, input().split())\nprint(a + b, ' ')\nprint()\n", "passed", 3),  # trailing blanks ignored
        ("a, b = map(int, input().split())\nprint(a - b)", "wrong_answer", 0),  # 1 - 2 = -1 on the first case
        ("a, b = map(int, input().split())\nprint(3)", "wrong_answer", 1),  # right by chance on the first case only
        ("print(' 3')", "wrong_answer", 0),  # leading whitespace is compared
        ("raise ValueError('boom')", "runtime_error", 0),
        ("import sys\nprint(3)\nsys.exit(1)", "runtime_error", 0),  # right output, nonzero exit
        ("while True:\n    pass", "timeout", 0),
        ("while True:\n    print('x' * 1000)", "output_limit", 0),
        ("print('x' * 100_000)", "output_limit", 0),  # over the 64 KB cap, under the kill threshold
        ("x = bytearray(2 << 30)", "memory_limit", 0),
        ("def f(:\n    pass", "compile_error", 0),
    ],
)
def test_stdio_verdicts(code, status, cases_passed):
    verdict = judge_code(completion(code), ADD_TESTS, limits=LIMITS)
    assert (verdict.status, verdict.cases_passed, verdict.cases) == (status, cases_passed, 3), verdict
    assert verdict.passed is (status == "passed")
    assert code_reward(completion(code), ADD_TESTS, limits=LIMITS) == (1.0 if status == "passed" else 0.0)
    if status == "passed":
        assert verdict.detail == ""
    else:
        assert verdict.detail


@needs_sandbox
def test_wrong_answer_detail_names_the_case():
    verdict = judge_code(completion("a, b = map(int, input().split())\nprint(3)"), ADD_TESTS, limits=LIMITS)
    assert verdict.detail == "case 2/3: input '10 -4\\n', expected '6', got '3\\n'"
    crash = judge_code(completion("x = 1\nraise ValueError('boom')"), ADD_TESTS, limits=LIMITS)
    assert crash.detail == "case 1/3: exited with status 1: \"raise ValueError('boom') | ValueError: boom\""


@needs_sandbox
def test_early_stop_and_all_cases():
    # Passes cases 1 and 3 (prints 3 and 0 correctly), fails case 2 (prints 3, expected 6).
    code = "a, b = map(int, input().split())\nprint(3 if a == 1 or a == 10 else a + b)"
    first = run_tests(code, ADD_TESTS, limits=LIMITS)
    every = run_tests(code, ADD_TESTS, limits=LIMITS, all_cases=True)
    assert first == CodeVerdict(False, 1, 3, "wrong_answer", first.detail)
    assert every == CodeVerdict(False, 2, 3, "wrong_answer", first.detail)
    assert first.detail.startswith("case 2/3:")


@needs_sandbox
def test_pool_gives_the_same_verdicts():
    with Pool(2, limits=LIMITS) as pool:
        assert run_tests(ADD_PROGRAM, ADD_TESTS * 3, pool=pool) == CodeVerdict(True, 9, 9, "passed", "")
        wrong = run_tests("print(3)", ADD_TESTS, pool=pool, all_cases=True)
        assert (wrong.status, wrong.cases_passed) == ("wrong_answer", 1)
        with pytest.raises(ValueError, match="pool's limits"):
            run_tests(ADD_PROGRAM, ADD_TESTS, pool=pool, limits=rewards.CODE_LIMITS)


@needs_sandbox
@pytest.mark.parametrize(
    "code, status",
    [
        ("def add(a, b):\n    return a + b", "passed"),
        ("def add(a, b):\n    return a * b", "wrong_answer"),  # 1 * 2 != 3: the first assert fails
        ("def add(a, b):\n    return a / 0", "runtime_error"),
        ("def add(a, b):\n    while True:\n        pass", "timeout"),
        ("def add(a, b):\n    while True:\n        print('x' * 1000)", "output_limit"),
        ("def add(a, b)\n    return a + b", "compile_error"),
        ("def plus(a, b):\n    return a + b", "runtime_error"),  # NameError: add
    ],
)
def test_assert_verdicts(code, status):
    verdict = judge_code(completion(code), ADD_ASSERTS, limits=LIMITS)
    assert (verdict.status, verdict.cases) == (status, 1), verdict
    assert verdict.cases_passed == (1 if status == "passed" else 0)
    assert code_reward(completion(code), ADD_ASSERTS, limits=LIMITS) == (1.0 if status == "passed" else 0.0)
    if status == "wrong_answer":
        assert verdict.detail == "case 1/1: exited with status 1: 'assert add(1, 2) == 3 | AssertionError'"


@pytest.mark.parametrize(
    "text",
    [
        "I add them.\n</think>\nJust add the numbers.",  # no code block
        "I add them.\n```python\nprint(3)\n```",  # code only inside the unfinished reasoning
        "I add them.\n</think>\n```cpp\nint main() {}\n```",
    ],
)
def test_no_code(text):
    for tests in (ADD_TESTS, ADD_ASSERTS):
        verdict = judge_code(text, tests)  # nothing is run, so no sandbox is needed
        assert (verdict.passed, verdict.status, verdict.cases_passed) == (False, "no_code", 0)
        assert code_reward(text, tests) == 0.0


@pytest.mark.parametrize(
    "tests, match",
    [
        ([], "non-empty list"),
        ("assert f(1)", "non-empty list"),
        ([{"input": "1"}], r"tests\[0\]"),
        ([{"input": 1, "output": "1"}], r"tests\[0\]"),
        ({"asserts": ""}, "asserts"),
        ({"assert": "assert f(1)"}, "asserts"),
    ],
)
def test_bad_tests(tests, match):
    with pytest.raises(ValueError, match=match):
        judge_code(completion("print(1)"), tests)


# --- math -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # the last, nested braces kept
        ("\\boxed{\\text{(A)}} and \\boxed{x", "\\text{(A)}"),  # an unclosed box is skipped
        ("\\fbox{42}", "42"),
        ("so \\boxed 7$.", "7"),
        ("Thus the answer is 12.", "12"),
        ("...\nAnswer: $-3$\n", "$-3$"),
        ("We get\n\n  x = 5  \n", "x = 5"),  # the last line
        ("   \n", None),
    ],
)
def test_extract_answer(answer, expected):
    assert extract_answer(answer) == expected


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{1}{2}", "1/2"),
        ("0.5", "1/2"),
        ("\\dfrac{1}{2}", "\\tfrac12"),
        ("\\frac{3}{4}", "0.75"),
        ("-\\frac{1}{2}", "-0.5"),
        ("\\frac{-1}{2}", "-1/2"),
        ("1,000", "1000"),
        ("1,234,567.5", "1234567.5"),
        ("-3", "\u22123"),  # unicode minus
        ("10\\text{ cm}", "10"),  # a MATH-style unit after a number
        ("\\text{Monday}", "Monday"),
        ("\\textbf{(B)}", "(B)"),
        ("(1, 2)", "\\left( 1,2 \\right)"),
        ("(1/2, 3)", "(0.5, 3.0)"),  # element-wise numbers
        ("\\{1, 2\\}", "\\{2, 1\\}"),  # a set: any order
        ("x = 5", "5"),
        ("$5$.", "5"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90°"),
        ("50\\%", "50%"),
        ("2\\sqrt{2}", "2 \\sqrt{2}"),
        ("0.3333333", "\\frac{1}{3}"),  # a rounded decimal within a relative 1e-6
        ("3", "3.0"),
        ("1e3", "1000"),
    ],
)
def test_answers_equal(a, b):
    assert answers_equal(a, b)
    assert answers_equal(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\frac{1}{2}", "0.6"),
        ("0.33", "\\frac{1}{3}"),  # off by 1 %, far over 1e-6
        ("1000", "100"),
        ("3", "-3"),
        ("(1, 2)", "(2, 1)"),  # tuples are ordered
        ("(1, 2)", "[1, 2]"),  # an interval is not a tuple
        ("(1, 2)", "(1, 2, 3)"),
        ("50\\%", "0.5"),  # percentages are not converted
        ("50\\%", "50"),
        ("\\frac{1}{0}", "1/0"),  # not numbers, and different text
        ("", ""),  # blank equals nothing
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),  # no algebra
        ("1" * 5000, "1" * 4999),  # over Python's int digit limit: compared as text
    ],
)
def test_answers_differ(a, b):
    assert not answers_equal(a, b)
    assert not answers_equal(b, a)


def test_normalize_answer():
    assert normalize_answer("$\\left( 1,\\! 2 \\right)$.") == "(1,2)"
    assert normalize_answer("\\dfrac12") == "\\frac{1}{2}"
    assert normalize_answer("\\frac{1}2") == "\\frac{1}{2}"
    assert normalize_answer("y = 2x + 3") == "2x+3"
    assert normalize_answer("x = y = 1") == "x=y=1"  # two "=": not a single assignment
    assert normalize_answer("\\leftarrow") == "\\leftarrow"  # only \left as a whole command is dropped
    assert normalize_answer("(1,000)") == "(1,000)"  # thousands separators only in a lone number


@pytest.mark.parametrize(
    "text, expected, reward",
    [
        ("Half of one.\n</think>\nSo $\\boxed{\\dfrac{1}{2}}$.", "\\frac12", 1.0),
        ("Half of one.\n</think>\nThe answer is 0.5.", "1/2", 1.0),
        ("Half of one.\n</think>\n$\\boxed{0.6}$", "1/2", 0.0),
        ("It is \\boxed{1/2} maybe", "1/2", 0.0),  # cut in the reasoning: no answer
        ("It is \\boxed{1/2}.\n</think>\nI am not sure.", "1/2", 0.0),  # only the answer part is read
    ],
)
def test_math_reward(text, expected, reward):
    assert math_reward(text, expected) == reward


# --- score ------------------------------------------------------------------------------------------------------------


def test_score_exact_and_math():
    right = "2 plus 5.\n</think>\n 7 \n"
    assert score(right, {"kind": "exact", "answer": "7"}) == {
        "reward": 1.0,
        "correct": 1.0,
        "format": 1.0,
        "kind": "exact",
        "status": "passed",
        "detail": "predicted '7', expected '7'",
    }
    wrong = score("2 plus 5.\n</think>\n8", {"kind": "exact", "answer": "7"}, format_weight=0.25)
    assert (wrong["reward"], wrong["correct"], wrong["format"], wrong["status"]) == (0.25, 0.0, 1.0, "wrong_answer")
    cut = score("2 plus", {"kind": "exact", "answer": "7"}, format_weight=0.25)
    assert (cut["reward"], cut["format"], cut["status"]) == (0.0, 0.0, "no_answer")
    math = score("Half.\n</think>\n\\boxed{0.5}", {"kind": "math", "answer": "\\frac{1}{2}"}, format_weight=0.5)
    assert (math["reward"], math["correct"], math["kind"], math["status"]) == (1.5, 1.0, "math", "passed")


@needs_sandbox
def test_score_code():
    good = score(completion(ADD_PROGRAM), {"kind": "code", "tests": ADD_TESTS}, limits=LIMITS, format_weight=0.1)
    assert (good["reward"], good["correct"], good["format"], good["status"]) == (1.1, 1.0, 1.0, "passed")
    bad = score(completion("print(3)"), {"kind": "code", "tests": ADD_TESTS}, limits=LIMITS)
    assert (bad["reward"], bad["status"]) == (0.0, "wrong_answer")
    assert bad["detail"].startswith("case 2/3:")


@pytest.mark.parametrize(
    "task, match",
    [
        ({"answer": "7"}, "kind"),
        ({"kind": "proof", "answer": "7"}, "kind"),
        ({"kind": "math"}, "answer"),
        ({"kind": "exact", "answer": 7}, "answer"),
        ({"kind": "code"}, "tests"),
        ({"kind": "code", "tests": []}, "non-empty"),
    ],
)
def test_score_bad_task(task, match):
    with pytest.raises(ValueError, match=match):
        score("x\n</think>\n7", task)
