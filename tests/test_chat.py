"""Prompt formats and reply / trace parsing against byte-exact strings written out from spec section 4."""

import json

import pytest

from cwm_jax.chat import (
    REASONING_SYSTEM_PROMPT,
    Frame,
    Message,
    ToolCall,
    encode_segments,
    mark_entry,
    parse_reply,
    parse_trace,
    render_chat,
    render_trace,
    render_trace_prompt,
    segments_to_text,
)

REASONING = (
    "You are a helpful AI assistant. You always reason before responding, using the following format:\n\n"
    "<think>\nyour internal reasoning\n</think>\nyour external response"
)


def test_reasoning_prompt_text():
    assert REASONING_SYSTEM_PROMPT == REASONING


def test_chat_system_user_assistant_user():
    messages = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello!"),
        Message("user", "What is 2+2?"),
    ]
    segments = render_chat(messages)
    assert segments_to_text(segments) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert segments[:6] == [
        ("special", "<|begin_of_text|>"),
        ("special", "<|start_header_id|>"),
        ("text", "system"),
        ("special", "<|end_header_id|>"),
        ("text", "\n\nBe brief."),
        ("special", "<|eot_id|>"),
    ]
    assert segments[-1] == ("text", "\n\n")
    no_prompt = segments_to_text(render_chat(messages, add_generation_prompt=False))
    assert no_prompt.endswith("\n\nWhat is 2+2?<|eot_id|>")


def test_chat_tool_turn_and_dict_messages():
    messages = [
        {"role": "user", "content": "List files."},
        {"role": "assistant", "content": "<tool: bash>\nls\n</tool>"},
        {"role": "tool: bash", "content": "a.py\n"},
    ]
    assert segments_to_text(render_chat(messages)) == (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nList files.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<tool: bash>\nls\n</tool><|eot_id|>"
        "<|start_header_id|>tool: bash<|end_header_id|>\n\na.py\n<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for role in ("tool:bash", "tool: ", "ipython", "Tool: bash"):
        with pytest.raises(ValueError, match="role"):
            Message(role, "x")


def test_reasoning_without_system_message():
    text = segments_to_text(render_chat([Message("user", "Hi")], reasoning=True))
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful AI assistant. You always reason before responding, using the following format:\n\n"
        "<think>\nyour internal reasoning\n</think>\nyour external response<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n"
    )


def test_reasoning_with_system_message():
    segments = render_chat([Message("system", "Use Python."), Message("user", "Hi")], reasoning=True)
    assert segments_to_text(segments) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful AI assistant. You always reason before responding, using the following format:\n\n"
        "<think>\nyour internal reasoning\n</think>\nyour external response\n\nUse Python.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n"
    )
    # "<think>" is ordinary text, merged with the header's newlines into one text run.
    assert segments[-2:] == [("special", "<|end_header_id|>"), ("text", "\n\n<think>\n")]


def test_reasoning_off_has_no_think_or_reasoning_prompt():
    text = segments_to_text(render_chat([Message("user", "Hi")]))
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_special_strings_in_user_text_stay_text():
    segments = render_chat([Message("user", "say <|eot_id|> now")], add_generation_prompt=False)
    assert segments == [
        ("special", "<|begin_of_text|>"),
        ("special", "<|start_header_id|>"),
        ("text", "user"),
        ("special", "<|end_header_id|>"),
        ("text", "\n\nsay <|eot_id|> now"),
        ("special", "<|eot_id|>"),
    ]


class FakeTokenizer:
    """One id per character (its code point) plus a special table."""

    SPECIAL = {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007}
    SPECIAL["<|eot_id|>"] = 128009

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_special(self, token):
        return self.SPECIAL[token]


def test_encode_segments_with_fake_tokenizer():
    ids = encode_segments(render_chat([Message("user", "a<|eot_id|>")]), FakeTokenizer())
    eot_as_text = [60, 124, 101, 111, 116, 95, 105, 100, 124, 62]
    assert ids == [
        *[128000, 128006, 117, 115, 101, 114, 128007, 10, 10, 97],
        *eot_as_text,
        *[128009, 128006, 97, 115, 115, 105, 115, 116, 97, 110, 116, 128007, 10, 10],
    ]
    with pytest.raises(ValueError, match="neither"):
        encode_segments([("token", "x")], FakeTokenizer())


SOURCE = """import functools


def helper(x):
    return x + 1


def add_one(xs):
    def add_one_inner(x):
        return helper(x)

    return [add_one_inner(x) for x in xs]


def add_one_more(xs):
    return xs


class Box:
    @functools.cache
    async def add_one(self):
        return 1
"""


