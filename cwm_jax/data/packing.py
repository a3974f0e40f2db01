"""Documents -> fixed rows of T tokens: grain's first-fit packing into one row at a time, or one document per row.

A document of N ids gives N - 1 examples (input ids[i], target ids[i + 1], loss mask train[i + 1]). Documents longer
than T are cut into pieces of T examples; each piece restarts positions at 0 and is its own segment, so attention
never spans a cut: a row is self-contained and a piece needs no state from the row before it (the cost: the first
tokens of a later piece see no earlier context). Rows are padded with the pad id, segment 0, loss mask 0.
"""

from __future__ import annotations

import grain
import numpy as np

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class SplitDocument(grain.experimental.FlatMapTransform):
    """A document `{"ids", "train"}` -> pieces `{"inputs", "targets", "loss_mask"}` of at most T examples."""

    max_fan_out = 1 << 20  # not enforced by grain's iterator flat map; documents have any length

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, doc):
        ids, train = doc["ids"], doc["train"]
        inputs, targets, loss_mask = ids[:-1], ids[1:], train[1:]
        return [
            {"inputs": inputs[s : s + self.seq_len], "targets": targets[s : s + self.seq_len],
             "loss_mask": loss_mask[s : s + self.seq_len]}
            for s in range(0, len(inputs), self.seq_len)
        ]  # fmt: skip


def pack_rows(ds: grain.IterDataset, *, seq_len: int, pad_id: int) -> grain.IterDataset:
    """Packed rows (ROW_KEYS) from documents, in order: first fit into one row, emitted when the next piece does not
    fit (checkpointable: its state is the parent's state at the last emitted row)."""
    pieces = grain.experimental.FlatMapIterDataset(ds, SplitDocument(seq_len))
    keys = ("inputs", "targets", "loss_mask")
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={k: seq_len for k in keys},
        num_packing_bins=1,
        shuffle_bins=False,
        padding_struct={"inputs": pad_id, "targets": pad_id, "loss_mask": 0.0},
    )
    return packed.map(_packed_row)


def _packed_row(x) -> dict[str, np.ndarray]:
    return {
        "inputs": x["inputs"].astype(np.int32),
        "targets": x["targets"].astype(np.int32),
        "positions": x["inputs_positions"].astype(np.int32),
        "segment_ids": x["inputs_segment_ids"].astype(np.int32),
        "loss_mask": x["loss_mask"].astype(np.float32),
    }


def single_row(doc, *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One document as one row: its first T examples, padded; a document of fewer than two tokens gives a padding
    row (so an unpacked stream has one row per record, a count known without reading data)."""
    ids, train = doc["ids"], doc["train"]
    n = max(min(len(ids) - 1, seq_len), 0)
    row = {k: v[0] for k, v in empty_rows(1, seq_len, pad_id).items()}
    row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = ids[:n], ids[1 : n + 1], train[1 : n + 1]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    return row


def empty_rows(b: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`b` rows of padding only."""
    return {
        "inputs": np.full((b, seq_len), pad_id, np.int32),
        "targets": np.full((b, seq_len), pad_id, np.int32),
        "positions": np.zeros((b, seq_len), np.int32),
        "segment_ids": np.zeros((b, seq_len), np.int32),
        "loss_mask": np.zeros((b, seq_len), np.float32),
    }
