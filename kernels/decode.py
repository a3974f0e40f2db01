"""Decode attention on TPU (Pallas / Mosaic): T new queries per sequence against a KV cache, masked by position.

    o_BTNH = decode_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT)                        # global cache, slot = position
    o_BTNH = decode_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window=W)    # ring + chunk, by position

Shapes: B batch, T new query tokens per sequence (1 to decode, up to a prefill chunk), S key slots, N query heads,
K KV heads, G = N // K query heads per KV head, H head dim, W window, L layers of a stacked cache. Inside: C the KV
block (block_k clamped to S), R query rows per KV head of one program (G * T folded, split into row blocks so that
a step's [K, R, C] scores stay within SCORE_ELEMENTS), J the KV blocks a program visits.

Visibility: query t (position q_pos[b, t], -1 = padding) sees key slot s (position k_pos[b, s], -1 = empty; s itself
without k_pos) iff 0 <= k_pos <= q_pos and, with a window, k_pos > q_pos - W. Positions decide, not slots, so a ring
buffer that wrapped around keeps the window and RoPE exact. A row that sees nothing (padding) gives zeros.

Kernel: grid (B, row blocks, J), the last axis "arbitrary". One program holds one sequence's query rows for every
KV head: per KV head its G query heads and T tokens are folded into one [R, H] matmul operand (row = t * G + g, so a
row block covers consecutive positions), and the K heads are a batch dimension of the two matmuls, so each KV block
is read from HBM once for all heads and K / V are never repeated. Online softmax over the KV blocks with float32
m / l / acc in VMEM scratch. Which KV blocks a program visits is planned outside the kernel from the positions and
scalar-prefetched: with k_pos None the blocks from the window start of the first query to the block of the last
(`schedule.kv_block_range`), with k_pos the blocks holding some key in the rows' window. J is a dynamic grid bound,
the most blocks any program needs; a program that needs fewer repeats its last block index, which Pallas does not
DMA again, and skips the compute (`pl.when`). So a 131072-slot cache holding 1000 tokens reads ceil(1000 / C) blocks.

Layout: K and V are read in the cache's own [B, S, K, H] layout, blocks of (C, K, H), swapped to [K, C, H] in VMEM.
On TPU the cache is tiled over its last two dims (K, H), so a (C, H) block of one head is not a legal block and a
[B, S, K * H] view is a relayout (a copy of the cache, which the compiled HLO shows); one program per KV head would
also need the transposed [B, K, S, H] copy every step. A stack of per-layer caches [L, B, S, K, H] may be passed with
`layer`: the index map picks the layer, so a scanned model never slices (and thereby copies) the stack. S not a
multiple of C: the last block is partial, read past the end of the array (unspecified values, as Pallas defines a
partial block) and masked in the kernel by slot < S, so the cache is never padded (a pad would copy it whole every
step). K and V are cast to q's dtype in VMEM, so a cache in another dtype is never converted in HBM.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cwm_jax.kernels import schedule

MASK_VALUE = schedule.MASK_VALUE  # finite, not -inf: see schedule.MASK_VALUE
# Scores of one step are [K, R, C] float32: at most 2 MiB, so a 512-token prefill chunk (G * T = 3072 rows per KV
# head) runs in row blocks that fit the default scoped VMEM of every generation beside double-buffered K / V blocks.
SCORE_ELEMENTS = 1 << 19


def decode_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    q_pos_BT,
    k_pos_BS=None,
    *,
    window: int | None = None,
    block_k: int = 512,
    layer=None,
    interpret=False,
):
    """Attention of T new queries per sequence over a KV cache; returns [B, T, N, H] in q's dtype.

    q_BTNH: [B, T, N, H] queries (RoPE applied). k_BSKH, v_BSKH: [B, S, K, H] keys and values, or a stack of layer
    caches [L, B, S, K, H] with `layer` (int scalar, may be traced) naming the one to read. q_pos_BT: int32 [B, T]
    query positions, -1 = padding (a zero row). k_pos_BS: None for a cache whose slot s holds position s (the global
    cache: only the blocks up to each sequence's last query are read), or int32 [B, S] key positions, -1 = empty (a
    ring buffer followed by the chunk's own keys). window: sliding window W or None. block_k: keys per block, clamped
    to S. interpret: False to compile with Mosaic (TPU), True or a `pltpu.InterpretParams` to run on the CPU.
    """
    window = None if window is None else operator.index(window)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if layer is None:
        if k_BSKH.ndim != 4:
            raise ValueError(f"k/v must be [B, S, K, H] (or a stack [L, B, S, K, H] with layer=), got {k_BSKH.shape}")
        k_LBSKH, v_LBSKH, layer = k_BSKH[None], v_BSKH[None], 0
    else:
        k_LBSKH, v_LBSKH = k_BSKH, v_BSKH
    if q_BTNH.ndim != 4 or k_LBSKH.ndim != 5 or k_LBSKH.shape != v_LBSKH.shape:
        raise ValueError(
            f"want q [B, T, N, H] and k, v [B, S, K, H] or [L, B, S, K, H] with layer=; "
            f"got q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}"
        )
    B, T, N, H = q_BTNH.shape
    _, _, S, K, _ = k_LBSKH.shape
    if k_LBSKH.shape[1] != B or k_LBSKH.shape[4] != H or N % K:
        raise ValueError(f"q {q_BTNH.shape} and k/v {k_BSKH.shape} disagree on B or H, or N is not a multiple of K")
    if q_pos_BT.shape != (B, T):
        raise ValueError(f"q_pos_BT must be [B, T] = {(B, T)}, got {q_pos_BT.shape}")
    if k_pos_BS is not None and k_pos_BS.shape != (B, S):
        raise ValueError(f"k_pos_BS must be [B, S] = {(B, S)}, got {k_pos_BS.shape}")
    G = N // K
    C, nk, rows, R, nr = _geometry(T, G, K, S, block_k)

    # Rows t * G + g of each KV head: [B, T, K, G, H] -> [B, K, T * G, H], padded to whole row blocks (position -1).
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, H)
    q_pos_BR = _rows_positions(q_pos_BT, G, nr * R)
    if nr * R != rows:
        q_BKRH = jnp.pad(q_BKRH, ((0, 0), (0, 0), (0, nr * R - rows), (0, 0)))
    blocks_BrJ, count_Br = _plan(q_pos_BR.reshape(B, nr, R), k_pos_BS, S, C, window)
    num_steps = jnp.maximum(jnp.max(count_Br), 1)  # >= 1: every program writes its output

    def kv_map(b, r, j, layer_ref, blocks_ref, count_ref):
        return layer_ref[0], b, blocks_ref[(b * nr + r) * nk + j], 0, 0

    kv_spec = pl.BlockSpec((None, None, C, K, H), kv_map)
    rows_spec = pl.BlockSpec((None, K, R, H), lambda b, r, j, *_: (b, 0, r, 0))
    in_specs = [rows_spec, pl.BlockSpec((None, R, 1), lambda b, r, j, *_: (b, r, 0)), kv_spec, kv_spec]
    args = [q_BKRH, q_pos_BR[:, :, None], k_LBSKH, v_LBSKH]
    if k_pos_BS is not None:
        # [B, 1, S]: key positions along lanes, like the [R, C] scores; padded with -1 (empty) to whole blocks.
        k_pos_BS = jnp.pad(k_pos_BS.astype(jnp.int32), ((0, 0), (0, nk * C - S)), constant_values=-1)

        def k_pos_map(b, r, j, layer_ref, blocks_ref, count_ref):
            return b, 0, blocks_ref[(b * nr + r) * nk + j]

        in_specs.append(pl.BlockSpec((None, 1, C), k_pos_map))
        args.append(k_pos_BS[:, None, :])

    kv_bytes = 2 * B * S * K * H * jnp.dtype(k_LBSKH.dtype).itemsize
    # An upper bound: the kernel reads only the planned blocks, which are known only at run time.
    cost = pl.CostEstimate(
        flops=4 * B * N * T * S * H,
        transcendentals=B * N * T * S,
        bytes_accessed=kv_bytes + 2 * q_BTNH.size * q_BTNH.dtype.itemsize + B * T * G * 4,
    )
    kernel = functools.partial(
        _kernel, scale=H**-0.5, window=window, S=S, C=C, K=K, nr=nr, nk=nk, has_k_pos=k_pos_BS is not None
    )
    o_BKRH = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, nr, num_steps),
            in_specs=in_specs,
            out_specs=rows_spec,
            scratch_shapes=[
                pltpu.VMEM((K, R, 1), jnp.float32),  # running max m
                pltpu.VMEM((K, R, 1), jnp.float32),  # running sum l
                pltpu.VMEM((K, R, H), jnp.float32),  # unnormalised output
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((B, K, nr * R, H), q_BTNH.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        blocks_BrJ.reshape(-1),
        count_Br.reshape(-1),
        *args,
    )
    return o_BKRH[:, :, :rows].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def kv_blocks_visited(
    q_pos_BT, k_pos_BS=None, *, num_keys: int, num_heads: int, num_kv_heads: int, window=None, block_k: int = 512
):
    """KV blocks `decode_attention` reads per sequence and row block: int32 [B, row blocks], the plan it prefetches.

    Arguments as for decode_attention, with num_keys = S, num_heads = N, num_kv_heads = K (a decode step or a short
    chunk is one row block).
    """
    B, T = q_pos_BT.shape
    C, _, _, R, nr = _geometry(T, num_heads // num_kv_heads, num_kv_heads, num_keys, block_k)
    q_pos_BR = _rows_positions(jnp.asarray(q_pos_BT), num_heads // num_kv_heads, nr * R)
    return _plan(q_pos_BR.reshape(B, nr, R), k_pos_BS, num_keys, C, window)[1]


def _geometry(T: int, G: int, K: int, S: int, block_k: int):
    """(C, nk, rows, R, nr): KV block, KV blocks, query rows per KV head, rows per row block, row blocks."""
    if block_k < 1:
        raise ValueError(f"block_k must be >= 1, got {block_k}")
    C = min(block_k, S)
    rows = T * G
    cap = max(16, SCORE_ELEMENTS // (K * C) // 16 * 16)  # a multiple of 16: whole (bf16-packed) sublane tiles
    R = rows if rows <= cap else cap
    return C, pl.cdiv(S, C), rows, R, pl.cdiv(rows, R)


def _rows_positions(q_pos_BT, G: int, num_rows: int):
    """Position of each query row t * G + g, -1 for padding and for the rows that fill the last row block. [B, rows]."""
    q_pos_BR = jnp.repeat(jnp.where(q_pos_BT >= 0, q_pos_BT, -1).astype(jnp.int32), G, axis=1)
    return jnp.pad(q_pos_BR, ((0, 0), (0, num_rows - q_pos_BR.shape[1])), constant_values=-1)


def _plan(q_pos_BrR, k_pos_BS, S: int, C: int, window):
    """The KV blocks each (sequence, row block) visits: (block indices [B, nr, nk], counts [B, nr]), int32.

    Indices past a count repeat the last visited block, so the pipeline neither fetches nor computes anything there.
    Without key positions (slot = position) the blocks run from the window start of the first query to the block of
    the last: a query at position p is a one-row query block at index p, so `schedule.kv_block_range(p, 1, C, ...)`
    is its range. With key positions: the blocks holding some key in [first query - W + 1, last query], in slot order.
    """
    nk = pl.cdiv(S, C)
    valid_BrR = q_pos_BrR >= 0
    any_Br = valid_BrR.any(axis=-1)
    first_Br = jnp.where(any_Br, jnp.min(jnp.where(valid_BrR, q_pos_BrR, jnp.iinfo(jnp.int32).max), axis=-1), 0)
    last_Br = jnp.max(q_pos_BrR, axis=-1)
    n_n = jnp.arange(nk, dtype=jnp.int32)
    if k_pos_BS is None:
        lo_Br, _ = schedule.kv_block_range(first_Br, 1, C, window, nk)
        _, hi_Br = schedule.kv_block_range(last_Br, 1, C, window, nk)
        count_Br = jnp.where(any_Br, hi_Br - lo_Br + 1, 0)
        blocks_Brn = jnp.where(any_Br[..., None], jnp.minimum(lo_Br[..., None] + n_n, hi_Br[..., None]), 0)
        return blocks_Brn.astype(jnp.int32), count_Br.astype(jnp.int32)
    k_pos_BnC = jnp.pad(jnp.asarray(k_pos_BS, jnp.int32), ((0, 0), (0, nk * C - S)), constant_values=-1)
    k_pos_B11nC = k_pos_BnC.reshape(k_pos_BnC.shape[0], 1, nk, C)
    hit_BrnC = (k_pos_B11nC >= 0) & (k_pos_B11nC <= last_Br[:, :, None, None])
    if window is not None:
        hit_BrnC &= k_pos_B11nC > first_Br[:, :, None, None] - window
    need_Brn = hit_BrnC.any(axis=-1) & any_Br[..., None]
    count_Br = need_Brn.sum(axis=-1).astype(jnp.int32)
    # The needed blocks first, in slot order, then the last needed one repeated.
    order_Brn = jnp.argsort(jnp.where(need_Brn, n_n, nk + n_n), axis=-1).astype(jnp.int32)
    j_Brn = jnp.minimum(n_n, jnp.maximum(count_Br[..., None] - 1, 0))
    return jnp.take_along_axis(order_Brn, j_Brn, axis=-1), count_Br


def _kernel(
    layer_ref,
    blocks_ref,
    count_ref,
    q_ref,
    q_pos_ref,
    k_ref,
    v_ref,
    *refs,
    scale: float,
    window,
    S: int,
    C: int,
    K: int,
    nr: int,
    nk: int,
    has_k_pos: bool,
):
    """One (sequence, row block) program at KV step j: fold KV block blocks[j] of every KV head into its softmax."""
    if has_k_pos:
        k_pos_ref, o_ref, m_ref, l_ref, acc_ref = refs
    else:
        o_ref, m_ref, l_ref, acc_ref = refs
    b, r, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * nr + r

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < count_ref[row])
    def _step():
        first_slot = blocks_ref[row * nk + j] * C
        slot_1C = first_slot + lax.broadcasted_iota(jnp.int32, (1, C), 1)
        k_pos_1C = k_pos_ref[...] if has_k_pos else slot_1C
        q_pos_R1 = q_pos_ref[...]
        # One mask for all KV heads: visibility depends on positions only.
        vis_RC = (k_pos_1C >= 0) & (k_pos_1C <= q_pos_R1)
        if window is not None:
            vis_RC &= k_pos_1C > q_pos_R1 - window
        if S % C:
            # The last block reads past the cache: those keys are masked and values zeroed (0 * NaN would be NaN).
            vis_RC &= slot_1C < S
            in_cache_1C1 = first_slot + lax.broadcasted_iota(jnp.int32, (1, C, 1), 1) < S
        # [C, K, H] -> [K, C, H] in VMEM: every KV head becomes a batch of plain [C, H] matmul operands.
        q_KRH = q_ref[...]
        k_KCH = jnp.swapaxes(k_ref[...], 0, 1).astype(q_KRH.dtype)
        v_KCH = jnp.swapaxes(v_ref[...], 0, 1).astype(q_KRH.dtype)
        if S % C:
            v_KCH = jnp.where(in_cache_1C1, v_KCH, jnp.zeros_like(v_KCH))
        s_KRC = jnp.einsum("krh,kch->krc", q_KRH, k_KCH, preferred_element_type=jnp.float32) * scale
        s_KRC = jnp.where(vis_RC, s_KRC, MASK_VALUE)
        m_prev_KR1 = m_ref[...]
        m_next_KR1 = jnp.maximum(m_prev_KR1, jnp.max(s_KRC, axis=2, keepdims=True))
        # Zeroed explicitly: while a row has seen nothing, m is MASK_VALUE and exp(s - m) would be 1.
        p_KRC = jnp.where(vis_RC, jnp.exp(s_KRC - m_next_KR1), 0.0)
        alpha_KR1 = jnp.exp(m_prev_KR1 - m_next_KR1)
        l_ref[...] = alpha_KR1 * l_ref[...] + jnp.sum(p_KRC, axis=2, keepdims=True)
        pv_KRH = jnp.einsum("krc,kch->krh", p_KRC.astype(v_KCH.dtype), v_KCH, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha_KR1 * acc_ref[...] + pv_KRH
        m_ref[...] = m_next_KR1

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l_KR1 = l_ref[...]
        # A row that saw nothing has acc = 0 and l = 0: divide by 1 to give zeros, not NaN.
        o_ref[...] = (acc_ref[...] / jnp.where(l_KR1 == 0.0, 1.0, l_KR1)).astype(o_ref.dtype)
