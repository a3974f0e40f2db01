"""`make_iterator`: sources -> one global record order -> row streams -> tokenize -> pack -> batch, as a grain
DatasetIterator whose state (`get_state` / `set_state`, or grain's Orbax handler) restores the exact next batch.

Order of operations and why:
- Every process computes the same global order of (source, record) pairs from the seed, without reading data
  (`streams.global_order`): each source reshuffled every epoch, the sources mixed by weight (`MapDataset.mix`, a
  fixed interleave), the mixture shuffled per mixed epoch. With `num_epochs` set, every source is repeated that many
  times and the mixture ends when the first source runs out in proportion.
- Global batch row r is row stream r: records r, r + B, r + 2B, ... of that order, read and tokenized lazily and
  packed by themselves (first fit into one row, so in order). Process p of n iterates only the streams of its rows
  p*b .. (p+1)*b - 1 (b = B // n): it reads only its share, and the batches of processes 0..n-1 concatenated are,
  bit for bit, the batch of one process. Packing is thus per stream, not across the rows of a step.
- A finite pass: a finished stream gives padding rows (segment 0, loss mask 0) and every process stops after the
  same number of batches, when the last stream of any process ends (see `streams.StreamBatchDataset`).
- `num_workers` > 0 runs the batches in grain worker processes; worker w of k takes records w, w + k, ... of every
  stream, so batches depend on k (the same k on every process keeps them independent of the process count).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from cwm_jax.data.config import DataError, check_data_config
from cwm_jax.data.formats import encode_document
from cwm_jax.data.packing import empty_rows, pack_rows, single_row
from cwm_jax.data.sources import open_source
from cwm_jax.data.streams import StreamBatchDataset, global_order

# Per stream: a small read-ahead thread, so many streams neither tokenize far ahead nor start hundreds of threads.
_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
_COUNT = grain.ReadOptions(num_threads=0)


def make_iterator(
    data_cfg,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
    rows: Sequence[int] | None = None,
) -> grain.DatasetIterator:
    """A grain DatasetIterator of batches for this process: its b = batch_size // process_count rows of the
    global batch, rows process_index * b .. (process_index + 1) * b - 1, the same whatever process_count is.
    `rows` (sorted global row indices) replaces that split: the rows this process's devices hold, which processes
    may share when a row is split along the sequence over devices of several hosts (context parallelism).

    Each batch is a dict of numpy arrays: "inputs", "targets", "positions", "segment_ids" (int32 [b, seq_len])
    and "loss_mask" (float32 [b, seq_len]). `num_epochs` None repeats forever; with a number, every process
    ends after the same number of batches. `shuffle` None takes `data_cfg.shuffle`. Raises DataError for a bad
    config or input.
    """
    if rows is None:
        _check_args(seq_len, batch_size, seed, process_index, process_count, num_epochs)
    else:
        _check_args(seq_len, batch_size, seed, 0, 1, num_epochs)
    if rows is not None and (
        not rows or list(rows) != sorted(set(rows)) or not all(0 <= int(r) < batch_size for r in rows)
    ):
        raise DataError(f"rows must be distinct sorted row indices in 0..{batch_size - 1}, found {list(rows)[:8]}")
    sources = check_data_config(data_cfg)
    shuffle = bool(data_cfg.get("shuffle", True)) if shuffle is None else shuffle
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    pack = bool(data_cfg.get("pack", True))
    b = batch_size // process_count

    records = [open_source(src) for src in sources]
    order = global_order(
        [len(r) for r in records], [float(s.weight) for s in sources], seed=seed, shuffle=shuffle, num_epochs=num_epochs
    )
    formats = [(src.format, src.field) for src in sources]
    fetch = functools.partial(_fetch_encode, records=records, formats=formats, tok=tokenizer)

    def row_stream(r: int) -> grain.IterDataset:
        docs = order[r::batch_size].map(fetch)
        if pack:
            return pack_rows(docs.to_iter_dataset(_READ), seq_len=seq_len, pad_id=pad_id)
        return docs.map(functools.partial(single_row, seq_len=seq_len, pad_id=pad_id)).to_iter_dataset(_READ)

    local = range(process_index * b, (process_index + 1) * b) if rows is None else [int(r) for r in rows]
    counts = []
    if num_epochs is not None:
        # Unpacked, a stream has one row per record: its index stream counts it without reading data. Packed, the
        # row count depends on the documents' lengths, so the other processes' streams are read to count them.
        counts = [
            row_stream(r) if pack else order[r::batch_size].to_iter_dataset(_COUNT)
            for r in range(batch_size)
            if r not in local
        ]
    padding = {k: v[0] for k, v in empty_rows(1, seq_len, pad_id).items()}
    batches = StreamBatchDataset([row_stream(r) for r in local], counts, padding)
    workers = data_cfg.get("num_workers", 0)
    if workers:
        _absl_flags_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(batches)


def _check_args(seq_len, batch_size, seed, process_index, process_count, num_epochs):
    def positive(name, value):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise DataError(f"{name} must be a positive integer, found {value!r}")

    positive("seq_len", seq_len)
    positive("batch_size", batch_size)
    positive("process_count", process_count)
    if num_epochs is not None:
        positive("num_epochs", num_epochs)
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside 0..{process_count - 1} (process_count)")
    if batch_size % process_count:
        raise DataError(
            f"batch_size {batch_size} (global rows per step) is not divisible by process_count {process_count}; "
            "make it a multiple so every process gets the same number of rows"
        )
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, found {seed!r}")


def _absl_flags_parsed():
    # grain's worker start reads an absl flag directly and fails unless flags were parsed (absl.app does that);
    # a program without absl.app gets the flags' defaults, as grain's own config does.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _fetch_encode(element, *, records, formats, tok) -> dict[str, np.ndarray]:
    i, index = element
    where, record = records[i][index]
    return encode_document(where, record, *formats[i], tok)
