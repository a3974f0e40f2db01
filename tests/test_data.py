"""Input pipeline: sources, formats, packing, mixing, process shards, exact resume, errors and `cwm-data build`.

Independent references: documents are tokenized here by hand with the byte tokenizer's ids (UTF-8 bytes, then
256 + k for the CWM special of offset k, spec section 3), and chat / trace token sequences are written out from the
prompt formats of spec section 4, not through `cwm_jax.chat`. Packed rows are taken apart segment by segment and
compared with the documents cut into pieces of T examples.
"""

import collections
import json
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import grain
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from cwm_jax.data import DataError, default_data_config, make_iterator, source_config
from cwm_jax.data.cli import main as cli_main
from cwm_jax.data.sources import stdlib_files
from cwm_jax.tokenizer import load_tokenizer

TOK = load_tokenizer("byte")
# Byte tokenizer ids of the CWM specials: 256 + offset (spec section 3).
BOS, EOS, PAD = 256, 257, 260
START_HEADER, END_HEADER, EOT = 262, 263, 265
FRAME_SEP, ACTION_SEP, RETURN_SEP, CALL_SEP, LINE_SEP, ARG_SEP, TRACE_START = 356, 357, 358, 359, 360, 362, 363
TEXTS = ["", "a", "hello world", "x" * 15, "y" * 16, "z" * 40, "héllo ünïcode ✓", "def f():\n    return 1\n"]


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def data_cfg(*sources, **kw) -> ml_collections.ConfigDict:
    cfg = default_data_config()
    cfg.sources = [source_config(**s) for s in sources]
    cfg.update(kw)
    return cfg