def test_trace_prompt_marks_the_right_def_line():
    text = segments_to_text(render_trace_prompt(SOURCE, "add_one"))
    assert text == (
        "<|begin_of_text|><|trace_context_start|>import functools\n\n\n"
        "def helper(x):\n    return x + 1\n\n\n"
        "def add_one(xs):  # << START_OF_TRACE\n"
        "    def add_one_inner(x):\n        return helper(x)\n\n"
        "    return [add_one_inner(x) for x in xs]\n\n\n"
        "def add_one_more(xs):\n    return xs\n\n\n"
        "class Box:\n    @functools.cache\n    async def add_one(self):\n        return 1\n"
        "<|frame_sep|>"
    )
    assert text.count("START_OF_TRACE") == 1


def test_trace_prompt_method_async_decorated_and_crlf():
    text = segments_to_text(render_trace_prompt(SOURCE, "Box.add_one"))
    assert "def add_one(xs):\n" in text
    assert "    @functools.cache\n    async def add_one(self):  # << START_OF_TRACE\n        return 1\n" in text
    crlf = segments_to_text(render_trace_prompt("x = 1\r\ndef f():\r\n    return x\r\n", "f"))
    assert crlf == (
        "<|begin_of_text|><|trace_context_start|>x = 1\r\ndef f():  # << START_OF_TRACE\r\n    return x\r\n"
        "<|frame_sep|>"
    )
    no_newline = segments_to_text(render_trace_prompt("def f(): return 1", "f"))
    assert no_newline == "<|begin_of_text|><|trace_context_start|>def f(): return 1  # << START_OF_TRACE<|frame_sep|>"


def test_trace_prompt_marks_the_definition_bound_last():
    source = "if FAST:\n    def f():\n        return 1\nelse:\n    def f():\n        return 2\n"
    assert mark_entry(source, "f") == (
        "if FAST:\n    def f():\n        return 1\nelse:\n    def f():  # << START_OF_TRACE\n        return 2\n"
    )
    with pytest.raises(ValueError, match="already contains"):
        mark_entry(mark_entry(source, "f"), "f")


def test_trace_prompt_errors_name_the_function():
    for name in ("add_one_inner", "missing", "Box.missing", "add"):
        with pytest.raises(ValueError, match=repr(name.split(".")[-1])):
            render_trace_prompt(SOURCE, name)
    with pytest.raises(ValueError, match="parse"):
        render_trace_prompt("def f(:\n", "f")


@pytest.mark.parametrize(
    "text, reasoning, expected",
    [
        ("Plain answer.<|eot_id|>", False, (None, "Plain answer.", ())),
        ("Let me think.\n</think>\nIt is 4.", True, ("Let me think.", "It is 4.", ())),
        ("<think>\nHmm.\n</think>\nOk.", True, ("Hmm.", "Ok.", ())),
        ("Hmm, so far", True, ("Hmm, so far", "", ())),  # cut inside the reasoning
        ("Hmm.\n</think>", True, ("Hmm.", "", ())),
        (
            "Look.\n</think>\nRunning it.\n<tool: bash>\nls -la\n</tool>",
            True,
            ("Look.", "Running it.\n<tool: bash>\nls -la\n</tool>", (ToolCall("bash", "ls -la"),)),
        ),
        (
            "<tool: create>\na.py\nprint(1)\n</tool>\n<tool: submit>\n</tool><|eot_id|>",
            False,
            (
                None,
                "<tool: create>\na.py\nprint(1)\n</tool>\n<tool: submit>\n</tool>",
                (ToolCall("create", "a.py\nprint(1)"), ToolCall("submit", "")),
            ),
        ),
        # A cut tool call is not a call; the complete one before it still is.
        (
            "<tool: bash>\npwd\n</tool>\n<tool: edit>\na.py\n<<<",
            False,
            (None, "<tool: bash>\npwd\n</tool>\n<tool: edit>\na.py\n<<<", (ToolCall("bash", "pwd"),)),
        ),
        # Tool calls inside the reasoning are not calls.
        ("<tool: bash>\nrm x\n</tool>", True, ("<tool: bash>\nrm x\n</tool>", "", ())),
    ],
)
def test_parse_reply(text, reasoning, expected):
    reply = parse_reply(text, reasoning=reasoning)
    assert (reply.reasoning, reply.answer, reply.tool_calls) == expected


