"""The neural debugger: pdb-style stepping through a program whose frames the model predicts (`cwm-debug`).

The release's debugger (its demos/cwmdbg.py) prompts the model with the trace so far and asks for one frame at a
time, forcing the event token where a command needs one; this is the same protocol on `Generator.predict_frames`:
- step: the next frame; after a call frame, a line frame is forced (step into the callee);
- next: the next frame, and if that is a call, its return is forced and then the frame after it (step over);
- out: frames until the current function returns (callees stepped over), then one more;
- back: drop the last frame; reset: start again; print [name]: the locals, ".." resolved as the release does.
Where the program can run (`call` given), the real trace (the tracer in a sandbox) is shown beside the prediction,
frame for frame, and the real call frame starts the session, so the model predicts from the real inputs; without it
the model predicts the call frame too, inventing inputs as the release's debugger does.

    cwm-debug FILE.py --checkpoint DIR [--entry NAME] [--call "f(3)"] [--temperature 0.0]

The entry is the function whose `def` line carries `# << START_OF_TRACE`, or `--entry`. Commands are read from stdin.
"""

from __future__ import annotations

import argparse
import ast
import sys

from cwm_jax.chat import TRACE_MARKER, Frame
from cwm_jax.traces import chat_frames, frame_dicts, run
from cwm_jax.traces.tracer import resolve_locals

MAX_FRAME_TOKENS = 1024  # one frame's tokens at most (a frame with big locals); the context left caps it too
COMMANDS = """\
s, step      step to the next frame (into calls)
n, next      next frame in this function (over calls)
o, out       run until this function returns
b, back      drop the last frame
p, print     print the locals (p NAME: one)
r, real      the real frame at this step (with --call)
reset        start again
q, quit      leave"""


class DebugError(ValueError):
    """A source the debugger cannot use (no entry, syntax error)."""


class NeuralDebugger:
    """Predicted frames of `entry` in `source` (see the module docstring), stepped by commands.

    generator: a `cwm_jax.generator.Generator`. real: the tracer's result for the same source (e.g. from
    `run.trace(source, entry, call=...)`) or None. Sampling: `temperature` (0 greedy), `seed` (advanced per frame).
    """

    def __init__(self, generator, source: str, entry: str, *, real: dict | None = None, temperature=0.0, seed=0):
        self.generator, self.source, self.entry = generator, source, entry
        self.real = chat_frames(real["frames"]) if real and real.get("frames") else None
        self.temperature, self.seed = temperature, seed
        self.frames: list[Frame] = []
        self.done = False
        self.error: str | None = None
        self.reset()

    @property
    def current(self) -> Frame:
        return self.frames[-1]

    def reset(self) -> Frame:
        self.frames, self.done, self.error = [], False, None
        if self.real:
            self.frames.append(self.real[0])
        else:
            self._step("call")
        return self.current

    def _step(self, event: str | None = None) -> None:
        """Predicts one frame (forcing `event`); marks the session done when the model ends the trace."""
        if self.done:
            return
        new, ended = self.generator.predict_frames(
            self.source, self.entry, self.frames, event=event, one_frame=True, max_new_tokens=MAX_FRAME_TOKENS,
            temperature=self.temperature, seed=self.seed + len(self.frames),
        )  # fmt: skip
        if new:
            self.frames.append(new[0])
        else:
            self.done = True
            self.error = None if ended else "the model's next frame is malformed or cut; the session ends here"

    def step(self) -> Frame:
        self._step("line" if self.current.event == "call" else None)
        return self.current

    def next(self) -> Frame:
        self._step()
        if not self.done and self.current.event == "call":
            self._step("return")
            self._step()
        return self.current

    def out(self) -> Frame:
        while not self.done:
            self._step("return" if self.current.event == "call" else None)
            if self.current.event == "return":
                self._step()
                break
        return self.current

    def back(self) -> Frame:
        if len(self.frames) > 1:
            self.frames.pop()
            self.done, self.error = False, None
        return self.current

    def locals(self) -> dict[str, str]:
        """The current frame's locals with ".." resolved (for a return / exception frame: the frame before it)."""
        resolved = resolve_locals(frame_dicts(self.frames))
        return dict(resolved[-1] or {})

    def real_frame(self) -> Frame | None:
        """The real trace's frame at the current index (None without a real trace or past its end)."""
        if self.real is None or len(self.frames) > len(self.real):
            return None
        return self.real[len(self.frames) - 1]


