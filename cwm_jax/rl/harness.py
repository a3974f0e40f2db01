"""`cwm-eval code` and `cwm-eval math`: pass@k of sampled reasoning-mode completions on code and math tasks.

    cwm-eval code (--checkpoint DIR | --solutions FILE) --tasks FILE [-n 1] [--k 1 5] [--temperature 1.0]
        [--top-p 0.95] [--max-new-tokens 2048] [--seed 0] [--limit N] [--workers N] [--out RESULTS.jsonl]
    cwm-eval math (--checkpoint DIR | --solutions FILE) --tasks FILE [same sampling options] [--out RESULTS.jsonl]

With `--checkpoint` the model answers each task n times (reasoning mode, the release's sampling defaults, seed + i for
sample i); with `--solutions` (JSONL `{"task_id", "completion"}`, one line per sample, any number per task) the given
completions are graded with no model. A completion is the text after the reasoning-mode prompt: reasoning, then
"\\n</think>\\n", then the answer; graded by `cwm_jax.rl.rewards` (code: the answer's last ```python block run in the
sandbox on the task's tests; math: the answer's last \\boxed{} against the expected answer).

Task files (JSONL, one task a line):
- code (LiveCodeBench style): {"task_id", "question", "tests": [{"input", "output"}, ...]} for programs reading stdin
  and writing stdout, or {"task_id", "question", "asserts": "assert f(1) == 2\\n...", "starter": "def f(x):"} for a
  function checked by assert statements ("starter", the signature, is optional).
- math (Math-500 style): {"task_id" or "unique_id", "problem", "answer"}; without "answer", the last \\boxed{} of a
  "solution" field.

pass@k is the unbiased estimator of the Codex paper per task (n samples, c correct), averaged over tasks. Known errors
print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cwm_jax.data.config import DataError
from cwm_jax.data.sources import iter_json_records
from cwm_jax.rl import rewards, sandbox

__all__ = [
    "CODE_FUNCTION_INSTRUCTION",
    "CODE_STDIO_INSTRUCTION",
    "MATH_INSTRUCTION",
    "HarnessError",
    "add_code_parser",
    "add_math_parser",
    "code_messages",
    "evaluate_code",
    "evaluate_math",
    "load_code_tasks",
    "load_math_tasks",
    "load_solutions",
    "math_messages",
    "pass_at_k",
    "run_code_eval",
    "run_math_eval",
    "sample_completions",
]

CODE_STDIO_INSTRUCTION = (
    "Write a complete Python 3 program that reads the input from standard input and writes the answer to standard "
    "output. Give the whole program in one ```python code block at the end of your response."
)
CODE_FUNCTION_INSTRUCTION = (
    "Implement the function in Python 3; it will be checked with assert statements. Give the whole implementation "
    "(imports included, no example calls and no input reading) in one ```python code block at the end of your "
    "response."
)
CODE_STARTER = "Start from this code:\n```python\n{starter}\n```"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# The release's sampling defaults (cwm_jax.generator.TEMPERATURE / TOP_P; spec section 4), kept here so that grading
# given solutions does not load the model code.
TEMPERATURE = 1.0
TOP_P = 0.95
MAX_NEW_TOKENS = 2048


class HarnessError(ValueError):
    """A task or solutions file, or an argument, the harness cannot use."""


# --- task files -------------------------------------------------------------------------------------------------------


def _records(path) -> Iterator[tuple[str, dict]]:
    """("FILE line N", record) for each non-blank line of JSONL file `path`; HarnessError for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such file")
    try:
        for _, where, record in iter_json_records(path):
            yield where, record
    except DataError as e:
        raise HarnessError(str(e)) from None


