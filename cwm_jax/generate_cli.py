"""`cwm-generate`: complete a prompt, chat interactively, or predict an execution trace with a converted checkpoint.

    cwm-generate --checkpoint DIR --prompt "def fib(n):"
    cwm-generate --checkpoint DIR --chat [--reasoning]        # a user line per turn; EOF or /exit ends
    cwm-generate --checkpoint DIR --trace prog.py:main         # one JSON object per predicted frame

Known errors (bad checkpoint, tokenizer or input) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

EXIT = "/exit"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cwm-generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint folder (config.json, params/, tokenizer)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="raw text to continue (after a BOS token)")
    mode.add_argument("--chat", action="store_true", help=f"interactive chat on stdin until EOF or {EXIT}")
    mode.add_argument("--trace", metavar="FILE.py:FUNC", help="predict the trace of FUNC (or Class.method) of FILE.py")
    p.add_argument("--reasoning", action="store_true", help="chat in reasoning mode (<think> ... </think>)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (1024 for --trace)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0, the release's)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95, the release's)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.max_new_tokens is not None:
        sampling["max_new_tokens"] = args.max_new_tokens
    try:
        if args.trace is not None:
            path, sep, func = args.trace.rpartition(":")
            if not sep or not path or not func:
                raise ValueError(f"--trace {args.trace!r}: expected FILE.py:FUNC, e.g. prog.py:main")
            with open(path, encoding="utf-8") as f:
                source = f.read()
        from cwm_jax.generator import Generator  # after argument checks: importing JAX takes a while

        generator = Generator.from_checkpoint(args.checkpoint)
        if args.prompt is not None:
            # Streamed as generated; the newline ends the completion.
            generator.complete(args.prompt, **sampling, on_text=lambda piece: print(piece, end="", flush=True))
            print()
        elif args.trace is not None:
            for frame in generator.predict_trace(source, func, **sampling):
                print(json.dumps(dataclasses.asdict(frame)))
        else:
            _chat_loop(generator, args.reasoning, sampling)
    except (ValueError, OSError) as e:  # ValueError covers CheckpointError, TokenizerError, GeneratorError
        print(f"cwm-generate: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


def _chat_loop(generator, reasoning: bool, sampling: dict) -> None:
    """Read user lines from stdin, print each reply, keep the history (assistant answers without their reasoning)."""
    from cwm_jax.chat import Message

    history: list[Message] = []
    interactive = sys.stdin.isatty()
    seed = sampling.pop("seed")
    for turn, line in enumerate(_lines(interactive)):
        history.append(Message("user", line))
        reply = generator.chat(history, reasoning=reasoning, seed=seed + turn, **sampling)
        if reply.reasoning is not None:
            print(f"<think>\n{reply.reasoning}\n</think>")
        print(reply.answer, flush=True)
        history.append(Message("assistant", reply.answer))


def _lines(interactive: bool):
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == EXIT:
            return
        line = line.rstrip("\n")
        if line.strip():
            yield line


if __name__ == "__main__":
    sys.exit(main())
