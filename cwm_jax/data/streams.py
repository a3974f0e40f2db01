"""The global record order and its row streams, zipped into batches by `StreamBatchDataset`.

Global batch row r comes from row stream r: records r, r + B, r + 2B, ... of one global order of (source, record)
pairs that every process computes from the seed alone, packed into rows by themselves. A process iterates only
the streams of its own rows, so it reads only its share, and the batches of all processes side by side are the batch
of one process: the data of a run does not depend on how many processes it has.
"""

from __future__ import annotations

import functools

import grain
import numpy as np


def global_order(sizes: list[int], weights: list[float], *, seed: int, shuffle: bool, num_epochs: int | None):
    """A MapDataset of `(source index, record index)`: the sources mixed by weight, each reshuffled every one of its
    epochs, and the mixture shuffled in windows of one mixed epoch (so every row stream draws from every source).
    It repeats forever (`num_epochs` None) or ends when the first source runs out in proportion. Reads no data."""
    parts = []
    for i, n in enumerate(sizes):
        part = grain.MapDataset.range(n)
        if shuffle:
            part = part.shuffle(seed=_seed(seed, i))
        parts.append(part.repeat(num_epochs).map(functools.partial(_tag, i)))
    order = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    if shuffle:
        key = _seed(seed, len(sizes))
        if num_epochs is None:
            one_epoch = len(grain.MapDataset.mix([grain.MapDataset.range(n) for n in sizes], weights))
            order = grain.experimental.WindowShuffleMapDataset(order, window_size=one_epoch, seed=key)
        else:
            order = order.shuffle(seed=key)  # finite: one permutation of the whole pass
    return order


def _seed(seed: int, index: int) -> int:
    # Independent 32-bit seeds per use (grain's shuffles take 32 bits and add the epoch or window to them).
    return int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0]) >> 1


def _tag(source: int, index: int) -> tuple[int, int]:
    return source, int(index)


class StreamBatchDataset(grain.IterDataset):
    """Batches of one row from each local row stream, in order; a finished stream gives padding rows.

    `rows` are the local streams (IterDatasets of row dicts). A finite pass ends when every stream of every process
    is exhausted: `counts` holds, for each stream of the other processes, an IterDataset with one element per row of
    that stream, counted only once this process's own streams are done, so every process stops after the same
    number of batches. Worker processes slice every parent alike, so this holds per worker too.
    """

    def __init__(self, rows: list[grain.IterDataset], counts: list[grain.IterDataset], padding: dict[str, np.ndarray]):
        super().__init__([*rows, *counts])
        self._num_rows = len(rows)
        self._padding = padding

    def __iter__(self):
        parents = self.parents
        return _StreamBatchIterator(parents[: self._num_rows], parents[self._num_rows :], self._padding)

    def __str__(self) -> str:
        return f"StreamBatchDataset({self._num_rows} local streams, {len(self.parents) - self._num_rows} counted)"


class _StreamBatchIterator(grain.DatasetIterator):
    def __init__(self, rows, counts, padding):
        super().__init__([ds.__iter__() for ds in rows])
        self._counts, self._padding = counts, padding
        self._step, self._done, self._stop = 0, [False] * len(rows), None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop is not None and self._step >= self._stop:
            raise StopIteration
        rows = []
        for j, it in enumerate(self._parents):
            row = self._padding
            if not self._done[j]:
                try:
                    row = next(it)
                except StopIteration:
                    self._done[j] = True
            rows.append(row)
        if all(self._done):
            if self._stop is None:
                # The local streams ended by this step; the others end when their rows run out.
                self._stop = max([self._step] + [sum(1 for _ in ds) for ds in self._counts])
            if self._step >= self._stop:
                raise StopIteration
        self._step += 1
        return {k: np.stack([row[k] for row in rows]) for k in self._padding}

    def get_state(self) -> dict:
        return {
            "step": self._step,
            "done": list(self._done),
            "stop": -1 if self._stop is None else self._stop,
            "streams": [it.get_state() for it in self._parents],
        }

    def set_state(self, state: dict) -> None:
        self._step, self._done = int(state["step"]), [bool(d) for d in state["done"]]
        self._stop = None if state["stop"] < 0 else int(state["stop"])
        for it, s in zip(self._parents, state["streams"], strict=True):
            it.set_state(s)

    def __str__(self) -> str:
        return f"StreamBatchIterator({len(self._parents)} streams, step {self._step})"
