"""`cwm-eval`: evaluation harnesses on a converted checkpoint.

    cwm-eval trace --checkpoint DIR --tasks FILE [--limit N] [--max-new-tokens 1024] [--temperature 0] [--seed 0]
        [--workers N] [--out RESULTS.jsonl]

    cwm-eval code (--checkpoint DIR | --solutions FILE) --tasks FILE [-n 1] [--k 1 5] [--temperature 1.0]
        [--top-p 0.95] [--max-new-tokens 2048] [--limit N] [--workers N] [--out RESULTS.jsonl]
    cwm-eval math (--checkpoint DIR | --solutions FILE) --tasks FILE [-n 1] [--k 1] ... [--out RESULTS.jsonl]

`trace`: the world-model evaluation of `cwm_jax.traces.evaluate`: for each (function, call) task the model predicts
the execution trace from the real call frame; prints output exact match (CruxEval-O style), next-line accuracy and
locals accuracy, and with `--out` writes one JSON line per task. `code` (LiveCodeBench-style stdin/stdout or assert
tasks, run in the sandbox) and `math` (Math-500-style answers): pass@k with the unbiased estimator over n samples at
the release's sampling defaults, or over given completions (`--solutions`); `cwm_jax.rl.harness`. Known errors print
one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cwm-eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    trace = sub.add_parser("trace", help="trace prediction: output exact match, next-line and locals accuracy")
    trace.add_argument("--checkpoint", required=True, help="converted checkpoint folder (with its tokenizer)")
    trace.add_argument("--tasks", required=True, help="JSONL: {source, entry, call(s)} or cwm-data traces records")
    trace.add_argument("--limit", type=int, default=None, help="evaluate the first N tasks")
    trace.add_argument("--max-new-tokens", type=int, default=1024, help="per predicted trace")
    trace.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--workers", type=int, default=None, help="sandboxes tracing the tasks at a time")
    trace.add_argument("--out", help="write per-task results here (JSONL)")
    from cwm_jax.rl import harness

    harness.add_code_parser(sub)
    harness.add_math_parser(sub)
    return parser


def _trace(args) -> int:
    from cwm_jax.checkpoint import CheckpointError
    from cwm_jax.data.config import DataError
    from cwm_jax.generator import Generator, GeneratorError
    from cwm_jax.rl.sandbox import SandboxError
    from cwm_jax.traces import evaluate

    try:
        tasks, skipped = evaluate.load_tasks(args.tasks, workers=args.workers)
        tasks = tasks[: args.limit] if args.limit else tasks
        if not tasks:
            raise DataError(f"{args.tasks}: no task with a complete trace (skipped: {skipped})")
        gen = Generator.from_checkpoint(args.checkpoint)
        with tqdm(total=len(tasks), unit="task", desc="cwm-eval trace") as bar:
            summary = evaluate.evaluate(
                gen, tasks, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                on_task=lambda r: bar.update(),
            )  # fmt: skip
        if args.out:
            from cwm_jax.rl.harness import write_records

            write_records(args.out, summary["results"])
    except (OSError, DataError, CheckpointError, GeneratorError, SandboxError) as e:
        print(f"cwm-eval trace: error: {e}", file=sys.stderr)
        return 2
    print(f"tasks: {summary['tasks']}" + (f" (skipped, trace incomplete: {skipped})" if skipped else ""))
    print(f"output exact match: {summary['output_exact']:.3f}")
    print(f"next-line accuracy: {summary['line_accuracy']:.3f}")
    print(f"locals accuracy:    {summary['locals_accuracy']:.3f}")
    print(f"traces closed:      {summary['closed']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "trace":
        return _trace(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
