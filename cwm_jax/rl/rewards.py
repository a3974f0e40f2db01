"""Verifiable rewards: is a reasoning-mode completion well formed, does its code pass the tests, is its answer right.

    score(completion, {"kind": "code", "tests": [{"input": "1 2\\n", "output": "3"}]})  # {"reward": 1.0, ...}
    score(completion, {"kind": "math", "answer": "\\\\frac{1}{2}"})
    score(completion, {"kind": "exact", "answer": "7"}, format_weight=0.1)

A completion is the text generated after a reasoning-mode prompt (which ends with "<think>\\n"): reasoning, then
"\\n</think>\\n", then the answer (`cwm_jax.chat.parse_reply`). Only the answer is graded: code is the last fenced
Python block of the answer, a math answer the last `\\boxed{...}` of the answer. A completion cut inside its reasoning
has no answer and scores 0.

Code runs in the sandbox (`cwm_jax.rl.sandbox`), one run per test case: stdin/stdout cases feed the case's input and
compare the normalised output (trailing whitespace of each line and trailing blank lines dropped); an assert block is
one case, run after the code in the same program. Math answers are compared as strings after normalisation, then as
exact numbers (fractions.Fraction), then element-wise as tuples; no computer algebra (sympy is not a dependency), so
equivalent expressions in other forms ("\\\\sqrt{2}/2" vs "\\\\frac{\\\\sqrt{2}}{2}") do not match.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

from cwm_jax.chat import parse_reply
from cwm_jax.rl import sandbox
from cwm_jax.rl.sandbox import Job, Limits, Pool

__all__ = [
    "CODE_LIMITS",
    "CODE_STATUSES",
    "CodeVerdict",
    "answers_equal",
    "check_tests",
    "code_reward",
    "extract_answer",
    "extract_code",
    "format_reward",
    "judge_code",
    "judge_math",
    "math_reward",
    "normalize_answer",
    "normalize_output",
    "run_tests",
    "score",
    "think_format_ok",
]

# Per test case; the output cap is per stream (the sandbox kills a program that writes over 4x this).
CODE_LIMITS = Limits(wall_s=5.0, cpu_s=5.0, memory_mb=512, max_output_bytes=64 << 10)
CODE_STATUSES = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "timeout",
    "memory_limit",
    "output_limit",
    "no_code",
    "compile_error",
    "sandbox_error",  # the sandbox machinery failed; a hostile program can provoke it, so it scores 0, never raises
)
KINDS = ("code", "math", "exact")
REL_TOL = Fraction(1, 10**6)  # for numbers written as decimals (exact arithmetic: no float overflow)
DETAIL_CHARS = 200  # each quoted piece of a verdict's detail (input, expected, got, stderr) is cut to this


# --- format -----------------------------------------------------------------------------------------------------------


def think_format_ok(text: str) -> bool:
    """Whether reasoning-mode completion `text` is "reasoning\\n</think>\\nanswer" with both parts non-blank and no
    second think tag in the answer (a leading "<think>\\n", which the prompt already holds, is allowed)."""
    reply = parse_reply(text, reasoning=True)  # without a closing tag the answer is "" (a cut reasoning)
    if not reply.reasoning.strip() or not reply.answer.strip():
        return False
    return "<think>" not in reply.answer and "</think>" not in reply.answer


def format_reward(reply_text: str) -> float:
    """1.0 when `think_format_ok(reply_text)`, else 0.0."""
    return 1.0 if think_format_ok(reply_text) else 0.0


# --- code -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodeVerdict:
    """How a program fared on its tests.

    passed: every case passed. cases_passed / cases: cases run and passed / cases in the tests (with the default
    early stop, the cases after the first failure are not run and not passed). status: one of CODE_STATUSES, the
    first failing case's ("passed" when all passed). detail: that case's number, input, expected and actual output or
    the end of its stderr, each cut to DETAIL_CHARS ("" when all passed).
    """

    passed: bool
    cases_passed: int
    cases: int
    status: str
    detail: str = ""


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py")


def extract_code(answer: str) -> str | None:
    """The content of the last closed fenced code block of `answer` tagged python, python3, py or untagged (blocks of
    other languages, e.g. ```text for sample output, are skipped), dedented; None if there is none or it is blank."""
    code = None
    for m in _FENCE.finditer(answer):
        if m.group(1).lower() in _PYTHON_TAGS:
            code = m.group(2)
    if code is None or not code.strip():
        return None
    return textwrap.dedent(code)


def normalize_output(text: str) -> str:
    """Program output as compared with the expected output: trailing whitespace of each line and trailing blank lines
    dropped (line breaks \\r\\n and \\r read as \\n)."""
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")


def _clip(text: str) -> str:
    return repr(text) if len(text) <= DETAIL_CHARS else repr(text[:DETAIL_CHARS]) + "..."


def check_tests(tests: Any) -> tuple[list[dict] | None, str | None]:
    """(stdin/stdout cases, None) or (None, assert source) of `tests` (as `run_tests` takes them); raises ValueError
    naming what is wrong."""
    if isinstance(tests, Mapping):
        if not isinstance(tests.get("asserts"), str) or not tests["asserts"].strip():
            raise ValueError(
                f"tests: a mapping needs 'asserts', the assert statements as a non-empty str; got {tests!r}"
            )
        return None, tests["asserts"]
    if isinstance(tests, str) or not isinstance(tests, Sequence) or not tests:
        raise ValueError(
            "tests must be a non-empty list of {'input': str, 'output': str} cases or {'asserts': str}; "
            f"got {type(tests).__name__}"
        )
    for i, case in enumerate(tests):
        if not isinstance(case, Mapping) or not all(isinstance(case.get(k), str) for k in ("input", "output")):
            raise ValueError(f"tests[{i}]: a stdin/stdout case needs 'input' and 'output' strings; got {case!r}")
    return list(tests), None


def _compile_error(code: str) -> str | None:
    """The compiler's message if `code` is not valid Python, else None (compiling runs none of the code)."""
    try:
        compile(code, "main.py", "exec", dont_inherit=True)
    except SyntaxError as e:
        return f"{type(e).__name__}: {e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError, OverflowError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _stderr_end(stderr: bytes) -> str:
    """The last two lines of `stderr` that are not a traceback's ^^^ markers: the failing source line and the error."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line.strip("^~ ")]
    return " | ".join(lines[-2:])


def _failure(result: sandbox.Result) -> str | None:
    """The verdict status of a sandbox run that did not end well, or None when it exited 0 within its limits."""
    if result.status == "ok":
        return "output_limit" if result.stdout_truncated else None
    if result.status in ("timeout", "cpu_limit"):
        return "timeout"
    if result.status in ("memory_limit", "output_limit", "sandbox_error"):
        return result.status
    return "runtime_error"  # "error" (nonzero exit) and "signal"


def _results(jobs: Sequence[Job], limits: Limits, pool: Pool | None) -> Iterator[sandbox.Result]:
    if pool is not None:
        yield from pool.map(jobs)
        return
    for job in jobs:
        yield sandbox.run(job.argv, stdin=job.stdin, files=job.files, limits=limits)


def run_tests(
    code: str,
    tests: Sequence[Mapping[str, str]] | Mapping[str, str],
    *,
    limits: Limits | None = None,
    pool: Pool | None = None,
    all_cases: bool = False,
) -> CodeVerdict:
    """Run Python program `code` on `tests` in the sandbox and return its CodeVerdict.

    tests: stdin/stdout cases [{"input": str, "output": str}, ...] (a case passes when the program exits 0 and its
    normalised stdout equals the normalised expected output) or {"asserts": str} (one case: `code + "\\n\\n" +
    asserts` must exit 0; a failing assert is "wrong_answer", any other exception "runtime_error").
    limits: per case (default CODE_LIMITS). pool: run the cases on this Pool, several at once (its own limits apply,
    so `limits` must be None or the same). all_cases: run every case instead of stopping at the first failure.
    Code that does not compile is "compile_error" without a run. Raises ValueError for malformed tests and
    SandboxError when this machine cannot run sandboxes.
    """
    cases, asserts = check_tests(tests)
    if pool is not None and limits is not None and limits != pool.limits:
        raise ValueError(f"run_tests: the pool's limits {pool.limits} apply to its runs; pass limits=None with a pool")
    limits = pool.limits if pool is not None else (limits or CODE_LIMITS)
    total = 1 if cases is None else len(cases)
    error = _compile_error(code)
    if error is not None:
        return CodeVerdict(False, 0, total, "compile_error", error)
    argv = (sandbox.python_executable(), "-I", "main.py")
    if cases is None:
        jobs = [Job(argv, files={"main.py": code + "\n\n" + asserts})]
    else:
        jobs = [Job(argv, stdin=case["input"], files={"main.py": code}) for case in cases]
    passed, first = 0, None
    results = _results(jobs, limits, pool)
    try:
        for i, result in enumerate(results):
            status = _failure(result)
            if status is None and cases is not None:
                got = result.stdout.decode("utf-8", "replace")
                if normalize_output(got) != normalize_output(cases[i]["output"]):
                    status = "wrong_answer"
                    detail = (
                        f"case {i + 1}/{total}: input {_clip(cases[i]['input'])}, expected {_clip(cases[i]['output'])}"
                        f", got {_clip(got)}"
                    )
            elif status is not None:
                end = _stderr_end(result.stderr)
                if (
                    cases is None
                    and status == "runtime_error"
                    and end.rpartition(" | ")[2].startswith("AssertionError")
                ):
                    status = "wrong_answer"
                detail = f"case {i + 1}/{total}: {result.reason}" + (f": {_clip(end)}" if end else "")
            if status is None:
                passed += 1
                continue
            first = first or (status, detail)
            if not all_cases:
                break
    finally:
        results.close()  # cancels the pool's queued runs after an early stop
    if first is None:
        return CodeVerdict(True, passed, total, "passed", "")
    return CodeVerdict(False, passed, total, *first)


def judge_code(
    completion: str, tests: Sequence[Mapping[str, str]] | Mapping[str, str], *, reasoning: bool = True, **kwargs: Any
) -> CodeVerdict:
    """The CodeVerdict of the code in `completion`'s answer (`extract_code`) on `tests`; "no_code" (nothing run) when
    the completion has no answer or its answer no Python block. A reasoning-mode completion's answer follows its
    reasoning; with `reasoning=False` the whole completion is the answer. `kwargs` go to `run_tests`."""
    check_tests(tests)  # a malformed task is an error even when the completion has no code
    code = extract_code(parse_reply(completion, reasoning=reasoning).answer)
    if code is None:
        total = len(tests) if not isinstance(tests, Mapping) else 1
        return CodeVerdict(False, 0, total, "no_code", "the answer has no ```python code block")
    return run_tests(code, tests, **kwargs)


def code_reward(completion: str, tests: Sequence[Mapping[str, str]] | Mapping[str, str], **kwargs: Any) -> float:
    """1.0 when the code of reasoning-mode `completion` passes `tests` (`judge_code`), else 0.0."""
    return 1.0 if judge_code(completion, tests, **kwargs).passed else 0.0


# --- math -------------------------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the brace group opening at text[start] == "{", or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


_ANSWER_IS = re.compile(r"(?:answer is|answer:)\s*(.+)", re.IGNORECASE)


def extract_answer(answer: str) -> str | None:
    """The final answer stated in `answer` (a reply's text after its reasoning), or None if it is blank.

    The content of the last closed `\\boxed{...}` / `\\fbox{...}` (nested braces kept; `\\boxed 5` also read), else
    the rest of the line after the last "answer is" / "Answer:", else the last non-blank line.
    """
    found = None
    for m in _BOX.finditer(answer):
        if m.group(1):
            group = _braced(answer, m.start(1))
            if group is not None:
                found = group[0]
        else:
            rest = re.match(r"[^\s$]+", answer[m.end() :])
            found = rest.group(0) if rest else found
    if found is not None:
        return found.strip()
    stated = _ANSWER_IS.findall(answer)
    if stated:
        return stated[-1].strip().rstrip(".").strip()
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    return lines[-1] if lines else None


_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{")
_UNIT = re.compile(r"(.*\d)\s*\\(?:text|mbox|mathrm)\{\s+[A-Za-z ]+\}(?:\^\{?\d\}?)?")  # "10\text{ cm}" (MATH style)
_ASSIGNMENT = re.compile(r"(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)\s*=(?!=)")
_SPACING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _unwrap(text: str) -> str:
    """`text` with each `\\text{...}`-style wrapper replaced by its content."""
    while m := _WRAPPERS.search(text):
        group = _braced(text, m.end() - 1)
        if group is None:
            break
        text = text[: m.start()] + group[0] + text[group[1] :]
    return text


def normalize_answer(s: str) -> str:
    """Math answer `s` in a canonical text form, for comparison.

    Drops `$`, `\\left` / `\\right`, spacing commands (`\\!`, `\\,`, `\\;`, `\\:`, `\\ `), `\\displaystyle`,
    degree signs (`^\\circ`, `^{\\circ}`, `°`), a unit written MATH-style after a number ("10\\text{ cm}"),
    whitespace, a trailing period and a leading "x =" (one variable, one "="); unwraps `\\text{...}` (and textbf,
    mathrm, mbox ...); writes `\\dfrac` / `\\tfrac` as `\\frac`, `\\frac12` as `\\frac{1}{2}`, `\\%` as `%`,
    `\\{ \\}` as `{ }`, the unicode minus as "-"; removes thousands separators from a number ("1,000" -> "1000").
    Returns the normalised string.
    """
    s = str(s).strip().replace("\u2212", "-").replace("$", "")
    if m := _UNIT.fullmatch(s):
        s = m.group(1)
    s = _SPACING.sub("", s)
    s = _unwrap(s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = "".join(s.split())
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(\d)(\{)", r"\\frac{\1}\2", s)
    s = s.rstrip(".")
    if s.count("=") == 1 and (m := _ASSIGNMENT.match(s)):
        s = s[m.end() :]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")  # a bounded exponent: 1e999999999 is not built
_SLASH = re.compile(r"([+-]?\d+)/([+-]?\d+)")
_FRAC = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")


def _number(s: str) -> tuple[Fraction, bool] | None:
    """(value, written with a decimal point or exponent) of normalised answer `s`, or None if it is not a number."""
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s), bool(re.search(r"[.eE]", s))
        if m := _SLASH.fullmatch(s):
            return (Fraction(int(m.group(1)), int(m.group(2))), False) if int(m.group(2)) else None
    except ValueError:  # over Python's limit on digits in an int
        return None
    if m := _FRAC.fullmatch(s):
        top, bottom = _number(m.group(2)), _number(m.group(3))
        if top is None or bottom is None or bottom[0] == 0:
            return None
        value = top[0] / bottom[0]
        return (-value if m.group(1) == "-" else value), top[1] or bottom[1]
    return None


def _elements(s: str) -> tuple[str, list[str]] | None:
    """(brackets, elements) of a normalised "(a,b)" / "[a,b]" / "{a,b}" answer split at top-level commas, or None."""
    if len(s) < 2 or s[0] + s[-1] not in ("()", "[]", "{}", "[)", "(]"):
        return None
    items, depth, start = [], 0, 1
    for i, ch in enumerate(s[1:-1], 1):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return None  # "(1)+(2)": the outer brackets are not one group
        if ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:-1])
    return (s[0] + s[-1], items) if depth == 0 and len(items) > 1 else None


def _equal(a: str, b: str) -> bool:
    if a == b:
        return bool(a)
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        if x[0] == y[0]:
            return True
        # A decimal may be a rounded value: equal within a relative 1e-6.
        return (x[1] or y[1]) and abs(x[0] - y[0]) <= REL_TOL * max(abs(x[0]), abs(y[0]))
    ea, eb = _elements(a), _elements(b)
    if ea is None or eb is None or ea[0] != eb[0] or len(ea[1]) != len(eb[1]):
        return False
    if ea[0] != "{}":
        return all(_equal(p, q) for p, q in zip(ea[1], eb[1], strict=True))
    left = list(eb[1])  # a set: each element matches a distinct element of the other, in any order
    for p in ea[1]:
        match = next((j for j, q in enumerate(left) if _equal(p, q)), None)
        if match is None:
            return False
        left.pop(match)
    return True


def answers_equal(a: str, b: str) -> bool:
    """Whether math answers `a` and `b` are the same: equal after `normalize_answer`, or both numbers (integers,
    decimals, "3/4", `\\frac{3}{4}`, negative) of equal value (exact; within a relative 1e-6 when one is written as a
    decimal), or both tuples / intervals (same brackets, element-wise) or sets `{...}` (any order) of equal elements.
    Percentages are not converted ("50%" is not 0.5). A blank answer equals nothing."""
    return bool(_equal(normalize_answer(a), normalize_answer(b)))


def answer_verdict(correct: bool, predicted: str | None, answer: str) -> tuple[str, str]:
    """(status, detail) of an answer-graded completion: "passed", "wrong_answer" or "no_answer" (nothing extracted),
    and "predicted ..., expected ..."."""
    status = "passed" if correct else ("no_answer" if predicted is None else "wrong_answer")
    return status, f"predicted {predicted!r}, expected {answer!r}"


def judge_math(completion: str, answer: str, *, reasoning: bool = True) -> tuple[bool, str | None]:
    """(correct, predicted answer or None) of `completion` (reasoning mode unless `reasoning=False`) against the
    expected `answer`."""
    predicted = extract_answer(parse_reply(completion, reasoning=reasoning).answer)
    return (predicted is not None and answers_equal(predicted, answer)), predicted


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the final answer of reasoning-mode `completion` (`extract_answer` of its answer part) equals `answer`
    (`answers_equal`), else 0.0."""
    return 1.0 if judge_math(completion, answer)[0] else 0.0


# --- one reward for GRPO ----------------------------------------------------------------------------------------------


def score(
    completion: str,
    task: Mapping[str, Any],
    *,
    format_weight: float = 0.0,
    reasoning: bool = True,
    limits: Limits | None = None,
) -> dict:
    """The reward of `completion` on `task`, with its parts. A reasoning-mode completion (the prompt ended with
    "<think>\\n") is graded on its answer after the reasoning; with `reasoning=False` the whole completion is the
    answer (and the format term is 0).

    task: {"kind": "code", "tests": [...] or {"asserts": ...}} (`judge_code`), {"kind": "math", "answer": str}
    (`judge_math`) or {"kind": "exact", "answer": str} (the stripped answer part equals the stripped expected text,
    for toy tasks). Returns {"reward": correct + format_weight * format, "correct": 1.0 or 0.0, "format":
    `format_reward(completion)`, "kind", "status", "detail"}; status is a CODE_STATUSES entry for code, else
    "passed", "wrong_answer" or "no_answer". limits go to `run_tests` (code tasks only).
    Raises ValueError naming the key of a malformed task.
    """
    kind = task.get("kind") if isinstance(task, Mapping) else None
    if kind not in KINDS:
        raise ValueError(f"task 'kind' must be one of {', '.join(KINDS)}; got {kind!r} in {task!r}")
    if kind == "code":
        if "tests" not in task:
            raise ValueError(f"a code task needs 'tests'; got keys {sorted(task)}")
        verdict = judge_code(completion, task["tests"], reasoning=reasoning, limits=limits)
        correct, status, detail = verdict.passed, verdict.status, verdict.detail
    else:
        if not isinstance(task.get("answer"), str):
            raise ValueError(f"a {kind} task needs 'answer', a str; got {task.get('answer')!r}")
        if kind == "math":
            correct, predicted = judge_math(completion, task["answer"], reasoning=reasoning)
        else:
            predicted = parse_reply(completion, reasoning=reasoning).answer.strip() or None
            correct = predicted == task["answer"].strip()
        status, detail = answer_verdict(correct, predicted, task["answer"])
    fmt = format_reward(completion) if reasoning else 0.0
    correct = 1.0 if correct else 0.0
    return {
        "reward": correct + format_weight * fmt,
        "correct": correct,
        "format": fmt,
        "kind": kind,
        "status": status,
        "detail": detail,
    }
