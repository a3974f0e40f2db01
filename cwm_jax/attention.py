"""Self-attention for CWM: one entry point, a dense test oracle and a blocked pure-JAX reference.

Shape legend:
  B batch, T query positions, S key positions (self-attention: S == T), N query heads, K KV heads, G = N // K query
  heads per KV head, H head dim, W sliding window. The blocked code adds Q (query block), C (KV block) and n (block
  index, leading axis of per-block stacks).

Visibility: query i sees key j iff j <= i, and i - W < j when a window W is given (W keys, itself included), and
seg[i] == seg[j] when segment ids are given. Every query sees at least itself. Query head h reads KV head h // G
(transformers repeat_kv), done by reshaping q to [B, T, K, G, H], never by repeating K/V.

Numerics: scale H ** -0.5 inside; scores, softmax statistics and accumulation in float32; probabilities are cast to
v's dtype for the PV matmul (flash-attention practice); output in q's dtype.

The blocked reference (impl="xla") is FlashAttention-2 in plain JAX with a custom VJP: it never builds T x T scores or
masks, saves only the output and the per-row logsumexp, and visits only the (query block, KV block) pairs that can hold
a visible pair, so a local layer costs O(T * W) time and O(T) memory, forward and backward. Its core works on queries
and keys at given sequence indices (`attention_at`), so a shard of a context-parallel run (`cwm_jax.context_parallel`)
can attend its own queries to gathered keys or to a halo of keys from its neighbours; masking always uses the indices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cwm_jax.kernels import schedule

IMPLS = ("xla", "dense", "pallas", "splash")
# A window longer than any sequence: a causal global layer, as a window value (int32, with room for index sums).
GLOBAL_WINDOW = 2**30
KERNEL_IMPLS = ("pallas", "splash")


def _visible(q_pos_T, k_pos_S, window, seg_q_BT, seg_k_BS):
    """Boolean visibility [B or 1, T, S] for query and key positions (absolute indices in the sequence)."""
    vis_TS = k_pos_S[None, :] <= q_pos_T[:, None]
    if window is not None:
        vis_TS = vis_TS & (q_pos_T[:, None] - k_pos_S[None, :] < window)
    vis_BTS = vis_TS[None]
    if seg_q_BT is not None:
        vis_BTS = vis_BTS & (seg_q_BT[:, :, None] == seg_k_BS[:, None, :])
    return vis_BTS


def attention_dense(q_BTNH, k_BTKH, v_BTKH, *, window=None, segment_ids_BT=None):
    """Dense causal (optionally sliding-window, optionally packed) GQA self-attention; the test oracle.

    Builds the full [B, K, G, T, T] float32 scores, so memory is O(T^2): use it for checks, not long sequences.
    """
    window = schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT)
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH, preferred_element_type=jnp.float32) * H**-0.5
    pos_T = jnp.arange(T, dtype=jnp.int32)
    vis_BTS = _visible(pos_T, pos_T, window, segment_ids_BT, segment_ids_BT)
    # Every row sees its own key, so no row is all -inf and softmax stays finite.
    p_BKGTS = jax.nn.softmax(jnp.where(vis_BTS[:, None, None], s_BKGTS, -jnp.inf), axis=-1)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BTKH.dtype), v_BTKH, preferred_element_type=jnp.float32)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


# Index given to key slots past the end of an input (padding): after every query, so causality alone hides them.
_PAD_INDEX = 2**30


def _kv_range(q_first, q_last, k_first_n, k_last_n, window):
    """Inclusive range [lo, hi] of the KV blocks holding a key that a query at index q_first..q_last may see.

    k_first_n, k_last_n: the first and last key index of each block, nondecreasing (keys sorted by index). Counting
    comparisons works for numpy and traced values alike.
    """
    hi = (k_first_n <= q_last).sum() - 1
    lo = 0 if window is None else (k_last_n <= q_first - window).sum()
    return lo, hi


def _q_range(k_first, k_last, q_first_n, q_last_n, window):
    """Inclusive range [lo, hi] of the query blocks holding a query that may see a key at index k_first..k_last."""
    lo = (q_last_n < k_first).sum()
    hi = len(q_first_n) - 1 if window is None else (q_first_n <= k_last + window - 1).sum() - 1
    return lo, hi


def _kv_block_range(qi, Q, C, window, num_k_blocks):
    """Inclusive KV block range [lo, hi] of query block qi for self-attention at indices 0..T-1."""
    k_first_n = np.arange(num_k_blocks) * C
    return _kv_range(qi * Q, qi * Q + Q - 1, k_first_n, k_first_n + C - 1, window)


def _q_block_range(kj, Q, C, window, num_q_blocks):
    """Inclusive query block range [lo, hi] of KV block kj for self-attention at indices 0..T-1."""
    q_first_n = np.arange(num_q_blocks) * Q
    return _q_range(kj * C, kj * C + C - 1, q_first_n, q_first_n + Q - 1, window)


def visited_block_pairs(seq_len: int, window: int | None, block_q: int, block_k: int) -> int:
    """Number of (query block, KV block) pairs the blocked forward visits for this length, window and block sizes."""
    Q, C, T_pad = schedule.plan(seq_len, block_q, block_k)
    total = 0
    for qi in range(T_pad // Q):
        lo, hi = _kv_block_range(qi, Q, C, window, T_pad // C)
        total += max(int(hi) - int(lo) + 1, 0)
    return total


def _slice(x, start, size):
    """x[:, start:start + size] (dynamic start), or None for None."""
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _block_scores(q_BKGQH, k_BKCH, q_pos_Q, k_pos_C, seg_q_BQ, seg_k_BC, window):
    """Scaled float32 scores [B, K, G, Q, C] of one block pair, invisible entries set to -inf.

    Keys at negative indices (a halo from before the sequence start) are never visible.
    """
    s_BKGQC = jnp.einsum("bkgqh,bkch->bkgqc", q_BKGQH, k_BKCH, preferred_element_type=jnp.float32)
    s_BKGQC = s_BKGQC * q_BKGQH.shape[-1] ** -0.5
    vis_BQC = _visible(q_pos_Q, k_pos_C, window, seg_q_BQ, seg_k_BC) & (k_pos_C >= 0)
    return jnp.where(vis_BQC[:, None, None], s_BKGQC, -jnp.inf)


def _q_heads_major(x_BTNH, K: int):
    """[B, T, N, H] -> [B, K, G, T, H]: the layout of the block matmuls, made once per call rather than per block
    pair (XLA's CPU backend transposed every query block again for every key block it visited)."""
    B, T, N, H = x_BTNH.shape
    return jnp.transpose(x_BTNH.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4))


