"""Context parallelism: self-attention with the sequence sharded over the `sequence` mesh axis.

Shape legend as in `cwm_jax.attention`: B batch, T positions (whole sequence), N query heads, K KV heads, H head dim,
W window. Per shard: L = T / n local positions, c the length of one contiguous piece of them, h = W - 1 halo keys.

`context_parallel_attention` runs `jax.shard_map` over the `sequence` axis only (the other mesh axes stay automatic).
Each shard holds L = T / n positions of q, k, v and segment ids and attends its queries to the keys they may see:

  * global (causal) layers, and local layers whose halo does not fit in one piece (W - 1 > c): all-gather K, V (and
    segment ids) across `sequence`; each shard attends its queries to all T keys. The blocked kernel's loop bounds
    are computed from the indices at run time, so a query block visits only the KV blocks up to its own end.
  * local layers (W - 1 <= c): each contiguous piece of the shard receives the h = W - 1 keys just before it from the
    shard holding them (`lax.ppermute`), and attends to [halo, piece]: h keys per piece travel instead of (n - 1) L.

Layouts ("natural" | "zigzag"): natural: shard i holds positions [i L, (i + 1) L), one piece. zigzag: the sequence is
cut into 2n chunks of c = T / 2n and shard i holds chunks i and 2n - 1 - i (two pieces), so every shard does the same
causal work; the caller permutes tokens, positions, segment ids (and targets, loss mask) with `to_zigzag`. Masking
always uses the original index of each token (causal j <= i, window i - W < j, same segment), never its permuted slot.

Memory: per shard O(T) for the gathered K, V of a global layer, O(L + h) for a local layer; the blocked kernel never
builds more than a [Q, C] score block. Gradients: the kernel's custom VJP (also O(T)) composed with autodiff through
the collectives (the transpose of all_gather is a reduce-scatter, of ppermute the reverse ppermute).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from cwm_jax import attention as attn_lib

SEQUENCE_AXIS = "sequence"
LAYOUTS = ("natural", "zigzag")


def sequence_axis_size(axis_name: str = SEQUENCE_AXIS) -> int:
    """Size of the `sequence` axis of the current mesh (`jax.set_mesh`); 1 without a mesh, axis, or inside shard_map."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis_name not in mesh.axis_names:
        return 1
    i = mesh.axis_names.index(axis_name)
    types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
    # Already Manual: we are inside a shard_map over it, where each shard sees only its own positions.
    return 1 if types[i] == AxisType.Manual else mesh.axis_sizes[i]


def check_layout(layout: str, n: int | None = None) -> None:
    """ValueError unless `layout` is a known layout, valid for a sequence axis of size n if given (zigzag: n > 1)."""
    if layout not in LAYOUTS:
        raise ValueError(f"sequence_layout is {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")
    if layout == "zigzag" and n == 1:
        raise ValueError(
            "sequence_layout='zigzag' needs a mesh whose 'sequence' axis has size > 1 (jax.set_mesh); with none, or"
            " size 1, the tokens must be in their natural order: use sequence_layout='natural'"
        )


def zigzag_permutation(T: int, n: int) -> np.ndarray:
    """Index array [T] mapping zigzag slot -> original position: chunks i and 2n - 1 - i of T / 2n go to shard i."""
    if n < 1 or T % (2 * n):
        raise ValueError(f"zigzag layout over {n} shards cuts T into {2 * n} equal chunks; T={T} is not a multiple")
    c = T // (2 * n)
    order = [j for i in range(n) for j in (i, 2 * n - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in order])


def to_zigzag(x, n: int, axis: int = 1):
    """Reorder `x` (numpy or jax) along `axis` from natural order to the zigzag layout of n shards.

    Equals taking `zigzag_permutation(T, n)` along `axis`, done with reshapes and a flip rather than a gather.
    """
    T, xp = x.shape[axis], (np if isinstance(x, np.ndarray) else jnp)
    c = len(zigzag_permutation(T, n)) // (2 * n)
    halves = xp.reshape(x, x.shape[:axis] + (2, n, c) + x.shape[axis + 1 :])  # natural chunk a * n + b
    first, second = xp.take(halves, 0, axis=axis), xp.flip(xp.take(halves, 1, axis=axis), axis=axis)
    return xp.reshape(xp.stack([first, second], axis=axis + 1), x.shape)


