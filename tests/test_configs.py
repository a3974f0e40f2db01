"""Run configs (`configs/*.py`, every one present): they load and validate for the devices they are meant for, the tiny
ones find their data, and the first batches of the tiny mid-training and SFT stages hold what the stage is about.

Independent references: the expected SFT loss mask is rebuilt here from the token ids by a small state machine over
the chat format of spec section 4 (trained: the content after an assistant header and its <|eot_id|>), and the toy
traces' ".." values are resolved both by the release debugger's walk back (stopping at a call or return) and by a
call stack of scopes, which must agree. No training step runs here (test_train*.py do that).
"""

import copy
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cwm_jax import chat
from cwm_jax.data import make_iterator
from cwm_jax.data.config import check_data_config
from cwm_jax.data.sources import open_source
from cwm_jax.tokenizer import load_tokenizer
from cwm_jax.train.config import validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DATA = CONFIGS / "data"
TOK = load_tokenizer("byte")
BOS, EOT = TOK.encode_special(chat.BEGIN_OF_TEXT), TOK.encode_special(chat.EOT)
START_HEADER, END_HEADER = TOK.encode_special(chat.START_HEADER), TOK.encode_special(chat.END_HEADER)
ASSISTANT_HEADER = [START_HEADER, *b"assistant", END_HEADER, *b"\n\n"]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _config(name: str):
    return _load(CONFIGS / f"{name}.py").get_config()


def config(name: str):
    """A fresh copy of `configs/{name}.py`'s config (loaded once per session)."""
    return copy.deepcopy(_config(name))