def _task_id(record: dict, where: str, seen: set[str]) -> str:
    key = "task_id" if "task_id" in record else "unique_id"
    task_id = record.get(key)
    if isinstance(task_id, bool) or not isinstance(task_id, (str, int)) or task_id == "":
        raise HarnessError(f"{where}: needs 'task_id' (or 'unique_id'), a non-empty string or integer; got {task_id!r}")
    task_id = str(task_id)
    if task_id in seen:
        raise HarnessError(f"{where}: task_id {task_id!r} appears twice; task ids must be unique")
    seen.add(task_id)
    return task_id


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise HarnessError(f"{where}: needs {key!r}, a non-empty string; got {value!r}")
    return value


def load_code_tasks(path) -> list[dict]:
    """The tasks of code task file `path` (JSONL), in file order: [{"task_id", "question", "tests", "starter"}], where
    tests is a list of {"input", "output"} cases or {"asserts": str} and starter a str or None. Raises HarnessError
    naming the file and line of a bad record."""
    tasks, seen = [], set()
    for where, record in _records(path):
        task_id = _task_id(record, where, seen)
        question = _text(record, "question", where)
        if ("tests" in record) == ("asserts" in record):
            raise HarnessError(f"{where}: give either 'tests' (stdin/stdout cases) or 'asserts' (a string), not both")
        if "asserts" in record:
            tests = {"asserts": _text(record, "asserts", where)}
        else:
            tests = record["tests"]
            if not isinstance(tests, list) or not tests:
                raise HarnessError(f"{where}: 'tests' must be a non-empty list of {{'input', 'output'}} objects")
        try:
            rewards.check_tests(tests)
        except ValueError as e:
            raise HarnessError(f"{where}: {e}") from None
        starter = record.get("starter")
        if starter is not None and not isinstance(starter, str):
            raise HarnessError(f"{where}: 'starter' must be a string (the function's signature); got {starter!r}")
        tasks.append({"task_id": task_id, "question": question, "tests": tests, "starter": starter or None})
    if not tasks:
        raise HarnessError(f"{path}: no tasks in the file")
    return tasks


