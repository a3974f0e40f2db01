"""The block schedule shared by every attention kernel: which (query block, KV block) pairs a pass visits.

Self-attention at indices 0..T-1 (T padded to a multiple of both block sizes), query block qi holding queries
qi*Q .. qi*Q+Q-1 and KV block kj holding keys kj*C .. kj*C+C-1. Query i sees key j iff j <= i and, with a window W,
i - W < j. A pair is visited iff some query of the block may see some key of the other, so a causal layer visits
about half the pairs and a local layer O(T * W / (Q * C)) of them. Segment ids only mask inside visited pairs.

The ranges are closed-form integer arithmetic that works on Python ints, numpy arrays and traced JAX scalars alike:
the GPU (Triton) kernel evaluates them inside the kernel from its program id, the TPU (Mosaic) kernels flatten them
into the pair tables they prefetch into SMEM, and `visit_counts` reports them. One definition, no drift between them.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

# Score of an invisible (query, key) pair in every kernel: finite, unlike -inf, so a row whose first visited block is
# all masked gets max = MASK_VALUE and exp(0) weights there, which the first visible score erases exactly
# (exp(MASK_VALUE - s) == 0 in float32); -inf would make exp(-inf - -inf) = NaN. Every row sees itself.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_window(window) -> int | None:
    """The window as a Python int >= 1, or None; ValueError otherwise."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    window = operator.index(window)
    if window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    return window


def check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT) -> int | None:
    """Validate a GQA self-attention call (q [B, T, N, H], k and v [B, T, K, H], K | N, segment ids [B, T] or None);
    returns the window as a Python int or None."""
    if q_BTNH.ndim != 4 or k_BTKH.ndim != 4 or k_BTKH.shape != v_BTKH.shape:
        raise ValueError(
            f"want q [B, T, N, H] and k, v [B, T, K, H]; got {q_BTNH.shape}, {k_BTKH.shape}, {v_BTKH.shape}"
        )
    B, T, N, H = q_BTNH.shape
    if k_BTKH.shape[:2] != (B, T) or k_BTKH.shape[3] != H or N % k_BTKH.shape[2]:
        raise ValueError(f"q {q_BTNH.shape} and k/v {k_BTKH.shape} are not a GQA self-attention pair")
    if segment_ids_BT is not None and segment_ids_BT.shape != (B, T):
        raise ValueError(f"segment_ids_BT must be [B, T] = {(B, T)}, got {segment_ids_BT.shape}")
    return check_window(window)


def _pick(a, b, py, np_fn, jnp_name):
    """A binary op for Python ints, numpy values or traced JAX values (imported lazily: numpy callers need no JAX)."""
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return py(a, b)
    if all(isinstance(x, (int, np.integer, np.ndarray)) for x in (a, b)):
        return np_fn(a, b)
    import jax.numpy as jnp

    return getattr(jnp, jnp_name)(a, b)


def _min(a, b):
    return _pick(a, b, min, np.minimum, "minimum")


