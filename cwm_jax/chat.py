"""CWM prompt formats (`../shared/spec/cwm.md` section 4): chat, reasoning, tools and trace prediction, and parsing.

Prompts are rendered as segments `(kind, text)`: kind "special" holds one special token written as its string, kind
"text" holds ordinary text that a tokenizer must encode without parsing special strings, so a message containing the
literal "<|eot_id|>" stays text. `segments_to_text` gives the prompt as one string; `encode_segments` gives token ids
through any tokenizer with `encode(text)` (no special parsing) and `encode_special(token) -> int`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
FRAME_SEP = "<|frame_sep|>"
ACTION_SEP = "<|action_sep|>"
RETURN_SEP = "<|return_sep|>"
CALL_SEP = "<|call_sep|>"
LINE_SEP = "<|line_sep|>"
EXCEPTION_SEP = "<|exception_sep|>"
ARG_SEP = "<|arg_sep|>"
TRACE_CONTEXT_START = "<|trace_context_start|>"
# Generation stops on any of these (spec section 3).
STOP_TOKENS = (END_OF_TEXT, EOM, EOT)

REASONING_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. You always reason before responding, using the following format:\n"
    "\n"
    "<think>\n"
    "your internal reasoning\n"
    "</think>\n"
    "your external response"
)
THINK_START = "<think>\n"
THINK_END = "\n</think>\n"
TRACE_MARKER = "  # << START_OF_TRACE"

TOOL_NAME = r"[A-Za-z0-9_.\-]+"
_TOOL_ROLE = re.compile(rf"tool: ({TOOL_NAME})")
_TOOL_CALL = re.compile(rf"<tool: ({TOOL_NAME})>\n(?:(.*?)\n)?</tool>", re.DOTALL)
ROLES = ("system", "user", "assistant", "tool: NAME")

EVENTS = ("call", "line", "return", "exception")
EVENT_SEP = {"call": CALL_SEP, "line": LINE_SEP, "return": RETURN_SEP, "exception": EXCEPTION_SEP}
_SEP_EVENT = {sep: event for event, sep in EVENT_SEP.items()}
_TRACE_END = re.compile("|".join(re.escape(t) for t in STOP_TOKENS))


class Segment(NamedTuple):
    """One piece of a prompt: kind "special" (text is one special token's string) or "text" (ordinary text)."""

    kind: str
    text: str


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def encode_special(self, token: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat message; role is "system", "user", "assistant" or "tool: NAME" (e.g. "tool: bash")."""

    role: str
    content: str

    def __post_init__(self):
        if self.role not in ("system", "user", "assistant") and not _TOOL_ROLE.fullmatch(self.role):
            raise ValueError(
                f"message role {self.role!r} is not one of {', '.join(ROLES)} (NAME matching {TOOL_NAME}); "
                "fix the role of this message"
            )
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be str, found {type(self.content).__name__} (role {self.role!r})")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call `<tool: NAME>\\nBODY\\n</tool>` found in a reply."""

    name: str
    body: str


@dataclasses.dataclass(frozen=True)
class Reply:
    """A parsed reply. `reasoning` is None outside reasoning mode; `answer` is the text after the think block,
    verbatim (tool call blocks included), and `tool_calls` are the complete tool calls found in it, in order."""

    reasoning: str | None
    answer: str
    tool_calls: tuple[ToolCall, ...]


@dataclasses.dataclass(frozen=True)
class Frame:
    """One step of an execution trace.

    event is "call", "line", "return" or "exception". Call and line frames carry `locals` (variable name -> repr
    string, ".." for a value unchanged since the previous frame of the same scope) and no value; return and
    exception frames carry `value` (the repr string) and no locals. `source_line` is the line being executed.
    """

    event: str
    locals: dict[str, str] | None
    source_line: str
    value: str | None = None

    def __post_init__(self):
        if self.event not in EVENTS:
            raise ValueError(f"frame event {self.event!r} is not one of {EVENTS}")
        if self.event in ("call", "line"):
            if not isinstance(self.locals, dict) or self.value is not None:
                raise ValueError(f"a {self.event} frame needs locals (a dict) and no value; found {self}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.locals.items()):
                raise ValueError(f"frame locals must map names to repr strings; found {self.locals!r}")
        elif self.locals is not None or not isinstance(self.value, str):
            raise ValueError(f"a {self.event} frame needs a value (a repr string) and no locals; found {self}")


def _segments(pieces: Iterable[Segment]) -> list[Segment]:
    # Adjacent text is merged and empty text dropped, so BPE sees the same runs as when encoding the whole string.
    out: list[Segment] = []
    for kind, text in pieces:
        if kind == "text" and not text:
            continue
        if kind == "text" and out and out[-1].kind == "text":
            out[-1] = Segment("text", out[-1].text + text)
        else:
            out.append(Segment(kind, text))
    return out


def _special(token: str) -> Segment:
    return Segment("special", token)


def _text(text: str) -> Segment:
    return Segment("text", text)


def _as_message(m: Message | Mapping[str, Any]) -> Message:
    return m if isinstance(m, Message) else Message(role=m["role"], content=m["content"])


def render_chat(
    messages: Sequence[Message | Mapping[str, Any]], *, add_generation_prompt: bool = True, reasoning: bool = False
) -> list[Segment]:
    """The chat prompt for `messages` (Message or {"role", "content"} mappings) as segments.

    With `add_generation_prompt` the prompt ends with the assistant header (and, in reasoning mode, the text
    "<think>\\n"). With `reasoning` the system prompt starts with REASONING_SYSTEM_PROMPT: a leading system message
    follows it after a blank line; without one the reasoning prompt alone is the system message.
    """
    messages = [_as_message(m) for m in messages]
    if reasoning:
        if messages and messages[0].role == "system":
            messages[0] = Message("system", REASONING_SYSTEM_PROMPT + "\n\n" + messages[0].content)
        else:
            messages.insert(0, Message("system", REASONING_SYSTEM_PROMPT))
    pieces = [_special(BEGIN_OF_TEXT)]
    for m in messages:
        pieces += [
            _special(START_HEADER),
            _text(m.role),
            _special(END_HEADER),
            _text("\n\n" + m.content),
            _special(EOT),
        ]
    if add_generation_prompt:
        pieces += [_special(START_HEADER), _text("assistant"), _special(END_HEADER), _text("\n\n")]
        if reasoning:
            pieces.append(_text(THINK_START))
    return _segments(pieces)


def _line_starts(source: str) -> list[int]:
    # Line breaks as Python's tokenizer counts them (\r\n, \r, \n), so ast line numbers index this list.
    return [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", source)]


def _find_def(tree: ast.Module, entry_function: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    scope: ast.AST = tree
    found: ast.AST | None = None
    parts = entry_function.split(".")
    for i, name in enumerate(parts):
        want = (ast.FunctionDef, ast.AsyncFunctionDef) if i == len(parts) - 1 else (ast.ClassDef,)
        candidates = [n for n in _scope_defs(scope) if isinstance(n, want) and n.name == name]
        if not candidates:
            kind = "function" if i == len(parts) - 1 else "class"
            where = "the module" if i == 0 else ".".join(parts[:i])
            defined = sorted({n.name for n in _scope_defs(scope) if isinstance(n, want)})
            raise ValueError(
                f"no {kind} {name!r} defined directly in {where} (looking for entry function {entry_function!r}); "
                f"{kind}s there: {defined or 'none'}. Name a top-level function or 'Class.method'"
            )
        # The last definition is the one bound when the code runs (redefinitions, if/else variants).
        found = scope = candidates[-1]
    return found


def _scope_defs(scope: ast.AST) -> Iterable[ast.AST]:
    # Definitions of this scope, including those under if/try/with/for blocks, but not inside nested defs or classes.
    stack = list(getattr(scope, "body", []))
    while stack:
        node = stack.pop(0)
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                stack.extend(getattr(node, field, []))


def mark_entry(source: str, entry_function: str) -> str:
    """`source` with TRACE_MARKER appended to the `def` line of `entry_function` ("name" or "Class.method").

    The marker goes at the end of the line holding the `def` keyword (after decorators; for a multi-line signature,
    the first line). Raises ValueError if the source does not parse or defines no such function.
    """
    if TRACE_MARKER.strip() in source:
        raise ValueError(f"source already contains {TRACE_MARKER.strip()!r}; pass the source without an entry marker")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"trace source does not parse as Python ({e}); the entry function is found with ast") from e
    node = _find_def(tree, entry_function)
    starts = _line_starts(source)
    line = node.lineno - 1
    end = starts[line + 1] if line + 1 < len(starts) else len(source)
    end -= len(re.search(r"(\r\n|\r|\n)?$", source[starts[line] : end]).group(0))
    return source[:end] + TRACE_MARKER + source[end:]


def render_trace_prompt(source: str, entry_function: str) -> list[Segment]:
    """The trace-prediction prompt `<|begin_of_text|><|trace_context_start|>{marked source}<|frame_sep|>`.

    The source is kept byte for byte apart from the entry marker (see `mark_entry`); no newline is added or removed.
    """
    return _segments(
        [
            _special(BEGIN_OF_TEXT),
            _special(TRACE_CONTEXT_START),
            _text(mark_entry(source, entry_function)),
            _special(FRAME_SEP),
        ]
    )


def segments_to_text(segments: Iterable[Segment]) -> str:
    """The segments as one string, special tokens written as their strings."""
    return "".join(text for _, text in segments)


def encode_segments(segments: Iterable[Segment], tokenizer: Tokenizer) -> list[int]:
    """Token ids: `tokenizer.encode_special(token)` for special segments, `tokenizer.encode(text)` for text."""
    ids: list[int] = []
    for kind, text in segments:
        if kind == "special":
            ids.append(tokenizer.encode_special(text))
        elif kind == "text":
            ids.extend(tokenizer.encode(text))
        else:
            raise ValueError(f"segment kind {kind!r} is neither 'special' nor 'text' (segment text {text[:40]!r})")
    return ids


def _strip_stop(text: str) -> str:
    for stop in STOP_TOKENS:
        if text.endswith(stop):
            return text[: -len(stop)]
    return text


def parse_reply(text: str, *, reasoning: bool) -> Reply:
    """Split a generated reply (the text after the prompt) into reasoning, answer and tool calls.

    In reasoning mode the text (a leading "<think>\\n" is allowed) splits at the first "\\n</think>\\n"; without it
    the generation was cut inside the reasoning, so reasoning is all of the text and the answer "". A trailing stop
    token string is dropped. Tool calls are the complete `<tool: NAME>\\n...\\n</tool>` blocks of the answer; a cut
    block is not a call.
    """
    text = _strip_stop(text)
    thought = None
    if reasoning:
        text = text.removeprefix(THINK_START)
        if THINK_END not in text and text.endswith(THINK_END.rstrip("\n")):
            # A reply that stopped right after the closing tag has an empty answer; it was not cut.
            text += "\n"
        thought, _, answer = text.partition(THINK_END)
    else:
        answer = text
    calls = tuple(ToolCall(m.group(1), m.group(2) or "") for m in _TOOL_CALL.finditer(answer))
    return Reply(reasoning=thought, answer=answer, tool_calls=calls)


def render_trace(frames: Iterable[Frame], *, end: bool = True) -> list[Segment]:
    """A trace as segments (spec section 4), ending with <|end_of_text|> if `end`.

    Locals are written with `json.dumps` of the dict and values with `json.dumps` of the repr string (default
    separators, ASCII escapes), as the release does.
    """
    pieces: list[Segment] = []
    for f in frames:
        pieces.append(_special(EVENT_SEP[f.event]))
        if f.event in ("call", "line"):
            pieces += [_text(json.dumps(f.locals)), _special(ACTION_SEP), _text(f.source_line)]
        else:
            pieces += [_special(ACTION_SEP), _text(f.source_line), _special(ARG_SEP), _text(json.dumps(f.value))]
        pieces.append(_special(FRAME_SEP))
    if end:
        pieces.append(_special(END_OF_TEXT))
    return _segments(pieces)


def parse_trace(text: str, *, strict: bool = True) -> list[Frame]:
    """Frames of a predicted trace: the text generated after the trace prompt, special tokens as their strings.

    The trace ends at the first stop token string (<|end_of_text|>, <|eot_id|>, <|eom_id|>) or at the end of the
    text; a last frame without its <|frame_sep|> (a cut generation) is dropped. A complete frame that is malformed
    raises ValueError naming its index, or with `strict=False` ends the trace there (the frames before it are
    returned). Text is split at special strings, so a source line or repr that itself contains one cannot be parsed
    back from text.
    """
    stop = _TRACE_END.search(text)
    if stop:
        text = text[: stop.start()]
    chunks = text.split(FRAME_SEP)[:-1]  # the piece after the last separator is empty or a cut frame
    frames = []
    for i, chunk in enumerate(chunks):
        try:
            frames.append(_parse_frame(chunk, i))
        except ValueError:
            if strict:
                raise
            break
    return frames


def _parse_frame(chunk: str, index: int) -> Frame:
    def bad(why: str) -> ValueError:
        return ValueError(f"trace frame {index} is malformed ({why}): {chunk[:200]!r}")

    sep = next((s for s in _SEP_EVENT if chunk.startswith(s)), None)
    if sep is None:
        raise bad(f"expected it to start with one of {list(_SEP_EVENT)}")
    event, body = _SEP_EVENT[sep], chunk[len(sep) :]
    if event in ("call", "line"):
        locals_json, found, source_line = body.partition(ACTION_SEP)
        if not found:
            raise bad(f"no {ACTION_SEP}")
        try:
            frame_locals = json.loads(locals_json)
        except json.JSONDecodeError as e:
            raise bad(f"locals are not JSON: {e}") from e
        if not isinstance(frame_locals, dict) or not all(isinstance(v, str) for v in frame_locals.values()):
            raise bad("locals are not a JSON object of strings")
        return Frame(event, frame_locals, source_line)
    if not body.startswith(ACTION_SEP):
        raise bad(f"a {event} frame has no locals, expected {ACTION_SEP} right after {sep}")
    source_line, found, value_json = body[len(ACTION_SEP) :].partition(ARG_SEP)
    if not found:
        raise bad(f"no {ARG_SEP}")
    try:
        value = json.loads(value_json)
    except json.JSONDecodeError as e:
        raise bad(f"value is not JSON: {e}") from e
    if not isinstance(value, str):
        raise bad("value is not a JSON string")
    return Frame(event, None, source_line, value)
