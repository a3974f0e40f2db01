"""Toy data for the tiny configs, from the Python standard library alone (no download): run once, outputs committed.

    python configs/data/make_tiny_data.py   # writes trace_corpus.jsonl, tiny_traces.jsonl and tiny_chat.jsonl here

- trace_corpus.jsonl: a corpus for `cwm-data traces` (`{"id", "source", "entry", "calls"}` records): seven short
  functions (branches, loops, a callee, strings and lists), each with 41 distinct calls drawn with a fixed seed, for
  configs/tiny_traces.py and the tests' trace-trained tiny model (which holds the first call of each out).
- tiny_traces.jsonl: `{"trace": {"source", "entry", "frames"}, ...}` records (format "trace" of
  cwm_jax/data/formats.py): the small programs below traced by the project's tracer in sandboxes
  (`cwm_jax.traces.corpus.build_traces`, as `cwm-data traces` does), traces over 60 frames dropped, reprs cut to 80
  characters, for configs/tiny_midtrain.py.
- tiny_rl_tasks.jsonl and tiny_rl_warmstart.jsonl: configs/tiny_rl.py's GRPO tasks ("a+b=" with a, b in 0..4, the
  sum as an exact-match answer) and its warm-start chats (the same prompts, a third answered with the sum and the rest
  with a random digit 0..8: the answer format, and a policy right about a third of the time for GRPO to improve).
- tiny_chat.jsonl: `{"messages": [...]}` records (format "chat"): a reasoning-mode system prompt, a question about a
  standard library function or class, and an answer that quotes the first paragraph of its docstring inside the
  reasoning format, for configs/tiny_sft.py and the chat part of the mid-training mixture.

The output depends only on this file and the Python version's docstrings (written with CPython 3.11). Files are
written under a temporary name and renamed, so a failed run leaves the committed files as they were.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import tempfile
from pathlib import Path

from cwm_jax.chat import REASONING_SYSTEM_PROMPT
from cwm_jax.traces.corpus import build_traces
from cwm_jax.traces.run import TraceLimits

HERE = Path(__file__).resolve().parent
MAX_FRAMES = 60  # longer traces (the tracer's frame limit) are dropped
MAX_REPR = 80  # reprs are cut to this many characters
MAX_ANSWER = 320  # docstring paragraphs are cut to about this many characters
CHAT_RECORDS = 300
PER_MODULE = 12

# Each program: source (one or a few functions, no comprehensions, lambdas or sets so that traces do not depend on the
# Python version or the hash seed), its entry function and the argument tuples it is run with.
PROGRAMS = [
    (
        "def bubble_sort(xs):\n"
        "    xs = list(xs)\n"
        "    for i in range(len(xs)):\n"
        "        for j in range(len(xs) - 1 - i):\n"
        "            if xs[j] > xs[j + 1]:\n"
        "                xs[j], xs[j + 1] = xs[j + 1], xs[j]\n"
        "    return xs\n",
        "bubble_sort",
        [([3, 1, 2],), ([2, 1],), ([1, 2, 3],), ([4, 3, 1],), (["b", "a"],), ([],)],
    ),
    (
        "def insertion_sort(xs):\n"
        "    out = []\n"
        "    for x in xs:\n"
        "        i = len(out)\n"
        "        while i > 0 and out[i - 1] > x:\n"
        "            i -= 1\n"
        "        out.insert(i, x)\n"
        "    return out\n",
        "insertion_sort",
        [([3, 1, 2],), ([5, 4],), ([1, 1, 0],), (["pear", "fig"],), ([7],), ([2, 9, 4],)],
    ),
    (
        "def merge(a, b):\n"
        "    out = []\n"
        "    i = j = 0\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            out.append(a[i])\n"
        "            i += 1\n"
        "        else:\n"
        "            out.append(b[j])\n"
        "            j += 1\n"
        "    return out + a[i:] + b[j:]\n"
        "\n"
        "\n"
        "def merge_sort(xs):\n"
        "    if len(xs) <= 1:\n"
        "        return xs\n"
        "    mid = len(xs) // 2\n"
        "    return merge(merge_sort(xs[:mid]), merge_sort(xs[mid:]))\n",
        "merge_sort",
        [([2, 1],), ([3, 1, 2],), ([1],), ([4, 2, 3],), ([5, 5],)],
    ),
    (
        "def reverse_words(text):\n    words = text.split()\n    words.reverse()\n    return ' '.join(words)\n",
        "reverse_words",
        [("hello world",), ("a b c",), ("one",), ("code world model",), ("",), ("  spaced   out ",)],
    ),
    (
        "def is_palindrome(s):\n"
        "    s = s.lower()\n"
        "    left, right = 0, len(s) - 1\n"
        "    while left < right:\n"
        "        if s[left] != s[right]:\n"
        "            return False\n"
        "        left += 1\n"
        "        right -= 1\n"
        "    return True\n",
        "is_palindrome",
        [("Level",), ("abca",), ("noon",), ("x",), ("racecar",), ("ab",)],
    ),
    (
        "def count_vowels(word):\n"
        "    count = 0\n"
        "    for ch in word:\n"
        "        if ch in 'aeiou':\n"
        "            count += 1\n"
        "    return count\n",
        "count_vowels",
        [("banana",), ("sky",), ("queue",), ("trace",), ("",), ("io",)],
    ),
    (
        "def caesar(text, shift):\n"
        "    out = ''\n"
        "    for ch in text:\n"
        "        if ch.isalpha():\n"
        "            base = ord('a')\n"
        "            ch = chr((ord(ch) - base + shift) % 26 + base)\n"
        "        out += ch\n"
        "    return out\n",
        "caesar",
        [("abc", 1), ("xyz", 3), ("hi there", 13), ("zz", 1), ("ok", -1)],
    ),
    (
        "def run_length(s):\n"
        "    out = []\n"
        "    prev, n = None, 0\n"
        "    for ch in s:\n"
        "        if ch == prev:\n"
        "            n += 1\n"
        "        else:\n"
        "            if prev is not None:\n"
        "                out.append(prev + str(n))\n"
        "            prev, n = ch, 1\n"
        "    if prev is not None:\n"
        "        out.append(prev + str(n))\n"
        "    return ''.join(out)\n",
        "run_length",
        [("aaab",), ("abc",), ("zz",), ("",), ("aabbaa",)],
    ),
    (
        "def capitalize_words(text):\n"
        "    parts = text.split(' ')\n"
        "    for i in range(len(parts)):\n"
        "        parts[i] = parts[i][:1].upper() + parts[i][1:]\n"
        "    return ' '.join(parts)\n",
        "capitalize_words",
        [("hello world",), ("a",), ("the quick fox",), ("x y",), ("python code",)],
    ),
    (
        "def char_counts(s):\n"
        "    counts = {}\n"
        "    for ch in s:\n"
        "        counts[ch] = counts.get(ch, 0) + 1\n"
        "    return counts\n",
        "char_counts",
        [("hello",), ("aab",), ("xyz",), ("",), ("mississ",)],
    ),
    (
        "def factorial(n):\n    if n <= 1:\n        return 1\n    return n * factorial(n - 1)\n",
        "factorial",
        [(0,), (1,), (3,), (4,), (5,), (6,)],
    ),
    (
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "fib",
        [(0,), (1,), (5,), (8,), (10,), (12,)],
    ),
    (
        "def fib_rec(n):\n    if n < 2:\n        return n\n    return fib_rec(n - 1) + fib_rec(n - 2)\n",
        "fib_rec",
        [(0,), (1,), (2,), (3,), (4,)],
    ),
    (
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        "gcd",
        [(12, 8), (17, 5), (100, 75), (9, 0), (21, 14), (270, 192)],
    ),
    (
        "def digit_sum(n):\n"
        "    total = 0\n"
        "    while n > 0:\n"
        "        total += n % 10\n"
        "        n //= 10\n"
        "    return total\n",
        "digit_sum",
        [(0,), (7,), (123,), (9999,), (405,), (31415,)],
    ),
    (
        "def is_prime(n):\n"
        "    if n < 2:\n"
        "        return False\n"
        "    d = 2\n"
        "    while d * d <= n:\n"
        "        if n % d == 0:\n"
        "            return False\n"
        "        d += 1\n"
        "    return True\n",
        "is_prime",
        [(1,), (2,), (9,), (13,), (25,), (29,)],
    ),
    (
        "def is_prime(n):\n"
        "    d = 2\n"
        "    while d * d <= n:\n"
        "        if n % d == 0:\n"
        "            return False\n"
        "        d += 1\n"
        "    return n > 1\n"
        "\n"
        "\n"
        "def primes_below(limit):\n"
        "    found = []\n"
        "    for n in range(limit):\n"
        "        if is_prime(n):\n"
        "            found.append(n)\n"
        "    return found\n",
        "primes_below",
        [(3,), (5,), (6,), (8,)],
    ),
    (
        "def power(base, exp):\n"
        "    result = 1\n"
        "    while exp > 0:\n"
        "        if exp % 2 == 1:\n"
        "            result *= base\n"
        "        base *= base\n"
        "        exp //= 2\n"
        "    return result\n",
        "power",
        [(2, 10), (3, 4), (5, 0), (7, 3), (10, 5), (2, 1)],
    ),
    (
        "def sum_of_squares(n):\n"
        "    total = 0\n"
        "    for i in range(1, n + 1):\n"
        "        total += i * i\n"
        "    return total\n",
        "sum_of_squares",
        [(0,), (1,), (3,), (5,), (8,)],
    ),
    (
        "def collatz_steps(n):\n"
        "    steps = 0\n"
        "    while n != 1:\n"
        "        if n % 2 == 0:\n"
        "            n = n // 2\n"
        "        else:\n"
        "            n = 3 * n + 1\n"
        "        steps += 1\n"
        "    return steps\n",
        "collatz_steps",
        [(1,), (2,), (3,), (6,), (8,)],
    ),
    (
        "def to_binary(n):\n"
        "    if n == 0:\n"
        "        return '0'\n"
        "    bits = ''\n"
        "    while n:\n"
        "        bits = str(n % 2) + bits\n"
        "        n //= 2\n"
        "    return bits\n",
        "to_binary",
        [(0,), (1,), (5,), (10,), (64,), (255,)],
    ),
    (
        "def binary_search(xs, target):\n"
        "    lo, hi = 0, len(xs) - 1\n"
        "    while lo <= hi:\n"
        "        mid = (lo + hi) // 2\n"
        "        if xs[mid] == target:\n"
        "            return mid\n"
        "        if xs[mid] < target:\n"
        "            lo = mid + 1\n"
        "        else:\n"
        "            hi = mid - 1\n"
        "    return -1\n",
        "binary_search",
        [([1, 3, 5, 7], 5), ([1, 3, 5, 7], 4), ([2], 2), ([], 1), ([1, 2, 4, 8, 16, 32], 32), ([10, 20], 10)],
    ),
    (
        "def max_of(xs):\n"
        "    best = xs[0]\n"
        "    for x in xs[1:]:\n"
        "        if x > best:\n"
        "            best = x\n"
        "    return best\n",
        "max_of",
        [([3, 9, 2],), ([1],), ([-5, -2, -9],), ([4, 4, 4],), (["b", "c", "a"],)],
    ),
    (
        "def flatten(items):\n"
        "    out = []\n"
        "    for item in items:\n"
        "        if isinstance(item, list):\n"
        "            out.extend(flatten(item))\n"
        "        else:\n"
        "            out.append(item)\n"
        "    return out\n",
        "flatten",
        [([1, [2, 3]],), ([[1], [2]],), ([],), ([1, 2],), ([[[]], 4],)],
    ),
    (
        "def running_mean(xs):\n"
        "    means = []\n"
        "    total = 0\n"
        "    for i, x in enumerate(xs):\n"
        "        total += x\n"
        "        means.append(total / (i + 1))\n"
        "    return means\n",
        "running_mean",
        [([2, 4, 6],), ([1],), ([3, 0, 3, 0],), ([10, 20],), ([],)],
    ),
    (
        "def safe_div(a, b):\n"
        "    try:\n"
        "        q = a / b\n"
        "    except ZeroDivisionError:\n"
        "        q = None\n"
        "    return q\n",
        "safe_div",
        [(6, 3), (1, 0), (7, 2), (0, 5), (-4, 0)],
    ),
    (
        "def parse_int(text):\n"
        "    return int(text)\n"
        "\n"
        "\n"
        "def parse_all(texts):\n"
        "    values = []\n"
        "    for t in texts:\n"
        "        try:\n"
        "            values.append(parse_int(t))\n"
        "        except ValueError as e:\n"
        "            values.append(str(e)[:20])\n"
        "    return values\n",
        "parse_all",
        [(["1", "x"],), (["42"],), (["a", "7", "-3"],), ([],), (["1.5"],)],
    ),
    (
        "def check_age(age):\n"
        "    if age < 0:\n"
        "        raise ValueError('negative age')\n"
        "    return age\n"
        "\n"
        "\n"
        "def describe(age):\n"
        "    try:\n"
        "        age = check_age(age)\n"
        "        label = 'adult' if age >= 18 else 'minor'\n"
        "    except ValueError as err:\n"
        "        label = 'invalid: ' + str(err)\n"
        "    return label\n",
        "describe",
        [(30,), (5,), (-1,), (18,), (-20,)],
    ),
    (
        "def lookup(table, key):\n"
        "    try:\n"
        "        return table[key]\n"
        "    except KeyError:\n"
        "        return 'missing'\n",
        "lookup",
        [({"a": 1}, "a"), ({"a": 1}, "b"), ({}, "x"), ({"k": [1, 2]}, "k"), ({"x": None}, "x")],
    ),
    (
        "def transpose(matrix):\n"
        "    rows, cols = len(matrix), len(matrix[0])\n"
        "    out = []\n"
        "    for c in range(cols):\n"
        "        row = []\n"
        "        for r in range(rows):\n"
        "            row.append(matrix[r][c])\n"
        "        out.append(row)\n"
        "    return out\n",
        "transpose",
        [([[1, 2], [3, 4]],), ([[1, 2, 3]],), ([[1], [2]],), ([[0]],)],
    ),
    (
        "def dedupe(xs):\n"
        "    seen = {}\n"
        "    out = []\n"
        "    for x in xs:\n"
        "        if x not in seen:\n"
        "            seen[x] = True\n"
        "            out.append(x)\n"
        "    return out\n",
        "dedupe",
        [([1, 2, 1],), (["a", "a"],), ([],), ([3, 3, 2, 3],), ([5, 6],)],
    ),
    (
        "def chunk(xs, size):\n"
        "    out = []\n"
        "    for start in range(0, len(xs), size):\n"
        "        out.append(xs[start:start + size])\n"
        "    return out\n",
        "chunk",
        [([1, 2, 3, 4, 5], 2), ([1, 2], 3), ([], 2), (list(range(6)), 3), ("abcdefg", 3)],
    ),
    (
        "def square(x):\n"
        "    return x * x\n"
        "\n"
        "\n"
        "def apply_all(xs):\n"
        "    out = []\n"
        "    for x in xs:\n"
        "        out.append(square(x))\n"
        "    return out\n",
        "apply_all",
        [([1, 2],), ([3],), ([],), ([-1, 0, 4],), ([2.5],)],
    ),
    (
        "def hanoi(n, src, dst, via, moves):\n"
        "    if n == 0:\n"
        "        return moves\n"
        "    hanoi(n - 1, src, via, dst, moves)\n"
        "    moves.append(src + dst)\n"
        "    hanoi(n - 1, via, dst, src, moves)\n"
        "    return moves\n",
        "hanoi",
        [(1, "A", "C", "B", []), (2, "A", "C", "B", []), (2, "L", "R", "M", [])],
    ),
    (
        "class Stack:\n"
        "    def __init__(self):\n"
        "        self.items = []\n"
        "\n"
        "    def push(self, x):\n"
        "        self.items.append(x)\n"
        "\n"
        "    def pop(self):\n"
        "        return self.items.pop()\n"
        "\n"
        "\n"
        "def balanced(text):\n"
        "    pairs = {')': '(', ']': '['}\n"
        "    stack = Stack()\n"
        "    for ch in text:\n"
        "        if ch in '([':\n"
        "            stack.push(ch)\n"
        "        elif ch in pairs:\n"
        "            if not stack.items or stack.pop() != pairs[ch]:\n"
        "                return False\n"
        "    return not stack.items\n",
        "balanced",
        [("()",), ("(]",), ("([])",), ("",), (")",), ("[(",)],
    ),
    (
        "def word_lengths(sentence):\n"
        "    lengths = {}\n"
        "    for word in sentence.split():\n"
        "        word = word.strip('.,!?')\n"
        "        lengths[word] = len(word)\n"
        "    return lengths\n",
        "word_lengths",
        [("Hi there!",), ("one two, three.",), ("",), ("a bb ccc",), ("Code world",)],
    ),
]


# Short functions whose traces fit a 512-token row with their prompt, each with a generator of random calls.
TOY_FUNCTIONS = [
    ("def sign(x):\n    if x > 0:\n        return 'positive'\n    if x < 0:\n        return 'negative'\n"
     "    return 'zero'\n",
     "sign", lambda r: f"sign({r.randint(-40, 40)})"),
    ("def larger(a, b):\n    if a > b:\n        return a\n    return b\n",
     "larger", lambda r: f"larger({r.randint(0, 30)}, {r.randint(0, 30)})"),
    ("def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n",
     "clamp", lambda r: f"clamp({r.randint(0, 20)}, {r.randint(0, 8)}, {r.randint(10, 15)})"),
    ("def shout(word):\n    loud = word.upper()\n    return loud + '!'\n",
     "shout", lambda r: f"shout({''.join(r.choice('abcdefgh') for _ in range(r.randint(1, 5)))!r})"),
    ("def count_evens(xs):\n    count = 0\n    for x in xs:\n        if x % 2 == 0:\n            count += 1\n"
     "    return count\n",
     "count_evens", lambda r: f"count_evens({[r.randint(0, 9) for _ in range(r.randint(1, 3))]})"),
    ("def double_all(xs):\n    out = []\n    for x in xs:\n        out.append(x * 2)\n    return out\n",
     "double_all", lambda r: f"double_all({[r.randint(0, 9) for _ in range(r.randint(1, 3))]})"),
    ("def square(v):\n    return v * v\n\n\ndef sum_of_squares(a, b):\n    total = square(a) + square(b)\n"
     "    return total\n",
     "sum_of_squares", lambda r: f"sum_of_squares({r.randint(0, 9)}, {r.randint(0, 9)})"),
]  # fmt: skip
CALLS_PER_FUNCTION = 41


def make_trace_corpus() -> list[dict]:
    rng = random.Random(0)
    records = []
    for source, entry, draw in TOY_FUNCTIONS:
        calls: list[str] = []
        while len(calls) < CALLS_PER_FUNCTION:
            call = draw(rng)
            if call not in calls:
                calls.append(call)
        records.append({"id": entry, "source": source, "entry": entry, "calls": calls})
    return records


RL_OPERANDS = range(5)
RL_WARMSTART_CHATS = 400


def make_rl_data() -> tuple[list[dict], list[dict]]:
    """(GRPO tasks, warm-start chats) for configs/tiny_rl.py."""
    tasks = [
        {"task_id": f"add-{a}-{b}", "prompt": f"{a}+{b}=", "kind": "exact", "answer": str(a + b)}
        for a in RL_OPERANDS
        for b in RL_OPERANDS
    ]
    rng = random.Random(1)
    chats = []
    for _ in range(RL_WARMSTART_CHATS):
        task = rng.choice(tasks)
        # A third of the replies right, the rest a random digit: the warm start teaches the format and leaves the
        # model far from the answers (about 40% right when sampled); only rewards can take it further.
        reply = task["answer"] if rng.random() < 1 / 3 else str(rng.randint(0, 2 * (len(RL_OPERANDS) - 1)))
        chats.append(
            {"messages": [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": reply}]}
        )
    return tasks, chats


def make_traces(out: Path) -> None:
    """PROGRAMS traced by the project's tracer (`cwm-data traces` into a JSONL file)."""
    corpus = [
        {"id": entry, "source": source, "entry": entry,
         "calls": [f"{entry}({', '.join(repr(a) for a in args)})" for args in inputs]}
        for source, entry, inputs in PROGRAMS
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "programs.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
        limits = TraceLimits(max_frames=MAX_FRAMES, max_repr=MAX_REPR)
        s = build_traces([str(src)], str(out), limits=limits, overwrite=True)
    print(f"{out}: {s['records']} traces of {s['jobs']} calls (not written: {s['failed']})")


# Modules present on CPython 3.11 and 3.12, in this order.
CHAT_MODULES = [
    "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv", "datetime", "difflib", "fnmatch",
    "fractions", "functools", "glob", "heapq", "html", "inspect", "ipaddress", "itertools", "json", "math", "operator",
    "os.path", "pathlib", "pprint", "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct",
    "tempfile", "textwrap", "time", "urllib.parse", "uuid", "zlib",
]  # fmt: skip
QUESTIONS = ["What does `{name}` do?", "Explain `{name}` briefly.", "What is `{name}` for in Python?"]


def first_paragraph(doc: str, name: str) -> str:
    """The first paragraph of a docstring that is not a signature line, on one line, cut to about MAX_ANSWER."""
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        short = name.rsplit(".", 1)[-1]
        if text and not text.startswith((short + "(", name + "(")) and "-->" not in text and "->" not in text[:60]:
            break
    else:
        return ""
    if len(text) > MAX_ANSWER:
        text = text[:MAX_ANSWER].rsplit(" ", 1)[0] + " ..."
    return text


def make_chats() -> list[dict]:
    candidates = []
    for module_name in CHAT_MODULES:
        module = importlib.import_module(module_name)
        taken = 0
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            home = (getattr(obj, "__module__", None) or "").lstrip("_")
            if attr.startswith("_") or not callable(obj) or home != module.__name__.lstrip("_"):
                continue  # private, not callable, or imported from another module
            name = f"{module_name}.{attr}"
            answer = first_paragraph(inspect.getdoc(obj) or "", name)
            if len(answer) < 20:
                continue
            candidates.append((name, answer))
            taken += 1
            if taken == PER_MODULE:
                break
    records = []
    for i, (name, answer) in enumerate(candidates[:CHAT_RECORDS]):
        question = QUESTIONS[i % len(QUESTIONS)].format(name=name)
        reasoning = f"The docstring of {name} says:"
        records.append(
            {
                "messages": [
                    {"role": "system", "content": REASONING_SYSTEM_PROMPT},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": "<think>\n" + reasoning + "\n</think>\n" + answer},
                ]
            }
        )
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    print(f"{path}: {len(records)} records, {path.stat().st_size / 1024:.0f} KiB")


def main(out_dir: Path = HERE) -> None:
    """Writes the files of the module docstring into `out_dir` (this folder by default)."""
    write_jsonl(Path(out_dir) / "trace_corpus.jsonl", make_trace_corpus())
    tasks, chats = make_rl_data()
    write_jsonl(Path(out_dir) / "tiny_rl_tasks.jsonl", tasks)
    write_jsonl(Path(out_dir) / "tiny_rl_warmstart.jsonl", chats)
    make_traces(Path(out_dir) / "tiny_traces.jsonl")
    write_jsonl(Path(out_dir) / "tiny_chat.jsonl", make_chats())


if __name__ == "__main__":
    main()