def _kv_heads_major(x_BSKH):
    """[B, S, K, H] -> [B, K, S, H] (as `_q_heads_major`)."""
    return jnp.transpose(x_BSKH, (0, 2, 1, 3))


def _tokens_major(x_nBKGQH):
    """Per-block results [n, B, K, G, Q, H] -> [B, n * Q, K * G, H]."""
    n, B, K, G, Q, H = x_nBKGQH.shape
    return jnp.transpose(x_nBKGQH, (1, 0, 4, 2, 3, 5)).reshape(B, n * Q, K * G, H)


def _block_bounds(pos_T, size):
    """First and last index of each block of `size` consecutive entries of the sorted indices pos_T."""
    return pos_T[::size], pos_T[size - 1 :: size]


def _blocked_forward(q_BKGTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, Q, C):
    """Online-softmax forward over padded heads-major inputs; returns o [B, T, N, H] and logsumexp stacked as
    [n, B, K, G, Q]."""
    B, K, G, T, H = q_BKGTH.shape
    q_first_n, q_last_n = _block_bounds(q_pos_T, Q)
    k_first_n, k_last_n = _block_bounds(k_pos_S, C)

    def q_block(qi):
        q_BKGQH = lax.dynamic_slice_in_dim(q_BKGTH, qi * Q, Q, axis=3)
        q_pos_Q = lax.dynamic_slice_in_dim(q_pos_T, qi * Q, Q)
        seg_q_BQ = _slice(seg_q_BT, qi * Q, Q)

        def kv_step(kj, carry):
            m_BKGQ, l_BKGQ, acc_BKGQH = carry
            k_BKCH = lax.dynamic_slice_in_dim(k_BKSH, kj * C, C, axis=2)
            v_BKCH = lax.dynamic_slice_in_dim(v_BKSH, kj * C, C, axis=2)
            k_pos_C = lax.dynamic_slice_in_dim(k_pos_S, kj * C, C)
            s_BKGQC = _block_scores(q_BKGQH, k_BKCH, q_pos_Q, k_pos_C, seg_q_BQ, _slice(seg_k_BS, kj * C, C), window)
            m_new_BKGQ = jnp.maximum(m_BKGQ, s_BKGQC.max(axis=-1))
            # A row with nothing visible yet has max -inf; subtracting 0 instead keeps exp(-inf - 0) = 0, not NaN.
            m_safe_BKGQ = jnp.where(m_new_BKGQ == -jnp.inf, 0.0, m_new_BKGQ)
            p_BKGQC = jnp.exp(s_BKGQC - m_safe_BKGQ[..., None])
            alpha_BKGQ = jnp.exp(m_BKGQ - m_safe_BKGQ)
            l_BKGQ = alpha_BKGQ * l_BKGQ + p_BKGQC.sum(axis=-1)
            pv_BKGQH = jnp.einsum(
                "bkgqc,bkch->bkgqh", p_BKGQC.astype(v_BKCH.dtype), v_BKCH, preferred_element_type=jnp.float32
            )
            return m_new_BKGQ, l_BKGQ, alpha_BKGQ[..., None] * acc_BKGQH + pv_BKGQH

        init = (
            jnp.full((B, K, G, Q), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, Q), jnp.float32),
            jnp.zeros((B, K, G, Q, H), jnp.float32),
        )
        # Traced loop bounds: the indices may be known only at run time (a shard's offset in context parallelism).
        lo, hi = _kv_range(q_first_n[qi], q_last_n[qi], k_first_n, k_last_n, window)
        m_BKGQ, l_BKGQ, acc_BKGQH = lax.fori_loop(lo, hi + 1, kv_step, init)
        # Rows never fully masked here (each sees itself), but guard l == 0 so a bad row gives 0, not NaN.
        l_safe_BKGQ = jnp.where(l_BKGQ == 0.0, 1.0, l_BKGQ)
        m_safe_BKGQ = jnp.where(m_BKGQ == -jnp.inf, 0.0, m_BKGQ)
        return (acc_BKGQH / l_safe_BKGQ[..., None]).astype(q_BKGTH.dtype), m_safe_BKGQ + jnp.log(l_safe_BKGQ)

    o_nBKGQH, lse_nBKGQ = lax.map(q_block, jnp.arange(T // Q, dtype=jnp.int32))
    return _tokens_major(o_nBKGQH), lse_nBKGQ


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _attention_core(q_BTNH, k_BSKH, v_BSKH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, Q, C):
    """Blocked attention on padded inputs (T % Q == S % C == 0) with query and key indices sorted ascending."""
    return _attention_core_fwd(q_BTNH, k_BSKH, v_BSKH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, Q, C)[0]


def _attention_core_fwd(q_BTNH, k_BSKH, v_BSKH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, Q, C):
    q_BKGTH, k_BKSH, v_BKSH = _q_heads_major(q_BTNH, k_BSKH.shape[2]), _kv_heads_major(k_BSKH), _kv_heads_major(v_BSKH)
    o_BTNH, lse_nBKGQ = _blocked_forward(q_BKGTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, Q, C)
    # O(T) residuals: the heads-major inputs (the backward's layout too), output and per-row logsumexp; probabilities
    # are recomputed per block in the backward.
    return o_BTNH, (q_BKGTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, o_BTNH, lse_nBKGQ)


def _attention_core_bwd(Q, C, res, do_BTNH):
    q_BKGTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, seg_q_BT, seg_k_BS, window, o_BTNH, lse_nBKGQ = res
    B, K, G, T, H = q_BKGTH.shape
    S = k_BKSH.shape[2]
    nq, nk = T // Q, S // C
    scale = H**-0.5
    do_BKGTH = _q_heads_major(do_BTNH, K)
    q_first_n, q_last_n = _block_bounds(q_pos_T, Q)
    k_first_n, k_last_n = _block_bounds(k_pos_S, C)
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax-Jacobian correction term.
    d_BTKG = jnp.sum(
        do_BTNH.reshape(B, T, K, G, H).astype(jnp.float32) * o_BTNH.reshape(B, T, K, G, H).astype(jnp.float32), axis=-1
    )
    d_nBKGQ = jnp.transpose(d_BTKG.reshape(B, nq, Q, K, G), (1, 0, 3, 4, 2))

    def probs_and_ds(qi, kj, q_BKGQH, do_BKGQH, k_BKCH, v_BKCH):
        """Recomputed probabilities P and score gradient dS = P * (dP - D) of one block pair, both [B, K, G, Q, C]."""
        q_pos_Q = lax.dynamic_slice_in_dim(q_pos_T, qi * Q, Q)
        k_pos_C = lax.dynamic_slice_in_dim(k_pos_S, kj * C, C)
        seg_q_BQ, seg_k_BC = _slice(seg_q_BT, qi * Q, Q), _slice(seg_k_BS, kj * C, C)
        s_BKGQC = _block_scores(q_BKGQH, k_BKCH, q_pos_Q, k_pos_C, seg_q_BQ, seg_k_BC, window)
        lse_BKGQ = lax.dynamic_index_in_dim(lse_nBKGQ, qi, keepdims=False)
        d_BKGQ = lax.dynamic_index_in_dim(d_nBKGQ, qi, keepdims=False)
        p_BKGQC = jnp.exp(s_BKGQC - lse_BKGQ[..., None])
        dp_BKGQC = jnp.einsum("bkgqh,bkch->bkgqc", do_BKGQH, v_BKCH, preferred_element_type=jnp.float32)
        return p_BKGQC, p_BKGQC * (dp_BKGQC - d_BKGQ[..., None])

    def dkv_block(dq_nBKGQH, kj):
        """dK and dV of key block kj over the query blocks that see it; adds each pair's dQ into the running dQ."""
        k_BKCH = lax.dynamic_slice_in_dim(k_BKSH, kj * C, C, axis=2)
        v_BKCH = lax.dynamic_slice_in_dim(v_BKSH, kj * C, C, axis=2)

        def q_step(qi, carry):
            dk_BKCH, dv_BKCH, dq_nBKGQH = carry
            q_BKGQH = lax.dynamic_slice_in_dim(q_BKGTH, qi * Q, Q, axis=3)
            do_BKGQH = lax.dynamic_slice_in_dim(do_BKGTH, qi * Q, Q, axis=3)
            p_BKGQC, ds_BKGQC = probs_and_ds(qi, kj, q_BKGQH, do_BKGQH, k_BKCH, v_BKCH)
            # Summing over g and q folds the G query heads that share a KV head back onto it.
            dv_BKCH = dv_BKCH + jnp.einsum(
                "bkgqc,bkgqh->bkch", p_BKGQC.astype(do_BKGQH.dtype), do_BKGQH, preferred_element_type=jnp.float32
            )
            dk_BKCH = dk_BKCH + jnp.einsum(
                "bkgqc,bkgqh->bkch", ds_BKGQC.astype(q_BKGQH.dtype), q_BKGQH, preferred_element_type=jnp.float32
            )
            dq_BKGQH = jnp.einsum(
                "bkgqc,bkch->bkgqh", ds_BKGQC.astype(k_BKCH.dtype), k_BKCH, preferred_element_type=jnp.float32
            )
            # One pass over the visited pairs (FlashAttention-2's backward): P and dS are computed once per pair.
            dq_nBKGQH = dq_nBKGQH.at[qi].add(dq_BKGQH)
            return dk_BKCH, dv_BKCH, dq_nBKGQH

        zeros_BKCH = jnp.zeros((B, K, C, H), jnp.float32)
        lo, hi = _q_range(k_first_n[kj], k_last_n[kj], q_first_n, q_last_n, window)
        dk_BKCH, dv_BKCH, dq_nBKGQH = lax.fori_loop(lo, hi + 1, q_step, (zeros_BKCH, zeros_BKCH, dq_nBKGQH))
        return dq_nBKGQH, ((dk_BKCH * scale).astype(k_BKSH.dtype), dv_BKCH.astype(v_BKSH.dtype))

    dq_nBKGQH = jnp.zeros((nq, B, K, G, Q, H), jnp.float32)
    dq_nBKGQH, (dk_nBKCH, dv_nBKCH) = lax.scan(dkv_block, dq_nBKGQH, jnp.arange(nk, dtype=jnp.int32))
    dq_BTNH = _tokens_major((dq_nBKGQH * scale).astype(q_BKGTH.dtype))
    # [n, B, K, C, H] as [n, B, K, 1, C, H] (one query head per KV head) -> [B, S, K, H]
    dk_BSKH, dv_BSKH = _tokens_major(dk_nBKCH[:, :, :, None]), _tokens_major(dv_nBKCH[:, :, :, None])
    # Indices, segment ids and the window are integers: no cotangent.
    return dq_BTNH, dk_BSKH, dv_BSKH, None, None, None, None, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _attention_blocked(q_BTNH, k_BTKH, v_BTKH, seg_BT, window, Q, C):
    """Blocked self-attention at indices 0..T-1 on inputs already padded to a multiple of Q and C."""
    pos_T = jnp.arange(q_BTNH.shape[1], dtype=jnp.int32)
    return _attention_core(q_BTNH, k_BTKH, v_BTKH, pos_T, pos_T, seg_BT, seg_BT, window, Q, C)


def attention_at(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    q_pos_T,
    k_pos_S,
    *,
    window: int | None = None,
    q_segment_ids_BT=None,
    k_segment_ids_BS=None,
    block_q: int = 512,
    block_k: int = 512,
):
    """Blocked GQA attention of queries at sequence indices q_pos_T to keys at indices k_pos_S -> [B, T, N, H].

    q_BTNH [B, T, N, H], k_BSKH and v_BSKH [B, S, K, H]; q_pos_T int [T] and k_pos_S int [S], each sorted ascending
    (they may be traced). Query i sees key j by the visibility rule of this module applied to their indices, and never
    a key at a negative index (halo slots before the sequence start). Every query must see at least one key.
    q_segment_ids_BT [B, T] and k_segment_ids_BS [B, S]: both or neither. Block sizes are clamped to T and S.
    """
    window = schedule.check_window(window)
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[::3] != (B, H) or N % k_BSKH.shape[2]:
        raise ValueError(f"want q [B, T, N, H] and k, v [B, S, K, H] with K | N; got {q_BTNH.shape}, {k_BSKH.shape}")
    if q_pos_T.shape != (T,) or k_pos_S.shape != (S,):
        raise ValueError(f"want q_pos_T [{T}] and k_pos_S [{S}]; got {q_pos_T.shape} and {k_pos_S.shape}")
    if (q_segment_ids_BT is None) != (k_segment_ids_BS is None):
        raise ValueError("give both q_segment_ids_BT and k_segment_ids_BS, or neither")
    if q_segment_ids_BT is not None and (q_segment_ids_BT.shape != (B, T) or k_segment_ids_BS.shape != (B, S)):
        raise ValueError(
            f"segment ids must be [B, T] and [B, S]; got {q_segment_ids_BT.shape}, {k_segment_ids_BS.shape}"
        )
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    Q, C = min(block_q, T), min(block_k, S)
    pad_q, pad_k = schedule.round_up(T, Q) - T, schedule.round_up(S, C) - S
    q_pos_T, k_pos_S = jnp.asarray(q_pos_T, jnp.int32), jnp.asarray(k_pos_S, jnp.int32)
    # Padded queries repeat the last index (keeps the order; their rows are sliced off); padded keys sit at an index
    # after every query, so causality hides them.
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    q_pos_T = jnp.pad(q_pos_T, (0, pad_q), mode="edge")
    k_BSKH, v_BSKH = (jnp.pad(x, ((0, 0), (0, pad_k), (0, 0), (0, 0))) for x in (k_BSKH, v_BSKH))
    k_pos_S = jnp.pad(k_pos_S, (0, pad_k), constant_values=_PAD_INDEX)
    if q_segment_ids_BT is not None:
        q_segment_ids_BT = jnp.pad(q_segment_ids_BT, ((0, 0), (0, pad_q)), mode="edge")
        k_segment_ids_BS = jnp.pad(k_segment_ids_BS, ((0, 0), (0, pad_k)), mode="edge")
    o_BTNH = _attention_core(q_BTNH, k_BSKH, v_BSKH, q_pos_T, k_pos_S, q_segment_ids_BT, k_segment_ids_BS, window, Q, C)
    return o_BTNH[:, :T]


def attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    window: int | None = None,
    segment_ids_BT=None,
    impl: str = "xla",
    block_q: int = 512,
    block_k: int = 512,
):
    """Causal GQA self-attention [B, T, N, H] x [B, T, K, H] -> [B, T, N, H]; the single entry point for the model.

    window: W keys per query (itself included) for a sliding-window local layer; None for a causal global layer.
      With impl "xla" also an integer scalar array, possibly traced (>= 1; `GLOBAL_WINDOW` for a global layer): the
      model's scanned layers pick each layer's window at run time, one code path instead of a `lax.cond` of two.
    segment_ids_BT: int32 [B, T] document ids for packed sequences; queries only see keys of their own document.
    impl: "xla" (blocked FlashAttention-2 reference with O(T) memory), "dense" (attention_dense, O(T^2)), "pallas"
      (this project's Pallas kernel: Mosaic on TPU, Triton on GPU, the TPU kernel in interpret mode on CPU) or
      "splash" (JAX's splash attention; TPU, or interpret mode on CPU). Under a mesh the kernels run per shard.
    block_q, block_k: block sizes of the "xla" implementation, clamped for short sequences. The kernels use their own
      per-backend defaults (`kernel_attention` takes block sizes).
    """
    if impl == "dense":
        return attention_dense(q_BTNH, k_BTKH, v_BTKH, window=window, segment_ids_BT=segment_ids_BT)
    if impl in KERNEL_IMPLS:
        window = schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT)
        return kernel_attention(q_BTNH, k_BTKH, v_BTKH, window=window, segment_ids_BT=segment_ids_BT, impl=impl)
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}; valid values are {', '.join(map(repr, IMPLS))}")
    if isinstance(window, jax.Array):
        if window.shape != () or not jnp.issubdtype(window.dtype, jnp.integer):
            raise ValueError(f"a window given as an array must be an integer scalar, got {window.dtype}{window.shape}")
        schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, None, segment_ids_BT)
    else:
        window = schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT)
    T = q_BTNH.shape[1]
    Q, C, T_pad = schedule.plan(T, block_q, block_k)
    pad = T_pad - T
    if pad:
        # Padded keys sit after every real query, so causality alone hides them; padded query rows are sliced off.
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BTKH, v_BTKH))
        if segment_ids_BT is not None:
            segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), mode="edge")
    return _attention_blocked(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, window, Q, C)[:, :T]