def devices_of(topology: str) -> int:
    """JAX devices (chips) of a TPU slice name: v4 / v5p names count TensorCores (2 per chip), v5e / v6e count chips."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", topology)
    assert m, f"unknown topology {topology!r}; teach devices_of its chip count"
    cores = int(m.group(2))
    return cores // 2 if m.group(1) in ("v4", "v5p") else cores


CONFIG_NAMES = sorted(p.stem for p in CONFIGS.glob("*.py"))
TINY = [n for n in CONFIG_NAMES if n.startswith("tiny_")]


def test_topology_chip_counts():
    assert devices_of("v5p-512") == 256
    assert devices_of("v4-8") == 4
    assert devices_of("v5e-256") == 256
    assert devices_of("v6e-8") == 8


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_validates_for_its_devices(name):
    cfg = config(name)
    if name.startswith("tiny_"):
        assert not cfg.topology, f"{name} is a tiny config for one CPU device but names topology {cfg.topology!r}"
        devices = 1
    else:
        assert cfg.topology, f"configs/{name}.py sets no topology: the test cannot tell its device count"
        devices = devices_of(cfg.topology)
    _, mesh = validate(cfg, device_count=devices)
    assert np.prod(list(mesh.values())) == devices


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_data_exists(name):
    cfg = config(name)
    for data in (cfg.data, cfg.eval.data):
        for src in check_data_config(data):
            if src.kind == "jsonl":
                # Resolved from the config file, so runs from any working directory find it.
                assert Path(src.path).is_absolute() and Path(src.path).is_file(), src.path
            assert len(open_source(src)) > 0


def test_midtrain_sequence_sharding_validates_on_8_devices():
    cfg = config("tiny_midtrain")
    cfg.mesh.sequence = 2
    _, mesh = validate(cfg, device_count=8)
    assert mesh == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 2}


def first_batches(cfg, n: int = 1) -> list[dict]:
    it = make_iterator(cfg.data, TOK, seq_len=cfg.seq_len, batch_size=cfg.global_batch, seed=cfg.seed)
    return [next(it) for _ in range(n)]


def test_midtrain_first_batch_mixes_traces_chats_and_code():
    cfg = config("tiny_midtrain")
    [batch] = first_batches(cfg)
    targets, mask = batch["targets"], batch["loss_mask"]
    assert targets.shape == (cfg.global_batch, cfg.seq_len)
    trace_start = TOK.encode_special(chat.TRACE_CONTEXT_START)
    call_sep, line_sep = TOK.encode_special(chat.CALL_SEP), TOK.encode_special(chat.LINE_SEP)
    assert (targets == trace_start).any(), "no trace in the mid-training mixture's first batch"
    assert (targets == START_HEADER).any(), "no chat in the mid-training mixture's first batch"
    # A trace's prompt is context, its frames are trained.
    assert (mask[targets == trace_start] == 0).all()
    assert (mask[np.isin(targets, [call_sep, line_sep])] == 1).all()


def expected_chat_mask(ids: list[int]) -> list[float]:
    """Per id of a rendered chat (from <|begin_of_text|>): 1 for assistant content after its header and its EOT."""
    out, inside = [], False
    for i, t in enumerate(ids):
        out.append(1.0 if inside else 0.0)
        if inside and t == EOT:
            inside = False
        elif (
            not inside
            and i + 1 >= len(ASSISTANT_HEADER)
            and ids[i + 1 - len(ASSISTANT_HEADER) : i + 1] == ASSISTANT_HEADER
        ):
            inside = True
    return out


def test_sft_first_batch_trains_assistant_tokens_only():
    cfg = config("tiny_sft")
    [batch] = first_batches(cfg)
    checked = 0
    for inputs, targets, segs, mask in zip(
        batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_mask"], strict=True
    ):
        # Never trained anywhere: headers, and the system prompt's or the user's text.
        assert (mask[np.isin(targets, [BOS, START_HEADER, END_HEADER])] == 0).all()
        trained = bytes(int(t) for t, m in zip(targets, mask, strict=True) if m and t < 256)
        assert b"You always reason" not in trained and b"What does `" not in trained
        for s in np.unique(segs[segs > 0]):
            at = np.flatnonzero(segs == s)
            if inputs[at[0]] != BOS:
                continue  # the rest of a document cut at the end of the row before: no header to start from
            ids = [int(inputs[at[0]])] + targets[at].tolist()
            np.testing.assert_array_equal(mask[at], expected_chat_mask(ids)[1:])
            assert mask[at].sum() > 0
            checked += 1
    assert checked >= cfg.global_batch, "too few whole chats in the first SFT batch to check"


def test_tiny_traces_resolve_like_the_release_debugger():
    records = [json.loads(line)["trace"] for line in (DATA / "tiny_traces.jsonl").read_text().splitlines()]
    assert 150 <= len(records) <= 250
    for rec in records:
        frames = [chat.Frame(f["event"], f.get("locals"), f["line"], f.get("value")) for f in rec["frames"]]
        assert len(frames) <= 60
        lines = rec["source"].splitlines()
        # The entry's def line as written: the marker is in the prompt's source, not in the trace (the release's
        # debugger strips it from lines, "usually not predicted by the model").
        assert frames[0].event == "call" and frames[0].source_line.startswith(f"def {rec['entry']}(")
        assert frames[-1].event == "return"
        stack: list[dict[str, str]] = []  # the true locals of each active scope
        for i, f in enumerate(frames):
            assert f.source_line in lines
            if f.event == "return":
                stack.pop()
                continue
            if f.event == "exception":
                continue
            if f.event == "call":
                stack.append({})
            scope = stack[-1]
            for k, v in f.locals.items():
                if v == "..":
                    assert k in scope, f"{rec['entry']} frame {i}: {k!r} is '..' with no earlier value in its scope"
                    assert walk_back(frames, i, k) == scope[k], f"{rec['entry']} frame {i}: {k!r} resolves wrongly"
                else:
                    assert len(v) <= 80
            stack[-1] = {k: scope[k] if v == ".." else v for k, v in f.locals.items()}
        assert not stack, f"{rec['entry']}: the trace does not leave the entry function"


def walk_back(frames: list[chat.Frame], i: int, name: str) -> str | None:
    # The release's debugger: the nearest earlier value, stopping at a call (inclusive) or a return.
    for f in reversed(frames[:i]):
        if f.event == "return":
            return None
        if f.locals is not None and f.locals.get(name, "..") != "..":
            return f.locals[name]
        if f.event == "call":
            return None
    return None


def test_tiny_chats_are_reasoning_chats():
    records = [json.loads(line)["messages"] for line in (DATA / "tiny_chat.jsonl").read_text().splitlines()]
    assert 250 <= len(records) <= 350
    for messages in records:
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == chat.REASONING_SYSTEM_PROMPT
        reply = chat.parse_reply(messages[2]["content"], reasoning=True)
        assert reply.reasoning and reply.answer


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the committed data was written with CPython 3.11")
def test_tiny_data_is_what_the_script_writes(tmp_path):
    _load(DATA / "make_tiny_data.py").main(tmp_path)
    for name in (
        "trace_corpus.jsonl",
        "tiny_rl_tasks.jsonl",
        "tiny_rl_warmstart.jsonl",
        "tiny_traces.jsonl",
        "tiny_chat.jsonl",
    ):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"configs/data/{name} is stale: run python configs/data/make_tiny_data.py"
        )