def _max(a, b):
    return _pick(a, b, max, np.maximum, "maximum")


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan(seq_len: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """Clamped block sizes (Q, C) and the padded length T_pad, a multiple of both.

    The smaller block is clamped to T first, then the larger one to T rounded up to it, so a short sequence neither
    pays for a huge block nor for the lcm of a clamped and an unclamped block.
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    if block_q >= block_k:
        C = min(block_k, seq_len)
        Q = min(block_q, round_up(seq_len, C))
    else:
        Q = min(block_q, seq_len)
        C = min(block_k, round_up(seq_len, Q))
    return Q, C, round_up(seq_len, math.lcm(Q, C))


def kv_block_range(qi, Q: int, C: int, window: int | None, num_k_blocks: int):
    """Inclusive range (lo, hi) of the KV blocks that query block qi visits. qi: int, int array or traced scalar."""
    hi = _min((qi * Q + Q - 1) // C, num_k_blocks - 1)
    lo = 0 * qi if window is None else _max(qi * Q - window + 1, 0) // C
    return lo, hi


def q_block_range(kj, Q: int, C: int, window: int | None, num_q_blocks: int):
    """Inclusive range (lo, hi) of the query blocks that visit KV block kj (the dK/dV pass walks these)."""
    lo = (kj * C) // Q
    hi = (0 * kj + num_q_blocks - 1) if window is None else _min((kj * C + C - 1 + window - 1) // Q, num_q_blocks - 1)
    return lo, hi


def block_needs_mask(qi, kj, Q: int, C: int, window: int | None):
    """Whether pair (qi, kj) holds an invisible (query, key) pair, i.e. needs the elementwise mask (without segments).

    Fully visible iff the block's last key is <= its first query and, with a window, its first key is > last query - W.
    """
    full = kj * C + C - 1 <= qi * Q
    if window is not None:
        full = full & (kj * C > qi * Q + Q - 1 - window)
    return ~full if not isinstance(full, bool) else not full


@dataclasses.dataclass(frozen=True)
class PairTable:
    """The visited pairs of one pass in visiting order, as int32 arrays for scalar prefetch.

    q_block[p], k_block[p]: the pair; first[p] / last[p]: 1 on the first / last pair of its row (the block the pass
    accumulates for: a query block in the forward and dQ passes, a KV block in the dK/dV pass); needs_mask[p]: 1 where
    the causal / window mask is not all-true.
    """

    q_block: np.ndarray
    k_block: np.ndarray
    first: np.ndarray
    last: np.ndarray
    needs_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.q_block)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.q_block, self.k_block, self.first, self.last, self.needs_mask


def pair_table(T_pad: int, Q: int, C: int, window: int | None, *, by: str = "q") -> PairTable:
    """Visited pairs grouped by query block (by="q": forward and dQ) or by KV block (by="k": dK/dV)."""
    if T_pad % Q or T_pad % C:
        raise ValueError(f"padded length {T_pad} must be a multiple of the block sizes {Q} and {C}")
    nq, nk = T_pad // Q, T_pad // C
    rows = []
    if by == "q":
        for qi in range(nq):
            lo, hi = kv_block_range(qi, Q, C, window, nk)
            rows.append([(qi, kj) for kj in range(lo, hi + 1)])
    elif by == "k":
        for kj in range(nk):
            lo, hi = q_block_range(kj, Q, C, window, nq)
            rows.append([(qi, kj) for qi in range(lo, hi + 1)])
    else:
        raise ValueError(f"by must be 'q' or 'k', got {by!r}")
    pairs = [pair for row in rows for pair in row]
    first = [int(i == 0) for row in rows for i in range(len(row))]
    last = [int(i == len(row) - 1) for row in rows for i in range(len(row))]
    qb = np.array([p[0] for p in pairs], np.int32)
    kb = np.array([p[1] for p in pairs], np.int32)
    mask = np.array([block_needs_mask(int(q), int(k), Q, C, window) for q, k in pairs], np.int32)
    return PairTable(qb, kb, np.array(first, np.int32), np.array(last, np.int32), mask)


@dataclasses.dataclass(frozen=True)
class VisitCounts:
    """(query block, KV block) pairs each pass visits, against the dense grid and the pairs holding visible keys."""

    forward: int
    dq: int
    dkv: int
    grid: int  # nq * nk: what a kernel without block skipping visits
    block_q: int
    block_k: int
    padded_len: int


def visit_counts(seq_len: int, window: int | None, block_q: int, block_k: int) -> VisitCounts:
    """How many (query block, KV block) pairs the forward, dQ and dK/dV passes visit for this T, W and block sizes."""
    Q, C, T_pad = plan(seq_len, block_q, block_k)
    nq, nk = T_pad // Q, T_pad // C
    fwd = len(pair_table(T_pad, Q, C, window, by="q"))
    dkv = len(pair_table(T_pad, Q, C, window, by="k"))
    return VisitCounts(fwd, fwd, dkv, nq * nk, Q, C, T_pad)


def closed_form_pairs(seq_len: int, window: int, block: int) -> int:
    """T/B x (W/B + 1) - (W/B)(W/B + 1)/2 for B_q = B_k = B dividing both W and T (the first W/B rows see fewer)."""
    if seq_len % block or window % block:
        raise ValueError(f"the closed form needs the block {block} to divide T={seq_len} and W={window}")
    n, w = seq_len // block, window // block
    w = min(w, n - 1)  # a window as long as the sequence is causal: every block row is a prefix
    return n * (w + 1) - w * (w + 1) // 2