def kernel_function(impl: str, backend: str | None = None, **kwargs):
    """The kernel behind impl "pallas" or "splash" for `backend` (default: JAX's), as f(q, k, v, segment_ids_BT=...,
    window=...) with `kwargs` (block sizes) bound.

    "pallas": the Mosaic kernel on TPU, the Triton kernel on GPU, the TPU kernel in interpret mode elsewhere (so CPU
    tests run the code a TPU compiles). "splash": JAX's splash kernel on TPU, interpret mode on CPU; no GPU version.
    """
    backend = backend or jax.default_backend()
    if impl == "splash":
        if backend == "gpu":
            raise ValueError('attention_impl="splash" is TPU-only (JAX\'s splash kernel); use "pallas" on GPU')
        from cwm_jax.kernels import splash

        return functools.partial(splash.splash_attention, interpret=backend != "tpu", **kwargs)
    if impl != "pallas":
        raise ValueError(f"unknown kernel impl {impl!r}; valid values are {', '.join(map(repr, KERNEL_IMPLS))}")
    if backend == "gpu":
        from cwm_jax.kernels import flash_gpu

        return functools.partial(flash_gpu.flash_attention, **kwargs)
    from cwm_jax.kernels import flash_tpu

    # interpret=True is Pallas' plain discharge interpreter: pure JAX, so it also runs per shard under shard_map on
    # host devices (the TPU interpreter, pltpu.InterpretParams, simulates devices with callbacks; tests use it alone).
    return functools.partial(flash_tpu.flash_attention, interpret=backend != "tpu", **kwargs)