def load_math_tasks(path) -> list[dict]:
    """The tasks of math task file `path` (JSONL), in file order: [{"task_id", "problem", "answer"}]. A number answer
    is read as its JSON text; with no "answer", the last \\boxed{} of "solution" is the answer. Raises HarnessError
    naming the file and line of a bad record."""
    tasks, seen = [], set()
    for where, record in _records(path):
        task_id = _task_id(record, where, seen)
        problem = _text(record, "problem", where)
        answer = record.get("answer")
        if answer is None and isinstance(record.get("solution"), str):
            answer = rewards.extract_answer(record["solution"]) if "\\boxed" in record["solution"] else None
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = json.dumps(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise HarnessError(f"{where}: needs 'answer' (or a 'solution' with \\boxed{{}}), a non-empty string")
        tasks.append({"task_id": task_id, "problem": problem, "answer": answer})
    if not tasks:
        raise HarnessError(f"{path}: no tasks in the file")
    return tasks


def load_solutions(path, task_ids: Sequence[str]) -> dict[str, list[str]]:
    """Completions of solutions file `path` (JSONL {"task_id", "completion"}, any number of lines per task) by task
    id, in file order, for the ids in `task_ids`; a line whose task_id is not in `task_ids` is skipped. Raises
    HarnessError naming the file and line of a bad record, or the tasks that have no completion."""
    by_task: dict[str, list[str]] = {task_id: [] for task_id in task_ids}
    for where, record in _records(path):
        task_id = record.get("task_id")
        if isinstance(task_id, bool) or not isinstance(task_id, (str, int)):
            raise HarnessError(f"{where}: needs 'task_id', a string or integer; got {task_id!r}")
        if not isinstance(record.get("completion"), str):
            raise HarnessError(f"{where}: needs 'completion', the generated text as a string")
        if str(task_id) in by_task:
            by_task[str(task_id)].append(record["completion"])
    missing = [task_id for task_id, completions in by_task.items() if not completions]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HarnessError(f"{path}: no completion for task {shown}; add lines for them or evaluate fewer (--limit)")
    return by_task


# --- prompts and sampling ---------------------------------------------------------------------------------------------


def code_messages(task: Mapping[str, Any]) -> list[dict]:
    """The chat messages of a code task (one user message; the reasoning system prompt comes with reasoning=True):
    the question, then CODE_STDIO_INSTRUCTION, or for assert tasks CODE_FUNCTION_INSTRUCTION and the starter."""
    if isinstance(task["tests"], Mapping):
        parts = [task["question"], CODE_FUNCTION_INSTRUCTION]
        if task.get("starter"):
            parts.append(CODE_STARTER.format(starter=task["starter"].rstrip("\n")))
    else:
        parts = [task["question"], CODE_STDIO_INSTRUCTION]
    return [{"role": "user", "content": "\n\n".join(part.strip("\n") for part in parts)}]


def math_messages(task: Mapping[str, Any]) -> list[dict]:
    """The chat messages of a math task: one user message, the problem then MATH_INSTRUCTION."""
    return [{"role": "user", "content": task["problem"].strip("\n") + "\n\n" + MATH_INSTRUCTION}]


def sample_completions(
    generator,
    messages: Sequence[Mapping[str, str]],
    n: int,
    *,
    temperature: float = TEMPERATURE,
    top_p: float | None = TOP_P,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
) -> list[str]:
    """n reasoning-mode completions of `messages` from `generator` (a cwm_jax.generator.Generator): the raw texts that
    follow the prompt's "<think>\\n", sampled together from one shared prefill of the prompt (`Generator.sample_chat`).
    """
    return generator.sample_chat(
        messages, n, reasoning=True, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )


# --- scoring ----------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate 1 - C(n-c, k) / C(n, k) for n samples of which c are correct (1 <= k <= n),
    as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i) (Chen et al. 2021), which is numerically stable for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def _summary(tasks: Sequence[Mapping], records: list[dict], ks: Sequence[int]) -> dict:
    """Per-task and mean pass@k of graded `records` (in task order); a k is averaged only when every task has k
    samples or more."""
    by_task: dict[str, list[bool]] = collections.defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(r["passed"])
    per_task = []
    for task in tasks:
        passed = by_task[task["task_id"]]
        n, c = len(passed), sum(passed)
        per_task.append(
            {
                "task_id": task["task_id"],
                "n": n,
                "correct": c,
                "pass_at_k": {k: pass_at_k(n, c, k) for k in ks if k <= n},
            }
        )
    means = {}
    for k in sorted(set(ks)):
        if per_task and all(k in t["pass_at_k"] for t in per_task):
            means[k] = sum(t["pass_at_k"][k] for t in per_task) / len(per_task)
    return {
        "tasks": len(tasks),
        "samples_per_task": [t["n"] for t in per_task],
        "pass_at_k": means,
        "per_task": per_task,
        "statuses": dict(collections.Counter(r["status"] for r in records).most_common()),
        "records": records,
    }


def _samples(tasks: Sequence[Mapping], completions_by_task: Mapping[str, Sequence[str]]) -> list[tuple[dict, int, str]]:
    items = []
    for task in tasks:
        completions = completions_by_task.get(task["task_id"]) or []
        if not completions:
            raise HarnessError(f"no completions for task {task['task_id']!r}")
        items += [(task, i, completion) for i, completion in enumerate(completions)]
    return items


def _check_workers(workers: int | None) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise HarnessError(f"--workers must be a positive integer, got {workers!r}")


