"""Flash attention for TPU in Pallas (Mosaic): causal or sliding-window GQA with segment ids, forward and backward.

Shape legend: B batch, T positions, N query heads, K KV heads, G = N // K query heads per KV head, H head dim,
Q query block, C KV block, R = G * Q rows of one block (the G query heads of a KV head stacked), P visited pairs.

Layout: the wrapper moves q to [B, K, G, T, H] and k, v to [B, K, T, H] (one transpose each), so a kernel step loads
the [G, Q, H] queries of all G heads that share a KV head and the [C, H] K/V block once for them: GQA without
repeating K/V, and one [R, H] x [H, C] matmul per step instead of G small ones.

Block skipping: the grid is (B, K, P) and its last axis walks a flattened table of only the visited (query block, KV
block) pairs (`schedule.pair_table`, prefetched into SMEM); index maps read the table, so neither a DMA nor a step is
spent on a pair that holds no visible key. A local layer costs O(T * W) in all three passes. The forward and dQ
passes walk pairs grouped by query block, the dK/dV pass grouped by KV block; accumulators live in VMEM scratch,
reset on a row's first pair and written out on its last (the output block index stays put along a row, so Pallas
writes it back once). The elementwise mask is built only on pairs the table flags (diagonal and window edges) or
when segment ids are given.

Numerics: scores, softmax statistics and accumulators in float32; probabilities cast to v's dtype for the PV matmul.
Masked scores use a large finite negative value, not -inf: a row whose first visited block is all masked then holds
m = MASK and junk l, acc, which the first visible score wipes (alpha = exp(MASK - s) == 0 exactly in float32); every
row sees itself, so one always comes. The logsumexp is a residual ([B, N, T] float32) and an optional output.

TPU shape rules: block_q a multiple of 8 and block_k a multiple of 128 (lanes of the [R, C] scores), both powers of
two so one divides the other; T is padded to a multiple of the larger (padded keys sit after every real query, so
causality hides them; padded query rows are sliced off).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cwm_jax.kernels import schedule

LANES = 128  # width of lane-replicated per-row statistics (logsumexp, D) as the kernels read them
SUBLANES = 8
MASK_VALUE = schedule.MASK_VALUE  # finite, not -inf: see schedule.MASK_VALUE

# (block_q, block_k) per TPU generation. Rows per step are G * block_q (1536 for the 32B model's G = 6 at 256), so the
# [R, C] float32 scores and probabilities take 3 MiB each: inside the 16 MiB of scoped VMEM that v4 and v5e grant by
# default, double-buffered inputs included. v5p and v6e have more VMEM and faster MXUs; larger query blocks halve the
# K/V re-reads there. Chosen from the compiler's VMEM figures (tests compile them), not from TPU timings (none here).
DEFAULT_BLOCKS = {"v4": (256, 512), "v5e": (256, 512), "v5p": (512, 512), "v6e": (512, 512)}
FALLBACK_BLOCKS = (256, 512)


def tpu_generation(device=None) -> str | None:
    """'v4', 'v5e', 'v5p', 'v6e' for a TPU device (default: the first device), None elsewhere."""
    device = device or jax.devices()[0]
    if device.platform != "tpu":
        return None
    kind = device.device_kind.lower()
    for key, gen in (("v6", "v6e"), ("lite", "v5e"), ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4")):
        if key in kind:
            return gen
    return None


def default_blocks(generation: str | None = None) -> tuple[int, int]:
    """(block_q, block_k) for a TPU generation (default: this machine's), FALLBACK_BLOCKS when unknown."""
    return DEFAULT_BLOCKS.get(generation or tpu_generation() or "", FALLBACK_BLOCKS)


def _pow2_at_least(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def tpu_plan(seq_len: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """Block sizes (Q, C) clamped for short sequences, and the padded length T_pad (a multiple of both).

    Raises ValueError unless block_q is a power of two >= 8 and block_k a power of two >= 128.
    """
    for name, b, least in (("block_q", block_q, SUBLANES), ("block_k", block_k, LANES)):
        if b < least or b & (b - 1):
            raise ValueError(f"{name}={b}: the TPU kernel needs a power of two >= {least} (e.g. {least}, ..., 512)")
    Q = min(block_q, max(SUBLANES, _pow2_at_least(seq_len)))
    C = min(block_k, max(LANES, _pow2_at_least(seq_len)))
    return Q, C, schedule.round_up(seq_len, max(Q, C))


def _visible(qb, kb, Q, C, window, qseg_ref, kseg_ref):
    """Visibility [Q, C] of query block qb against KV block kb (indices; segments when given)."""
    i_QC = qb * Q + lax.broadcasted_iota(jnp.int32, (Q, C), 0)
    j_QC = kb * C + lax.broadcasted_iota(jnp.int32, (Q, C), 1)
    vis_QC = j_QC <= i_QC
    if window is not None:
        vis_QC = vis_QC & (i_QC - j_QC < window)
    if qseg_ref is not None:
        vis_QC = vis_QC & (qseg_ref[:, :1] == kseg_ref[:1, :])
    return vis_QC


def _scores(q_RH, k_CH, scale, masked, qb, kb, G, Q, C, window, qseg_ref, kseg_ref):
    """Scaled float32 scores [R, C] of one pair; invisible entries set to MASK_VALUE when `masked`."""
    s_RC = lax.dot_general(q_RH, k_CH, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    if not masked:
        return s_RC
    vis_QC = _visible(qb, kb, Q, C, window, qseg_ref, kseg_ref)
    s_GQC = jnp.where(vis_QC[None], s_RC.reshape(G, Q, C), MASK_VALUE)
    return s_GQC.reshape(G * Q, C)


def _branch_on_mask(needs_mask, has_segments, body):
    """Run body(masked) with the mask built only where the pair needs it (always with segment ids)."""
    if has_segments:
        body(True)
        return
    pl.when(needs_mask != 0)(lambda: body(True))
    pl.when(needs_mask == 0)(lambda: body(False))


def _split_refs(refs, has_segments, n_in):
    """(inputs, segment refs (q, kv) or (None, None), the rest) from a kernel's flat ref list."""
    ins = refs[:n_in]
    if has_segments:
        return ins, refs[n_in : n_in + 2], refs[n_in + 2 :]
    return ins, (None, None), refs[n_in:]


def _fwd_kernel(qb_ref, kb_ref, first_ref, last_ref, mask_ref, *refs, G, Q, C, window, scale, has_segments):
    (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _split_refs(
        refs, has_segments, 3
    )
    p = pl.program_id(2)
    H = q_ref.shape[-1]

    @pl.when(first_ref[p] != 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(masked):
        q_RH = q_ref[...].reshape(G * Q, H)
        v_CH = v_ref[...]
        s_RC = _scores(q_RH, k_ref[...], scale, masked, qb_ref[p], kb_ref[p], G, Q, C, window, qseg_ref, kseg_ref)
        m_prev_RL = m_ref[...]
        m_next_RL = jnp.maximum(m_prev_RL, s_RC.max(axis=-1, keepdims=True))
        alpha_RL = jnp.exp(m_prev_RL - m_next_RL)
        p_RC = jnp.exp(s_RC - m_next_RL[:, :1])
        l_ref[...] = alpha_RL * l_ref[...] + p_RC.sum(axis=-1, keepdims=True)
        pv_RH = jnp.dot(p_RC.astype(v_CH.dtype), v_CH, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha_RL[:, :1] * acc_ref[...] + pv_RH
        m_ref[...] = m_next_RL

    _branch_on_mask(mask_ref[p], has_segments, body)

    @pl.when(last_ref[p] != 0)
    def _finish():
        l_RL = l_ref[...]
        o_ref[...] = (acc_ref[...] / l_RL[:, :1]).reshape(G, Q, H).astype(o_ref.dtype)
        lse_ref[...] = (m_ref[...] + jnp.log(l_RL)).reshape(G, Q, LANES)


def _recompute(refs, p, masked, G, Q, C, window, scale):
    """Both backward passes' shared step on pair p: (q [R, H], dO [R, H], k [C, H], P [R, C], dS [R, C]), P the
    recomputed probabilities exp(S - lse) and dS = P * (dP - D) with dP = dO V^T (D = rowsum(dO * O) - dlse)."""
    qb_ref, kb_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, qseg_ref, kseg_ref = (*refs, None, None)[:10]
    H = q_ref.shape[-1]
    q_RH = q_ref[...].reshape(G * Q, H)
    do_RH = do_ref[...].reshape(G * Q, H)
    k_CH = k_ref[...]
    s_RC = _scores(q_RH, k_CH, scale, masked, qb_ref[p], kb_ref[p], G, Q, C, window, qseg_ref, kseg_ref)
    p_RC = jnp.exp(s_RC - lse_ref[...].reshape(G * Q, LANES)[:, :1])
    dp_RC = lax.dot_general(do_RH, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds_RC = p_RC * (dp_RC - d_ref[...].reshape(G * Q, LANES)[:, :1])
    return q_RH, do_RH, k_CH, p_RC, ds_RC


def _dkv_kernel(kb_ref, qb_ref, first_ref, last_ref, mask_ref, *refs, G, Q, C, window, scale, has_segments):
    ins, segs, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_refs(refs, has_segments, 6)
    refs_ = (qb_ref, kb_ref, *ins, *segs)
    p = pl.program_id(2)

    @pl.when(first_ref[p] != 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(masked):
        q_RH, do_RH, k_CH, p_RC, ds_RC = _recompute(refs_, p, masked, G, Q, C, window, scale)
        # Contracting the rows of both operands sums the G query heads of this KV head straight into dK, dV.
        t_dims = (((0,), (0,)), ((), ()))
        dv_acc[...] += lax.dot_general(p_RC.astype(do_RH.dtype), do_RH, t_dims, preferred_element_type=jnp.float32)
        dk_acc[...] += lax.dot_general(ds_RC.astype(q_RH.dtype), q_RH, t_dims, preferred_element_type=jnp.float32)

    _branch_on_mask(mask_ref[p], has_segments, body)

    @pl.when(last_ref[p] != 0)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(qb_ref, kb_ref, first_ref, last_ref, mask_ref, *refs, G, Q, C, window, scale, has_segments):
    ins, segs, (dq_ref, dq_acc) = _split_refs(refs, has_segments, 6)
    refs_ = (qb_ref, kb_ref, *ins, *segs)
    p = pl.program_id(2)

    @pl.when(first_ref[p] != 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def body(masked):
        _, _, k_CH, _, ds_RC = _recompute(refs_, p, masked, G, Q, C, window, scale)
        dq_acc[...] += jnp.dot(ds_RC.astype(k_CH.dtype), k_CH, preferred_element_type=jnp.float32)

    _branch_on_mask(mask_ref[p], has_segments, body)

    @pl.when(last_ref[p] != 0)
    def _finish():
        dq_ref[...] = (dq_acc[...] * scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


SCOPED_VMEM_DEFAULT = 16 * 2**20  # what Mosaic grants a kernel unless asked (v4, v5e, v5p; v6e grants 32 MiB)
VMEM_LIMIT_CAP = 56 * 2**20  # below the 64 MiB of v5p, the smallest VMEM of the generations with room to grow


def vmem_estimate(G: int, Q: int, C: int, H: int, itemsize: int) -> int:
    """Upper estimate of one step's VMEM: double-buffered blocks, scratch and float32 [R, C] temporaries (dK/dV pass,
    the largest of the three)."""
    R = G * Q
    blocks = 2 * (2 * R * H * itemsize + 2 * C * H * itemsize + 2 * R * LANES * 4 + 2 * C * H * itemsize)
    return blocks + 2 * C * H * 4 + R * H * 4 + 4 * R * C * 4


def _compiler_params(G, Q, C, H, itemsize):
    # B and K are independent (megacore may split them); the pair axis carries the accumulators. Ask for more scoped
    # VMEM only when the blocks need it (v4 has 16 MiB in all: keep its default blocks under that).
    need = vmem_estimate(G, Q, C, H, itemsize)
    limit = None if need <= SCOPED_VMEM_DEFAULT else min(need + need // 4, VMEM_LIMIT_CAP)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)


def _specs(G, Q, C, H, by_k: bool):
    """Block specs of q-like [B, K, G, T, H], kv-like [B, K, T, H], per-row stats [B, K, G, T, LANES] and segment ids
    for a grid (B, K, P) whose prefetched tables are (qb, kb, ...) (by_k False) or (kb, qb, ...) (by_k True)."""

    def q_idx(b, k, p, t0, t1, *_):
        return (b, k, 0, (t1 if by_k else t0)[p], 0)

    def kv_idx(b, k, p, t0, t1, *_):
        return (b, k, (t0 if by_k else t1)[p], 0)

    def qseg_idx(b, k, p, t0, t1, *_):
        return (b, (t1 if by_k else t0)[p], 0)

    def kseg_idx(b, k, p, t0, t1, *_):
        return (b, 0, (t0 if by_k else t1)[p])

    return dict(
        q=pl.BlockSpec((None, None, G, Q, H), q_idx),
        kv=pl.BlockSpec((None, None, C, H), kv_idx),
        stat=pl.BlockSpec((None, None, G, Q, LANES), q_idx),
        qseg=pl.BlockSpec((None, Q, LANES), qseg_idx),
        kseg=pl.BlockSpec((None, SUBLANES, C), kseg_idx),
    )


def _segment_operands(qseg_BT, kseg_BT):
    """Segment ids in TPU-friendly layouts: queries along sublanes [B, T, LANES], keys along lanes [B, 8, T]."""
    if qseg_BT is None:
        return ()
    B, T = qseg_BT.shape
    return (
        jnp.broadcast_to(qseg_BT[:, :, None], (B, T, LANES)),
        jnp.broadcast_to(kseg_BT[:, None, :], (B, SUBLANES, T)),
    )


def _cost(B, K, G, Q, C, H, pairs, itemsize, matmuls: int) -> pl.CostEstimate:
    """FLOPs and bytes of the visited pairs only: `matmuls` [R, C]-sized matmuls per pair (forward 2: S and PV; dK/dV
    pass 4: S, dP, dV, dK; dQ pass 3: S, dP, dQ), one exp per score, and the blocks each pair reads."""
    per_pair = B * K * G * Q * C
    q_bytes = B * K * G * pairs * Q * H * itemsize  # a query-side block is re-read per pair in the pair-major walk
    kv_bytes = 2 * B * K * pairs * C * H * itemsize
    return pl.CostEstimate(
        flops=2 * matmuls * per_pair * H * pairs,
        transcendentals=per_pair * pairs,
        bytes_accessed=q_bytes + kv_bytes,
    )


def _tables(T_pad, Q, C, window, by):
    """Prefetched pair tables, the block the pass accumulates for first: (qb, kb, ...) by "q", (kb, qb, ...) by "k"."""
    table = schedule.pair_table(T_pad, Q, C, window, by=by)
    qb, kb, *flags = table.arrays()
    lead = (kb, qb) if by == "k" else (qb, kb)
    return tuple(jnp.asarray(a) for a in (*lead, *flags)), len(table)


def _forward(q_BKGTH, k_BKTH, v_BKTH, seg, window, Q, C, interpret):
    """Kernel-layout forward: o [B, K, G, T, H] and logsumexp [B, K, G, T] float32."""
    B, K, G, T, H = q_BKGTH.shape
    tables, P = _tables(T, Q, C, window, "q")
    specs = _specs(G, Q, C, H, by_k=False)
    has_segments = bool(seg)
    in_specs = [specs["q"], specs["kv"], specs["kv"]] + ([specs["qseg"], specs["kseg"]] if has_segments else [])
    kernel = functools.partial(_fwd_kernel, G=G, Q=Q, C=C, window=window, scale=H**-0.5, has_segments=has_segments)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, K, P),
            in_specs=in_specs,
            out_specs=[specs["q"], specs["stat"]],
            scratch_shapes=[
                pltpu.VMEM((G * Q, LANES), jnp.float32),
                pltpu.VMEM((G * Q, LANES), jnp.float32),
                pltpu.VMEM((G * Q, H), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q_BKGTH.shape, q_BKGTH.dtype),
            jax.ShapeDtypeStruct((B, K, G, T, LANES), jnp.float32),
        ],
        compiler_params=_compiler_params(G, Q, C, H, q_BKGTH.dtype.itemsize),
        cost_estimate=_cost(B, K, G, Q, C, H, P, q_BKGTH.dtype.itemsize, matmuls=2),
        interpret=interpret,
        name="cwm_flash_fwd",
    )(*tables, q_BKGTH, k_BKTH, v_BKTH, *seg)
    return o, lse[..., 0]


def _backward(q_BKGTH, k_BKTH, v_BKTH, seg, o_BKGTH, lse_BKGT, do_BKGTH, dlse_BKGT, window, Q, C, interpret):
    """dq, dk, dv in kernel layout; dlse is the cotangent of the logsumexp output (zero unless it was used)."""
    B, K, G, T, H = q_BKGTH.shape
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij; a logsumexp cotangent adds P_ij * dlse_i to dS, i.e. D - dlse.
    d_BKGT = jnp.sum(do_BKGTH.astype(jnp.float32) * o_BKGTH.astype(jnp.float32), axis=-1) - dlse_BKGT
    lse_L, d_L = (jnp.broadcast_to(x[..., None], (B, K, G, T, LANES)) for x in (lse_BKGT, d_BKGT))
    has_segments = bool(seg)
    common = dict(G=G, Q=Q, C=C, window=window, scale=H**-0.5, has_segments=has_segments)
    itemsize = q_BKGTH.dtype.itemsize

    def call(kernel, by, out_specs, out_shape, scratch):
        tables, P = _tables(T, Q, C, window, by)
        specs = _specs(G, Q, C, H, by_k=by == "k")
        in_specs = [specs["q"], specs["kv"], specs["kv"], specs["q"], specs["stat"], specs["stat"]]
        in_specs += [specs["qseg"], specs["kseg"]] if has_segments else []
        return pl.pallas_call(
            functools.partial(kernel, **common),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=5,
                grid=(B, K, P),
                in_specs=in_specs,
                out_specs=out_specs(specs),
                scratch_shapes=scratch,
            ),
            out_shape=out_shape,
            compiler_params=_compiler_params(G, Q, C, H, q_BKGTH.dtype.itemsize),
            cost_estimate=_cost(B, K, G, Q, C, H, P, itemsize, matmuls=4 if by == "k" else 3),
            interpret=interpret,
            name=f"cwm_flash_bwd_{'dkv' if by == 'k' else 'dq'}",
        )(*tables, q_BKGTH, k_BKTH, v_BKTH, do_BKGTH, lse_L, d_L, *seg)

    dk, dv = call(
        _dkv_kernel,
        "k",
        lambda s: [s["kv"], s["kv"]],
        [jax.ShapeDtypeStruct(k_BKTH.shape, k_BKTH.dtype), jax.ShapeDtypeStruct(v_BKTH.shape, v_BKTH.dtype)],
        [pltpu.VMEM((C, H), jnp.float32), pltpu.VMEM((C, H), jnp.float32)],
    )
    (dq,) = call(
        _dq_kernel,
        "q",
        lambda s: [s["q"]],
        [jax.ShapeDtypeStruct(q_BKGTH.shape, q_BKGTH.dtype)],
        [pltpu.VMEM((G * Q, H), jnp.float32)],
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q_BKGTH, k_BKTH, v_BKTH, seg, window, Q, C, interpret):
    return _forward(q_BKGTH, k_BKTH, v_BKTH, seg, window, Q, C, interpret)


def _flash_fwd(q_BKGTH, k_BKTH, v_BKTH, seg, window, Q, C, interpret):
    o, lse = _forward(q_BKGTH, k_BKTH, v_BKTH, seg, window, Q, C, interpret)
    # O(T) residuals: inputs, output and the compact logsumexp; probabilities are recomputed per pair.
    return (o, lse), (q_BKGTH, k_BKTH, v_BKTH, seg, o, lse)


def _flash_bwd(window, Q, C, interpret, res, cotangents):
    q, k, v, seg, o, lse = res
    do, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, seg, o, lse, do, dlse, window, Q, C, interpret)
    # Segment ids are integer labels: no cotangent.
    return dq, dk, dv, tuple(None for _ in seg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    window: int | None = None,
    segment_ids_BT=None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret=False,
    return_lse: bool = False,
):
    """Causal (optionally sliding-window, optionally packed) GQA flash attention on TPU -> o [B, T, N, H].

    q [B, T, N, H], k and v [B, T, K, H] with K dividing N, bf16 or float32. window: W keys per query (itself
    included) or None. segment_ids_BT: int32 [B, T] or None. block_q, block_k: powers of two (>= 8, >= 128), default
    `default_blocks()` for this TPU generation; clamped for short sequences. interpret: False on a TPU, True or a
    `pltpu.InterpretParams` to run on the CPU. return_lse: also return the logsumexp [B, N, T] float32.
    Differentiable in q, k, v (and through the logsumexp).
    """
    window = schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT)
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    dq_, dk_ = default_blocks()
    Q, C, T_pad = tpu_plan(T, block_q or dq_, block_k or dk_)
    G = N // K
    pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))
    q_BKGTH = jnp.pad(q_BTNH, pad).reshape(B, T_pad, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
    seg = ()
    if segment_ids_BT is not None:
        seg_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, T_pad - T)), mode="edge")
        seg = _segment_operands(seg_BT, seg_BT)
    # A window covering every real query's whole past is causal attention (padded rows are sliced off).
    window = None if window is None or window >= T else int(window)
    o_BKGTH, lse_BKGT = _flash(q_BKGTH, k_BKTH, v_BKTH, seg, window, Q, C, interpret)
    o_BTNH = o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T_pad, N, H)[:, :T]
    if return_lse:
        return o_BTNH, lse_BKGT.reshape(B, N, T_pad)[:, :, :T]
    return o_BTNH


def visit_counts(seq_len: int, window: int | None, block_q: int, block_k: int) -> schedule.VisitCounts:
    """Pairs each pass of this kernel visits at its own (clamped, padded) block plan."""
    Q, C, _ = tpu_plan(seq_len, block_q, block_k)
    return schedule.visit_counts(schedule.round_up(seq_len, max(Q, C)), window, Q, C)


__all__ = ["DEFAULT_BLOCKS", "default_blocks", "flash_attention", "tpu_generation", "tpu_plan", "visit_counts"]