def kernel_mesh_axes(kv_shape_BSKH):
    """(manual axes, batch axes, head axes) for running a kernel per shard under the current mesh, or None without an
    Auto mesh axis. Batch goes over the data axes and heads over the tensor axis, as the sharding rules lay
    activations out (an axis that does not divide a dimension is dropped); q follows the KV heads' split, so each
    shard holds whole GQA groups."""
    from cwm_jax import sharding

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    auto = [a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == jax.sharding.AxisType.Auto]
    if not auto:
        return None
    spec = sharding.logical_to_spec(("act_batch", None, "act_kv_heads", None), kv_shape_BSKH, mesh)
    return frozenset(auto), spec[0], spec[2]


def kernel_attention(q_BTNH, k_BTKH, v_BTKH, *, window=None, segment_ids_BT=None, impl="pallas", **kwargs):
    """Attention through a Pallas kernel (`kernel_function`), per shard under a mesh.

    Pallas kernels see one device's arrays, so under a mesh (`jax.set_mesh`) they run inside `jax.shard_map` over
    `kernel_mesh_axes`. The sequence stays whole: a sharded sequence goes through `cwm_jax.context_parallel`.
    """
    run = kernel_function(impl, **kwargs)
    args = (q_BTNH, k_BTKH, v_BTKH) + (() if segment_ids_BT is None else (segment_ids_BT,))

    def body(q, k, v, seg=None):
        return run(q, k, v, window=window, segment_ids_BT=seg)

    axes = kernel_mesh_axes(k_BTKH.shape)
    if axes is None:
        return body(*args)
    manual, batch_axes, head_axes = axes
    spec = jax.sharding.PartitionSpec(batch_axes, None, head_axes, None)
    in_specs = (spec, spec, spec) + (() if segment_ids_BT is None else (jax.sharding.PartitionSpec(batch_axes, None),))
    # check_vma=False: pallas_call outputs carry no varying-axis types; every operand is mapped by the specs above.
    return jax.shard_map(body, in_specs=in_specs, out_specs=spec, axis_names=manual, check_vma=False)(*args)