def describe(frame: Frame | None) -> str:
    """One frame as the debugger prints it: `-> line`, and the value of a return or exception."""
    if frame is None:
        return "(none)"
    text = f"-> {frame.source_line.rstrip()}"
    if frame.event in ("return", "exception"):
        text += f"\n   {frame.event}: {frame.value}"
    return text


def find_entry(source: str) -> tuple[str, str]:
    """(source without the marker, entry name) of a source whose `def` line carries `# << START_OF_TRACE`. Raises
    DebugError when no line or several carry it, or the marked line is not a `def`."""
    marker = TRACE_MARKER.strip()
    lines = source.splitlines(keepends=True)
    marked = [i for i, line in enumerate(lines) if marker in line]
    if len(marked) != 1:
        raise DebugError(f"found {len(marked)} lines marked {marker!r}; mark one `def` line, or pass --entry")
    i = marked[0]
    lines[i] = lines[i].replace(TRACE_MARKER, "").replace(marker, "")
    clean = "".join(lines)
    try:
        tree = ast.parse(clean)
    except SyntaxError as e:
        raise DebugError(f"the source does not parse ({e})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.lineno <= i + 1 <= node.body[0].lineno:
            return clean, node.name
    raise DebugError(f"line {i + 1} carries {marker!r} but is not a function's `def` line")


def repl(dbg: NeuralDebugger, *, read=input, write=print) -> None:
    """The interactive loop: prints the current frame (and the real one beside it), reads commands until quit / EOF."""
    show = True
    while True:
        if show:
            write(describe(dbg.current))
            if dbg.done:
                write(dbg.error or "(the model ended the trace)")
            show = False
        try:
            cmd = read(">> ").strip()
        except EOFError:
            break
        name, _, arg = cmd.partition(" ")
        if name in ("q", "quit"):
            break
        if name in ("h", "help", "?"):
            write(COMMANDS)
        elif name in ("s", "step", "n", "next", "o", "out", "b", "back", "reset"):
            action = {"s": "step", "n": "next", "o": "out", "b": "back"}.get(name, name)
            getattr(dbg, action)()
            show = True
        elif name in ("p", "print"):
            lv = dbg.locals()
            write(lv if not arg else lv.get(arg, f"no such variable: {arg}"))
        elif name in ("r", "real"):
            write("real: " + describe(dbg.real_frame()) if dbg.real else "no real trace (pass --call)")
        elif cmd:
            write(f"unknown command {cmd!r}; h for help")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cwm-debug", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="Python source; mark the entry's def line with '# << START_OF_TRACE' or --entry")
    parser.add_argument("--checkpoint", required=True, help="converted checkpoint folder (with its tokenizer)")
    parser.add_argument("--entry", help="entry function (default: the marked one)")
    parser.add_argument("--call", help='a call to run for the real trace and inputs, e.g. "f(3)"')
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the release's demo uses 0.6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from cwm_jax.checkpoint import CheckpointError
    from cwm_jax.generator import Generator, GeneratorError

    try:
        with open(args.file, encoding="utf-8") as f:
            source = f.read()
        if args.entry:
            entry = args.entry
            if TRACE_MARKER.strip() in source:
                source = find_entry(source)[0]
        else:
            source, entry = find_entry(source)
        real = run.trace(source, entry, call=args.call) if args.call else None
        if real is not None and not real["frames"]:
            print(f"cwm-debug: the real run gave no trace ({real['status']}: {real.get('error')})", file=sys.stderr)
            real = None
        gen = Generator.from_checkpoint(args.checkpoint)
        dbg = NeuralDebugger(gen, source, entry, real=real, temperature=args.temperature, seed=args.seed)
    except (OSError, DebugError, CheckpointError, GeneratorError, ValueError) as e:
        print(f"cwm-debug: error: {e}", file=sys.stderr)
        return 2
    print(f"===== {args.file}: entry {entry}" + (f", real trace of {args.call}" if real else "") + " =====")
    print("h for help")
    repl(dbg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