def evaluate_code(
    tasks: Sequence[Mapping[str, Any]],
    completions_by_task: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1, 5),
    workers: int | None = None,
    limits: sandbox.Limits | None = None,
    on_sample: Callable[[dict], None] | None = None,
) -> dict:
    """Grade code completions (`rewards.judge_code`) and compute pass@k.

    tasks: as `load_code_tasks` returns; completions_by_task: task_id -> completions (every task needs one or more).
    Samples are graded `workers` at a time (default: the CPU count), each in its own thread running its cases one
    after another in sandboxes (`limits` per case, default rewards.CODE_LIMITS) and stopping at its first failing
    case. `on_sample(record)` is called as each sample's verdict arrives (in order).
    Returns {"tasks", "samples_per_task": [n per task], "pass_at_k": {k: mean over tasks} (only the k that every
    task has samples for), "per_task": [{"task_id", "n", "correct", "pass_at_k": {k: value}}], "statuses": {status:
    count}, "records": [{"task_id", "sample", "completion", "passed", "status", "detail"}]}.
    Raises SandboxError when this machine cannot run sandboxes.
    """
    _check_workers(workers)
    items = _samples(tasks, completions_by_task)
    workers = workers or os.cpu_count() or 1

    def judge(item: tuple[dict, int, str]) -> rewards.CodeVerdict:
        task, _, completion = item
        return rewards.judge_code(completion, task["tests"], limits=limits)

    records = []
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cwm-eval-code") as executor:
        for (task, i, completion), verdict in zip(items, executor.map(judge, items), strict=True):
            record = {
                "task_id": task["task_id"],
                "sample": i,
                "completion": completion,
                "passed": verdict.passed,
                "status": verdict.status,
                "detail": verdict.detail,
            }
            records.append(record)
            if on_sample is not None:
                on_sample(record)
    return _summary(tasks, records, ks)


def evaluate_math(
    tasks: Sequence[Mapping[str, Any]], completions_by_task: Mapping[str, Sequence[str]], *, ks: Sequence[int] = (1,)
) -> dict:
    """Grade math completions (`rewards.judge_math`) and compute pass@k. Arguments and result as `evaluate_code`;
    records also carry "predicted" (the extracted answer or None) and "expected", and status is "passed",
    "wrong_answer" or "no_answer"."""
    records = []
    for task, i, completion in _samples(tasks, completions_by_task):
        correct, predicted = rewards.judge_math(completion, task["answer"])
        status, detail = rewards.answer_verdict(correct, predicted, task["answer"])
        records.append(
            {
                "task_id": task["task_id"],
                "sample": i,
                "completion": completion,
                "passed": correct,
                "status": status,
                "detail": detail,
                "predicted": predicted,
                "expected": task["answer"],
            }
        )
    return _summary(tasks, records, ks)


# --- the command line -------------------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, kind: str) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="converted checkpoint folder (with its tokenizer): sample completions")
    source.add_argument("--solutions", help='JSONL {"task_id", "completion"} lines: grade these, no model')
    parser.add_argument("--tasks", required=True, help=f"JSONL {kind} tasks (see `pydoc cwm_jax.rl.harness`)")
    parser.add_argument("-n", "--samples", type=int, default=1, help="completions per task (model mode)")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k for these k (each <= samples per task)")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="the release's default: 1.0")
    parser.add_argument("--top-p", type=float, default=TOP_P, help="the release's default: 0.95")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="per completion")
    parser.add_argument("--seed", type=int, default=0, help="sample i of every task uses seed + i")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N tasks")
    parser.add_argument("--out", help="write every sample and its verdict here (JSONL)")


def add_code_parser(subparsers) -> argparse.ArgumentParser:
    """Add the "code" command (handler `run_code_eval`, also set as the parser's default `func`) to argparse
    `subparsers` (what `parser.add_subparsers()` returns); returns its parser."""
    parser = subparsers.add_parser("code", help="code generation: pass@k on stdin/stdout or assert tests")
    _add_common(parser, "code")
    parser.add_argument("--workers", type=int, default=None, help="samples graded at a time (default: CPU count)")
    parser.set_defaults(func=run_code_eval)
    return parser


def add_math_parser(subparsers) -> argparse.ArgumentParser:
    """Add the "math" command (handler `run_math_eval`, also set as the parser's default `func`) to argparse
    `subparsers`; returns its parser."""
    parser = subparsers.add_parser("math", help="math answers: pass@k of the final \\boxed{} answer")
    _add_common(parser, "math")
    parser.set_defaults(func=run_math_eval)
    return parser