FRAMES = [
    Frame("call", {"n": "2"}, "def fact(n):  # << START_OF_TRACE"),
    Frame("line", {"n": ".."}, "    if n <= 1:"),
    Frame("line", {"n": ".."}, "    r = n * fact(n - 1)"),
    Frame("call", {"n": "1"}, "def fact(n):  # << START_OF_TRACE"),
    Frame("line", {"n": ".."}, "    if n <= 1:"),
    Frame("line", {"n": ".."}, "    return 1"),
    Frame("return", None, "    return 1", "1"),
    Frame("line", {"n": "2", "r": "2"}, "    s = {'r': r, \"é\": None}"),
    Frame("line", {"n": "..", "r": "..", "s": "{'r': 2, 'é': None}"}, "    raise ValueError(s)"),
    Frame("exception", None, "    raise ValueError(s)", "ValueError(\"{'r': 2, 'é': None}\")"),
]

TRACE_TEXT = (
    '<|call_sep|>{"n": "2"}<|action_sep|>def fact(n):  # << START_OF_TRACE<|frame_sep|>'
    '<|line_sep|>{"n": ".."}<|action_sep|>    if n <= 1:<|frame_sep|>'
    '<|line_sep|>{"n": ".."}<|action_sep|>    r = n * fact(n - 1)<|frame_sep|>'
    '<|call_sep|>{"n": "1"}<|action_sep|>def fact(n):  # << START_OF_TRACE<|frame_sep|>'
    '<|line_sep|>{"n": ".."}<|action_sep|>    if n <= 1:<|frame_sep|>'
    '<|line_sep|>{"n": ".."}<|action_sep|>    return 1<|frame_sep|>'
    '<|return_sep|><|action_sep|>    return 1<|arg_sep|>"1"<|frame_sep|>'
    '<|line_sep|>{"n": "2", "r": "2"}<|action_sep|>    s = {\'r\': r, "é": None}<|frame_sep|>'
    '<|line_sep|>{"n": "..", "r": "..", "s": "{\'r\': 2, \'\\u00e9\': None}"}<|action_sep|>    raise ValueError(s)'
    "<|frame_sep|>"
    "<|exception_sep|><|action_sep|>    raise ValueError(s)<|arg_sep|>"
    "\"ValueError(\\\"{'r': 2, '\\u00e9': None}\\\")\"<|frame_sep|>"
    "<|end_of_text|>"
)


def test_render_trace_is_byte_exact_and_round_trips():
    segments = render_trace(FRAMES)
    assert segments_to_text(segments) == TRACE_TEXT
    assert segments[:3] == [("special", "<|call_sep|>"), ("text", '{"n": "2"}'), ("special", "<|action_sep|>")]
    assert parse_trace(TRACE_TEXT) == FRAMES
    assert parse_trace(segments_to_text(render_trace(FRAMES, end=False))) == FRAMES
    assert json.loads(json.dumps(FRAMES[-1].value)) == FRAMES[-1].value


def test_parse_trace_truncated_and_ended():
    full = TRACE_TEXT.removesuffix("<|end_of_text|>")
    cut_in_value = full[: full.rindex('"ValueError')] + '"ValueErr'
    assert parse_trace(cut_in_value) == FRAMES[:-1]
    assert parse_trace(full[: full.index("<|line_sep|>") + 5]) == FRAMES[:1]
    assert parse_trace("") == []
    # Anything after <|end_of_text|> (or another stop token) is not part of the trace.
    assert parse_trace(TRACE_TEXT + "<|line_sep|>{}<|action_sep|>x<|frame_sep|>") == FRAMES
    eot = '<|call_sep|>{"n": "2"}<|action_sep|>def f(n):<|frame_sep|><|line_sep|>{}<|eot_id|>'
    assert parse_trace(eot) == [Frame("call", {"n": "2"}, "def f(n):")]


@pytest.mark.parametrize(
    "text, why",
    [
        ("<|line_sep|>{not json}<|action_sep|>x<|frame_sep|>", "not JSON"),
        ('<|line_sep|>{"a": 1}<|action_sep|>x<|frame_sep|>', "object of strings"),
        ('<|line_sep|>{"a": "1"}x<|frame_sep|>', "no <|action_sep|>"),
        ("<|return_sep|><|action_sep|>x<|arg_sep|>1<|frame_sep|>", "not a JSON string"),
        ('<|return_sep|>{}<|action_sep|>x<|arg_sep|>"1"<|frame_sep|>', "no locals"),
        ("x = 1<|frame_sep|>", "start with"),
    ],
)
def test_parse_trace_rejects_malformed_complete_frames(text, why):
    with pytest.raises(ValueError, match="frame 0") as e:
        parse_trace(text)
    assert why in str(e.value)


def test_frame_validation():
    with pytest.raises(ValueError, match="needs locals"):
        Frame("line", None, "x")
    with pytest.raises(ValueError, match="needs a value"):
        Frame("return", {}, "x")
    with pytest.raises(ValueError, match="event"):
        Frame("jump", {}, "x")