def from_zigzag(x, n: int, axis: int = 1):
    """Inverse of `to_zigzag`: reorder `x` along `axis` from the zigzag layout of n shards back to natural order."""
    T, xp = x.shape[axis], (np if isinstance(x, np.ndarray) else jnp)
    c = len(zigzag_permutation(T, n)) // (2 * n)
    pairs = xp.reshape(x, x.shape[:axis] + (n, 2, c) + x.shape[axis + 1 :])  # shard i holds chunks i, 2n - 1 - i
    first, second = xp.take(pairs, 0, axis=axis + 1), xp.flip(xp.take(pairs, 1, axis=axis + 1), axis=axis)
    return xp.reshape(xp.concatenate([first, second], axis=axis), x.shape)


def _pieces(layout: str, n: int, L: int):
    """Number of contiguous pieces per shard and their length c."""
    return (1, L) if layout == "natural" else (2, L // 2)


def uses_halo(window: int | None, T: int, n: int, layout: str) -> bool:
    """Whether a layer with this window exchanges halos (True) or all-gathers K and V (False)."""
    _, c = _pieces(layout, n, T // n)
    return window is not None and window - 1 <= c


def communicated_bytes(
    B: int, T: int, K: int, H: int, n: int, window: int | None, layout: str, itemsize: int = 2, segments: bool = True
) -> int:
    """Bytes one shard receives for one attention forward (K, V of `itemsize` bytes, int32 segment ids).

    Global layers (and the fallback) receive the other shards' (n - 1) L positions; halo layers h = W - 1 per piece.
    """
    per_position = B * (2 * K * H * itemsize + (4 if segments else 0))
    if not uses_halo(window, T, n, layout):
        return (n - 1) * (T // n) * per_position
    pieces, _ = _pieces(layout, n, T // n)
    return pieces * (window - 1) * per_position


def context_parallel_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    window: int | None = None,
    segment_ids_BT=None,
    layout: str = "natural",
    block_q: int = 512,
    block_k: int = 512,
    axis_name: str = SEQUENCE_AXIS,
):
    """Causal GQA self-attention [B, T, N, H] x [B, T, K, H] -> [B, T, N, H] with T sharded over `axis_name`.

    Call under a mesh (`jax.set_mesh`) whose `axis_name` axis has size n > 1. Inputs are in `layout` order
    ("natural", or "zigzag" as made by `to_zigzag`); so is the output. window and segment_ids_BT as in
    `cwm_jax.attention.attention`.
    T must be a multiple of n (natural) or 2n (zigzag).
    """
    n = sequence_axis_size(axis_name)
    if n == 1:
        raise ValueError(f"context_parallel_attention needs a mesh with a {axis_name!r} axis of size > 1")
    check_layout(layout, n)
    if window is not None and (isinstance(window, bool) or operator.index(window) < 1):
        raise ValueError(f"window must be >= 1 or None, got {window}")
    T = q_BTNH.shape[1]
    if k_BTKH.shape[1] != T or (segment_ids_BT is not None and segment_ids_BT.shape != q_BTNH.shape[:2]):
        raise ValueError(f"want q, k, v and segment ids of one length T={T}; got k {k_BTKH.shape}")
    if T % (n if layout == "natural" else 2 * n):
        raise ValueError(f"T={T} must be a multiple of {n if layout == 'natural' else 2 * n} for layout {layout!r}")
    body = functools.partial(
        _shard_attention,
        n=n,
        window=window,
        layout=layout,
        block_q=block_q,
        block_k=block_k,
        axis_name=axis_name,
    )
    spec = P(None, axis_name)
    args = (q_BTNH, k_BTKH, v_BTKH) if segment_ids_BT is None else (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    # check_vma=False: the kernel's loop carries start as unvarying zeros and become varying over the axis; every
    # input and the output are sharded along it, so no replication typing is needed (gradients are tested).
    return jax.shard_map(
        body, in_specs=(spec,) * len(args), out_specs=spec, axis_names=frozenset({axis_name}), check_vma=False
    )(*args)


def _shard_attention(q_BLNH, k_BLKH, v_BLKH, seg_BL=None, *, n, window, layout, block_q, block_k, axis_name):
    """One shard's attention: its L queries against the keys they may see (gathered, or halo + own)."""
    L = q_BLNH.shape[1]
    idx = lax.axis_index(axis_name)
    num_pieces, c = _pieces(layout, n, L)
    # Original index of each piece's first token; known only at run time, as a function of the shard index.
    starts = [idx * L] if layout == "natural" else [idx * c, (2 * n - 1 - idx) * c]
    arange_c = jnp.arange(c, dtype=jnp.int32)
    run = functools.partial(attn_lib.attention_at, window=window, block_q=block_q, block_k=block_k)

    if not uses_halo(window, n * L, n, layout):
        gather = functools.partial(lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
        kv = [gather(x) for x in (k_BLKH, v_BLKH, seg_BL) if x is not None]
        if layout == "zigzag":
            # The kernel wants keys sorted by index: put the gathered zigzag chunks back in natural order.
            kv = [from_zigzag(x, n) for x in kv]
        k_all, v_all, seg_all = (*kv, None)[:3]
        # The local queries are sorted too (zigzag: chunk i before chunk 2n - 1 - i), so one call serves both pieces;
        # a query block visits KV blocks up to its own end only (traced loop bounds inside the kernel's custom VJP, as
        # lax.cond-skipped blocks would still pay the loop over all T / C blocks and their masks).
        q_pos_L = jnp.concatenate([s + arange_c for s in starts])
        k_pos_T = jnp.arange(n * L, dtype=jnp.int32)
        return run(q_BLNH, k_all, v_all, q_pos_L, k_pos_T, q_segment_ids_BT=seg_BL, k_segment_ids_BS=seg_all)

    h = window - 1
    xs = [x for x in (k_BLKH, v_BLKH, seg_BL) if x is not None]
    outs = []
    for p in range(num_pieces):
        piece = [x[:, p * c : (p + 1) * c] for x in xs]
        if h:
            tails = [x[:, (p + 1) * c - h : (p + 1) * c] for x in xs]
            if p == 0:
                # Natural, and zigzag chunk i: the halo is the tail of the previous shard's first piece. Shard 0
                # receives zeros at negative indices, which the kernel never shows.
                halo = lax.ppermute(tails, axis_name, [(j, j + 1) for j in range(n - 1)])
            else:
                # Zigzag chunk 2n - 1 - i follows chunk 2n - 2 - i, the second piece of shard i + 1; for the last
                # shard it is chunk n - 1, its own first piece.
                recv = lax.ppermute(tails, axis_name, [(j, j - 1) for j in range(1, n)])
                own = [x[:, c - h : c] for x in xs]
                halo = [jnp.where(idx == n - 1, a, b) for a, b in zip(own, recv, strict=True)]
            piece = [jnp.concatenate([a, b], axis=1) for a, b in zip(halo, piece, strict=True)]
        k_S, v_S, seg_S = (*piece, None)[:3]
        q_BcNH = q_BLNH[:, p * c : (p + 1) * c]
        seg_q = None if seg_BL is None else seg_BL[:, p * c : (p + 1) * c]
        k_pos_S = starts[p] - h + jnp.arange(h + c, dtype=jnp.int32)
        outs.append(
            run(q_BcNH, k_S, v_S, starts[p] + arange_c, k_pos_S, q_segment_ids_BT=seg_q, k_segment_ids_BS=seg_S)
        )
    return outs[0] if num_pieces == 1 else jnp.concatenate(outs, axis=1)