def _completions(args, tasks: list[dict], messages: Callable[[dict], list[dict]], name: str) -> dict[str, list[str]]:
    """Completions by task id: read from --solutions, or sampled from --checkpoint with a progress bar."""
    if args.solutions:
        return load_solutions(args.solutions, [t["task_id"] for t in tasks])
    from cwm_jax.generator import Generator

    if args.samples < 1:
        raise HarnessError(f"-n/--samples must be at least 1, got {args.samples}")
    _check_ks(args.k, {t["task_id"]: args.samples for t in tasks})  # before the slow part
    generator = Generator.from_checkpoint(args.checkpoint)
    by_task = {}
    for task in tqdm(tasks, unit="task", desc=f"cwm-eval {name}"):
        by_task[task["task_id"]] = sample_completions(
            generator,
            messages(task),
            args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    return by_task


def _check_ks(ks: Sequence[int], samples: Mapping[str, int]) -> None:
    """HarnessError unless every k of --k is at least 1 and at most the samples of every task (task id -> count)."""
    for k in ks:
        if k < 1:
            raise HarnessError(f"--k {k}: k must be at least 1")
        short = next((task_id for task_id, n in samples.items() if n < k), None)
        if short is not None:
            raise HarnessError(
                f"--k {k} needs at least {k} samples per task; task {short!r} has {samples[short]} (raise -n, add "
                "solutions, or lower --k)"
            )


def write_records(path: str, records: list[dict]) -> None:
    """`records` as JSONL at `path`, which appears only complete (a temporary file renamed into place)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _print_summary(summary: dict, ks: Sequence[int]) -> None:
    n = summary["samples_per_task"]
    samples = str(n[0]) if min(n) == max(n) else f"{min(n)} to {max(n)}"
    print(f"tasks: {summary['tasks']}, samples per task: {samples}")
    for k in sorted(set(ks)):
        print(f"pass@{k}: {summary['pass_at_k'][k]:.4f}")
    print("statuses: " + ", ".join(f"{status} {count}" for status, count in summary["statuses"].items()))


def _run(args, name: str, load, messages, evaluate) -> int:
    from cwm_jax.generator import GeneratorError
    from cwm_jax.hf import CheckpointError

    try:
        tasks = load(args.tasks)
        if args.limit is not None:
            if args.limit < 1:
                raise HarnessError(f"--limit must be at least 1, got {args.limit}")
            tasks = tasks[: args.limit]
        by_task = _completions(args, tasks, messages, name)
        _check_ks(args.k, {task_id: len(completions) for task_id, completions in by_task.items()})
        summary = evaluate(tasks, by_task)
        if args.out:
            write_records(args.out, summary["records"])
    except (HarnessError, GeneratorError, CheckpointError, sandbox.SandboxError, OSError) as e:
        print(f"cwm-eval {name}: error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary, args.k)
    return 0


def run_code_eval(args: argparse.Namespace) -> int:
    """The body of `cwm-eval code` for the arguments `add_code_parser` defines; returns the exit status (0, or 2
    after one error line on stderr)."""

    def evaluate(tasks, by_task):
        _check_workers(args.workers)  # before the bar draws on stderr
        with tqdm(total=sum(map(len, by_task.values())), unit="sample", desc="grading", leave=False) as bar:
            return evaluate_code(tasks, by_task, ks=args.k, workers=args.workers, on_sample=lambda r: bar.update())

    return _run(args, "code", load_code_tasks, code_messages, evaluate)


def run_math_eval(args: argparse.Namespace) -> int:
    """The body of `cwm-eval math` for the arguments `add_math_parser` defines; returns the exit status (0, or 2
    after one error line on stderr)."""
    return _run(
        args, "math", load_math_tasks, math_messages, lambda tasks, by_task: evaluate_math(tasks, by_task, ks=args.k)
    )