def batches(cfg, seq_len=16, batch_size=2, seed=0, **kw) -> list[dict]:
    kw.setdefault("num_epochs", 1)
    it = make_iterator(cfg, TOK, seq_len=seq_len, batch_size=batch_size, seed=seed, **kw)
    return list(it) if kw["num_epochs"] else it


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def pieces(batch_list) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """Every segment of every row as (its tokens, its loss mask), checking the row invariants on the way."""
    out = []
    for batch in batch_list:
        assert {k: (v.dtype, v.ndim) for k, v in batch.items()} == {
            "inputs": (np.int32, 2), "targets": (np.int32, 2), "positions": (np.int32, 2),
            "segment_ids": (np.int32, 2), "loss_mask": (np.float32, 2),
        }  # fmt: skip
        for r in range(batch["inputs"].shape[0]):
            inp, tgt, pos, seg, mask = (
                batch[k][r] for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
            )
            pad = seg == 0
            assert (
                (inp[pad] == PAD).all() and (tgt[pad] == PAD).all() and (mask[pad] == 0).all() and (pos[pad] == 0).all()
            )
            ids = [s for s in np.unique(seg) if s]
            assert ids == list(range(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all(), "a segment is contiguous"
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                np.testing.assert_array_equal(tgt[where][:-1], inp[where][1:])  # targets are the next inputs
                out.append((tuple(inp[where]) + (int(tgt[where][-1]),), tuple(mask[where])))
    return out


def expected_pieces(docs, seq_len, train=None) -> list:
    """Documents (token lists) cut into pieces of seq_len examples, each with the mask of its targets."""
    out = []
    for i, ids in enumerate(docs):
        mask = train[i] if train else [1.0] * len(ids)
        for s in range(0, len(ids) - 1, seq_len):
            out.append((tuple(ids[s : s + seq_len + 1]), tuple(mask[s + 1 : s + seq_len + 1])))
    return out


def text_ids(text: str) -> list[int]:
    return [BOS] + b(text) + [EOS]


@pytest.mark.parametrize("shuffle", [False, True])
def test_packed_text_rows_hold_every_document(tmp_path, shuffle):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    out = batches(data_cfg(dict(kind="jsonl", path=path)), seq_len=16, batch_size=2, shuffle=shuffle)
    got = pieces(out)
    assert sorted(got) == sorted(expected_pieces([text_ids(t) for t in TEXTS], 16))
    # Documents longer than T are split; short ones share rows.
    assert max(len(p[0]) for p in got) == 17 and any(len(np.unique(x["segment_ids"])) > 2 for x in out)


def test_unpacked_rows_are_one_truncated_document_each(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    out = batches(data_cfg(dict(kind="jsonl", path=path), pack=False), seq_len=16, batch_size=3, shuffle=False)
    assert len(out) == 3 and all(x["inputs"].shape == (3, 16) for x in out)
    rows = [p for x in out for p in pieces([x])]
    assert rows == [expected_pieces([text_ids(t)], 16)[0] for t in TEXTS]
    # The last batch of a pass is filled with padding rows.
    assert (out[-1]["segment_ids"][-1] == 0).all()


def test_chat_trains_only_assistant_content_and_eot(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4 <|eot_id|> literal"},
        {"role": "tool: bash", "content": "ok"},
        {"role": "assistant", "content": "\ndone"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    src = dict(kind="jsonl", path=path, format="chat", field="messages")
    (batch,) = batches(data_cfg(src), seq_len=256, batch_size=1)
    ids, trained = [BOS], []
    for m in messages:
        ids += [START_HEADER] + b(m["role"]) + [END_HEADER] + b("\n\n" + m["content"]) + [EOT]
        if m["role"] == "assistant":
            trained += b(m["content"]) + [EOT]
    ((tokens, mask),) = pieces([batch])
    assert list(tokens) == ids
    np.testing.assert_array_equal(batch["targets"][0][batch["loss_mask"][0] == 1], trained)


def test_trace_trains_only_the_trace(tmp_path):
    source = "def f(x):\n    y = x + 1\n    return y\n"
    frames = [
        {"event": "call", "locals": {"x": "1"}, "line": "def f(x):"},
        {"event": "line", "locals": {"x": ".."}, "line": "    y = x + 1"},
        {"event": "line", "locals": {"x": "..", "y": "2"}, "line": "    return y"},
        {"event": "return", "line": "    return y", "value": "2"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", [{"trace": {"source": source, "entry": "f", "frames": frames}}])
    (batch,) = batches(
        data_cfg(dict(kind="jsonl", path=path, format="trace", field="trace")), seq_len=256, batch_size=1
    )
    marked = source.replace("def f(x):\n", "def f(x):  # << START_OF_TRACE\n", 1)
    prompt = [BOS, TRACE_START] + b(marked) + [FRAME_SEP]
    trace = []
    for f in frames:
        if f["event"] == "return":
            trace += [RETURN_SEP, ACTION_SEP] + b(f["line"]) + [ARG_SEP] + b(json.dumps(f["value"])) + [FRAME_SEP]
        else:
            sep = CALL_SEP if f["event"] == "call" else LINE_SEP
            trace += [sep] + b(json.dumps(f["locals"])) + [ACTION_SEP] + b(f["line"]) + [FRAME_SEP]
    trace.append(EOS)
    ((tokens, _),) = pieces([batch])
    assert list(tokens) == prompt + trace
    np.testing.assert_array_equal(batch["targets"][0][batch["loss_mask"][0] == 1], trace)


def test_tokens_format(tmp_path):
    docs = [list(range(1, 30)), [5, 6], [7]]  # a one-token document has no example and is dropped
    path = write_jsonl(tmp_path / "t.jsonl", [{"ids": d} for d in docs])
    out = batches(data_cfg(dict(kind="jsonl", path=path, format="tokens", field="ids")), seq_len=8, batch_size=2)
    assert sorted(pieces(out)) == sorted(expected_pieces(docs, 8))


def texts_of(batch_list) -> list[str]:
    return [TOK.decode(list(t)[1:-1]) for t, _ in pieces(batch_list)]


def test_sources_parquet_arrayrecord_tfds_stdlib(tmp_path, monkeypatch):
    texts = [f"document {i} " + "w" * i for i in range(9)]
    table = pa.table({"text": texts, "other": list(range(9))})
    pq.write_table(table.slice(0, 5), tmp_path / "p0.parquet", row_group_size=2)
    pq.write_table(table.slice(5), tmp_path / "p1.parquet", row_group_size=2)
    (tmp_path / "ar").mkdir()
    for k, part in enumerate([texts[:4], texts[4:]]):
        writer = ArrayRecordWriter(str(tmp_path / "ar" / f"d-{k}.array_record"), "group_size:1")
        for t in part:
            writer.write(json.dumps({"text": t}).encode())
        writer.close()

    import tensorflow_datasets as tfds

    # Building a TFDS dataset needs TensorFlow; a list of feature dicts (text as bytes) stands in for the source.
    calls = []
    monkeypatch.setattr(
        tfds, "data_source", lambda name, **kw: calls.append((name, kw)) or [{"text": t.encode()} for t in texts]
    )
    for src in [
        dict(kind="parquet", path=str(tmp_path / "*.parquet")),
        dict(kind="parquet", path=str(tmp_path)),
        dict(kind="arrayrecord", path=str(tmp_path / "ar")),
        dict(kind="tfds", path="tiny_ds", split="validation", data_dir="/data"),
    ]:
        got = texts_of(batches(data_cfg(src), seq_len=64, batch_size=2))
        assert sorted(got) == sorted(texts), src
    assert calls == [("tiny_ds", {"split": "validation", "data_dir": "/data"})]

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(f) for f in (root / "json").glob("*.py"))
    got = texts_of(batches(data_cfg(dict(kind="stdlib", path="json/*.py")), seq_len=1 << 16, batch_size=1))
    assert sorted(got) == sorted(Path(f).read_text() for f in files)
    default = stdlib_files()
    assert default and all(Path(f).parent == root and f.endswith(".py") for f in default)
    nested = stdlib_files("unittest/**/*.py")
    assert nested and not any("/test/" in f for f in nested)


def test_mixture_follows_weights_and_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": f"c{i}"} for i in range(50)])
    cfg = data_cfg(dict(name="a", kind="jsonl", path=a, weight=1.0), dict(name="c", kind="jsonl", path=c, weight=3.0))
    cfg.pack = False
    it = make_iterator(cfg, TOK, seq_len=8, batch_size=4, seed=0)
    got = texts_of(take(it, 100))
    share = collections.Counter(t[0] for t in got)["c"] / len(got)
    assert abs(share - 0.75) < 0.03
    # Source a (20 records) is repeated, every record as often as any other: each epoch of it holds every record once.
    a_count = collections.Counter(t for t in got if t[0] == "a")
    assert set(a_count) == {f"a{i}" for i in range(20)} and max(a_count.values()) - min(a_count.values()) <= 1
    same = texts_of(take(make_iterator(cfg, TOK, seq_len=8, batch_size=4, seed=0), 100))
    other = texts_of(take(make_iterator(cfg, TOK, seq_len=8, batch_size=4, seed=1), 100))
    assert same == got and other != got


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


class CountingTokenizer:
    """The byte tokenizer, recording every text it encodes (grain reads ahead on threads, hence the lock)."""

    def __init__(self):
        self.texts, self._lock = [], threading.Lock()

    def __getattr__(self, name):
        return getattr(TOK, name)

    def encode(self, text, **kw):
        with self._lock:
            self.texts.append(text)
        return TOK.encode(text, **kw)


def process_batches(cfg, count, *, steps=None, tok=TOK, **kw) -> list[dict]:
    it = make_iterator(cfg, tok, seq_len=16, batch_size=4, seed=3, process_count=count, **kw)
    return list(it) if steps is None else take(it, steps)


@pytest.mark.parametrize("pack", [True, False])
def test_global_batch_does_not_depend_on_the_process_count(tmp_path, pack):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i} " * (i % 7 + 1)} for i in range(20)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": f"c{i} " * (i % 11 + 1)} for i in range(40)])
    cfg = data_cfg(dict(name="a", kind="jsonl", path=a), dict(name="c", kind="jsonl", path=c, weight=2.0), pack=pack)
    for num_epochs, steps in [(None, 12), (1, None), (2, None)]:
        one = process_batches(cfg, 1, steps=steps, num_epochs=num_epochs)
        for count in (2, 4):
            shards = [process_batches(cfg, count, steps=steps, num_epochs=num_epochs, process_index=p)
                      for p in range(count)]  # fmt: skip
            assert [len(s) for s in shards] == [len(one)] * count, (num_epochs, count)
            joined = [{k: np.concatenate([s[i][k] for s in shards]) for k in one[i]} for i in range(len(one))]
            assert_same_batches(joined, one)
        if num_epochs:
            # A finite pass holds every document num_epochs times (the sources' sizes are in proportion to their
            # weights, so neither runs out first), and its last batch is not only padding.
            docs = [text_ids(f"a{i} " * (i % 7 + 1)) for i in range(20)]
            docs += [text_ids(f"c{i} " * (i % 11 + 1)) for i in range(40)]
            want = expected_pieces(docs, 16) if pack else [expected_pieces([d], 16)[0] for d in docs]
            assert sorted(pieces(one)) == sorted(want * num_epochs)
            assert one[-1]["segment_ids"].any()


def test_explicit_rows_are_those_rows_of_the_global_batch(tmp_path):
    """`rows=` (what a trainer passes when hosts share rows split along the sequence) picks rows of the same batch."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"r{i} " * (i % 5 + 1)} for i in range(30)])
    cfg = data_cfg(dict(kind="jsonl", path=path))
    one = process_batches(cfg, 1, steps=5)
    for rows in ([1, 3], [0, 1, 2, 3], [2]):
        picked = process_batches(cfg, 1, steps=5, rows=rows)
        assert_same_batches(picked, [{k: v[rows] for k, v in batch.items()} for batch in one])
    for bad in ([], [3, 1], [0, 4], [1, 1]):
        with pytest.raises(DataError, match="rows must be distinct sorted row indices in 0..3"):
            process_batches(cfg, 1, steps=1, rows=bad)


@pytest.mark.parametrize("pack", [True, False])
def test_each_process_reads_only_its_rows_and_all_stop_together(tmp_path, pack):
    # Unshuffled, one source: the global order is the records' order, so row stream r holds records r, r + 4, ...
    # Records of process 0's streams (rows 0, 1) are long, those of process 1 (rows 2, 3) short.
    texts = [f"d{i} " * (12 if i % 4 < 2 else 1) for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    cfg = data_cfg(dict(kind="jsonl", path=path), pack=pack, shuffle=False)
    for num_epochs, steps in [(None, 3), (1, None)]:
        tokenized = []
        for p in range(2):
            tok = CountingTokenizer()
            process_batches(cfg, 2, steps=steps, tok=tok, process_index=p, num_epochs=num_epochs)
            tokenized.append(tok.texts)
        for p in range(2):
            own = [t for i, t in enumerate(texts) if i % 4 // 2 == p]
            if pack and num_epochs:
                # Packed, once its own streams are done, a finite pass reads the other process's records to count
                # their rows (a row count depends on the documents' lengths).
                assert sorted(tokenized[p][: len(own)]) == sorted(own)
                assert sorted(tokenized[p][len(own) :]) == sorted(set(texts) - set(own))
            else:
                assert tokenized[p] and set(tokenized[p]) <= set(own), (p, num_epochs)
                assert num_epochs is None or sorted(tokenized[p]) == sorted(own)
    # Evaluation: both processes give the same number of batches, those of the process with the longer streams
    # (rows 0, 1 get the 21st and 22nd record); the other pads its finished streams.
    texts += [f"d{i} " * 12 for i in range(20, 22)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    shards = [process_batches(cfg, 2, process_index=p, num_epochs=1) for p in range(2)]
    one = process_batches(cfg, 1, num_epochs=1)
    assert len(shards[0]) == len(shards[1]) == len(one)
    assert shards[0][-1]["segment_ids"].any() and not shards[1][-1]["segment_ids"].any()
    last = [i for i, x in enumerate(shards[1]) if x["segment_ids"].any()][-1]
    assert last < len(one) - 1 and all(not x["loss_mask"].any() for x in shards[1][last + 1 :])


def test_state_restores_exactly(tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler, CheckpointRestore, CheckpointSave

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a" * (3 + 7 * i)} for i in range(9)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": f"c{i} " * i} for i in range(13)])
    cfg = data_cfg(dict(kind="jsonl", path=a, weight=1.0), dict(kind="jsonl", path=c, weight=2.0))

    def fresh():
        return make_iterator(cfg, TOK, seq_len=16, batch_size=2, seed=5)

    it = fresh()
    assert isinstance(it, grain.DatasetIterator)
    reference = take(it, 12)
    it = fresh()
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    assert_same_batches(take(it, 7), reference[5:])
    restored = fresh()
    restored.set_state(state)
    assert_same_batches(take(restored, 7), reference[5:])
    # grain's Orbax handler, as the trainer saves the iterator.
    it = fresh()
    take(it, 3)
    ckpt = epath.Path(tmp_path / "ckpt")
    ckpt.mkdir()
    CheckpointHandler().save(ckpt, args=CheckpointSave(it))
    restored = CheckpointHandler().restore(ckpt, args=CheckpointRestore(fresh()))
    assert_same_batches(take(restored, 9), reference[3:])


def test_errors_name_the_problem(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hi"}, {"text": "there"}])
    (tmp_path / "empty_dir").mkdir()
    cases = [
        (dict(kind="jsonl", path=str(tmp_path / "missing.jsonl")), "missing.jsonl: no such file"),
        (dict(kind="jsonl", path=str(tmp_path / "*.nothing")), "matches no file"),
        (dict(kind="jsonl", path=str(tmp_path / "empty_dir")), "holds no .jsonl or .json file"),
        (dict(kind="csv", path=good), "kind is 'csv'"),
        (dict(kind="jsonl", path=good, format="xml"), "format is 'xml'"),
        (dict(kind="jsonl", path=good, weight=0.0), "weight must be a positive number"),
        (dict(kind="jsonl", path=good, weight=-2), "weight must be a positive number"),
        (dict(kind="jsonl", path=good, colour="red"), "unknown data source keys"),
        (dict(kind="stdlib", format="chat"), "use 'text'"),
        (dict(kind="parquet", path=good), "not a Parquet file"),
    ]
    for src, message in cases:
        with pytest.raises(DataError, match=message):
            batches(ml_collections.ConfigDict({"sources": [src]}))
    cfg = data_cfg(dict(kind="jsonl", path=good))
    with pytest.raises(DataError, match="not divisible by process_count 2"):
        make_iterator(cfg, TOK, seq_len=8, batch_size=3, seed=0, process_count=2)
    with pytest.raises(DataError, match="unknown data config keys"):
        batches(data_cfg(dict(kind="jsonl", path=good), shufle=False))
    assert issubclass(DataError, ValueError)

    bad_records = [
        ({"txt": "x"}, "text", "text", r"bad.jsonl line 2: record has no field 'text'"),
        ({"m": [{"role": "robot", "content": "x"}]}, "chat", "m", r"line 2: cannot tokenize this 'chat' record.*robot"),
        ({"t": {"source": "x = 1\n", "entry": "f", "frames": []}}, "trace", "t", r"line 2: .*no function 'f'"),
        ({"ids": [1, 9999]}, "tokens", "ids", r"line 2: .*outside the vocabulary"),
        ({"text": 3}, "text", "text", r"line 2: .*must hold a string"),
    ]
    for record, fmt, field, message in bad_records:
        # Line 1 is blank (skipped), so the bad record is line 2.
        (tmp_path / "bad.jsonl").write_text("\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=message):
            batches(data_cfg(dict(kind="jsonl", path=str(tmp_path / "bad.jsonl"), format=fmt, field=field)))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 3: not valid JSON"):
        batches(data_cfg(dict(kind="jsonl", path=str(tmp_path / "broken.jsonl"))), shuffle=False)


def test_cli_build_round_trips(tmp_path, capsys):
    records = [{"text": f"record {i}", "id": i} for i in range(25)]
    src = write_jsonl(tmp_path / "in.jsonl", records[:20])
    pq.write_table(pa.Table.from_pylist(records[20:]), tmp_path / "in.parquet")
    out = tmp_path / "shards"
    assert cli_main(["build", src, str(tmp_path / "in.parquet"), "--out", str(out), "--records-per-shard", "10"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    assert "wrote 25 records in 3 shards" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    got = texts_of(batches(data_cfg(dict(kind="arrayrecord", path=str(out))), seq_len=32, batch_size=5))
    assert sorted(got) == sorted(r["text"] for r in records)

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    for args, message in [
        ([src, "--out", str(out)], "already exists; pass --overwrite"),
        ([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o1")], "nope.jsonl: no such file"),
        ([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2")], "bad.jsonl line 3: not valid JSON"),
        ([src, "--out", str(tmp_path / "o3"), "--field", "body"], "in.jsonl line 1: record has no field 'body'"),
    ]:
        assert cli_main(["build", *args]) == 2
        # One error line, after the progress bar (also on stderr) when it had started.
        last = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
        assert last.startswith("cwm-data build: error: ") and message in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "in.jsonl", "in.parquet", "shards"]
    assert cli_main(["build", src, "--out", str(out), "--overwrite"]) == 0
    assert [p.name for p in out.iterdir()] == ["data-00000-of-00001.array_record"]
    run = subprocess.run(
        [sys.executable, "-m", "cwm_jax.data.cli", "build", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "no such file" in run.stderr


def test_worker_process_gives_the_same_batches_and_resumes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i} " * (i % 5 + 1)} for i in range(30)])
    cfg = data_cfg(dict(kind="jsonl", path=path))
    reference = take(make_iterator(cfg, TOK, seq_len=16, batch_size=2, seed=0), 6)
    cfg.num_workers = 1  # one worker reads the whole dataset, so its batches are the in-process ones
    it = make_iterator(cfg, TOK, seq_len=16, batch_size=2, seed=0)
    assert_same_batches(take(it, 3), reference[:3])
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    restored = make_iterator(cfg, TOK, seq_len=16, batch_size=2, seed=0)
    restored.set_state(state)
    assert_same_batches(take(restored, 3), reference[3:])
    restored.close()
