"""Flash attention for NVIDIA GPUs: Pallas kernels lowered through Triton, forward and backward (custom VJP).

Shape legend:
  B batch, T query positions (self-attention: keys too), N query heads, K KV heads, G = N // K query heads per KV
  head, H head dim, W sliding window. Kernel-local: Q query block, C KV block, T_pad T padded to both blocks.

Visibility (as `cwm_jax.attention`): query i sees key j iff j <= i, i - W < j with a window, and seg[i] == seg[j]
with segment ids. Query head h reads KV head h // G: the kernels index the KV head, K/V are never repeated.

Kernels (every KV / query block loop walks `schedule.kv_block_range` / `schedule.q_block_range` from the traced
program id, so a local layer costs O(T * W) and a causal one about half the grid):
  forward  grid (query block, batch, query head): online softmax in float32, writes o and the logsumexp residual.
  dK/dV    grid (KV block, batch, KV head): loops over the G query heads of its KV head and their query blocks, so
           dK and dV come out per KV head with no per-query-head copy to sum.
  dQ       grid (query block, batch, query head): a separate pass over the KV blocks (deterministic, no atomics;
           it recomputes the scores and dP, 3 matmuls on top of the dK/dV kernel's 4).
D = rowsum(dO * O) (minus the logsumexp cotangent) is computed in XLA between the two.

Triton constraints honoured: block sizes and head dim are powers of two >= 16 (tensor sizes must be powers of two,
dots need >= 16 rows), shapes are static, dots are 2-D; sequences shorter than a block are padded up to it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cwm_jax.kernels import schedule

# Triton's dot needs M, N, K >= 16, so blocks and the head dim are at least this.
_MIN_BLOCK = 16
_MASK_VALUE = schedule.MASK_VALUE  # finite, not -inf: see schedule.MASK_VALUE
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_PASSES = ("forward", "backward", "dkv", "dq")


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < _MIN_BLOCK or not _is_pow2(int(value)):
        raise ValueError(
            f"{name} must be a power of two >= {_MIN_BLOCK} (16, 32, 64, 128, ...) for the Triton lowering, "
            f"got {value!r}"
        )


def _plan(T: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(Q, C, T_pad) via `schedule.plan`, keeping both blocks powers of two >= 16 for Triton.

    schedule.plan clamps a block to the sequence length (20 stays 20); here blocks are first capped at the next power
    of two >= T and the plan sees a length of at least the blocks, so it keeps them and pads T up instead.
    """
    cap = max(_MIN_BLOCK, 1 << (max(T, 1) - 1).bit_length())
    bq, bk = min(block_q, cap), min(block_k, cap)
    return schedule.plan(max(T, bq, bk), bq, bk)


def cost_estimate(B, T, N, K, H, window, block_q, block_k, itemsize, pass_="forward") -> pl.CostEstimate:
    """XLA cost of one pass over the visited (query block, KV block) pairs, from `schedule.visit_counts`.

    pass_: "forward" (2 matmuls: 4*Q*C*H flops per pair and query head), "backward" (the whole backward's 5
    distinct matmuls: 10*Q*C*H), or the two backward kernels as run here: "dkv" (4 matmuls, 8*Q*C*H) and "dq"
    (3 matmuls, 6*Q*C*H). Transcendentals: one exp per (query, key) of a visited pair and query head. Bytes: each
    tensor the pass reads or writes, once (q, k, v, o, logsumexp; do, D, dq, dk, dv).
    """
    if pass_ not in _PASSES:
        raise ValueError(f"pass_ must be one of {_PASSES}, got {pass_!r}")
    Q, C, _ = _plan(T, block_q, block_k)
    counts = schedule.visit_counts(max(T, Q, C), window, Q, C)  # the length _plan hands schedule.plan
    T_pad = counts.padded_len
    pairs = {"forward": counts.forward, "backward": counts.dkv, "dkv": counts.dkv, "dq": counts.dq}[pass_]
    matmuls = {"forward": 2, "backward": 5, "dkv": 4, "dq": 3}[pass_]
    q_bytes = B * T_pad * N * H * itemsize  # q, o, do, dq each
    kv_bytes = B * T_pad * K * H * itemsize  # k, v, dk, dv each
    row_bytes = B * N * T_pad * 4  # logsumexp, D (float32)
    tensor_bytes = {
        "forward": 2 * q_bytes + 2 * kv_bytes + row_bytes,
        "backward": 4 * q_bytes + 4 * kv_bytes + 2 * row_bytes,
        "dkv": 2 * q_bytes + 4 * kv_bytes + 2 * row_bytes,
        "dq": 3 * q_bytes + 2 * kv_bytes + 2 * row_bytes,
    }[pass_]
    return pl.CostEstimate(
        flops=2 * matmuls * Q * C * H * N * B * pairs,
        transcendentals=Q * C * N * B * pairs,
        bytes_accessed=tensor_bytes,
    )


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel parameters (hashable: the custom VJP's non-differentiable argument)."""

    window: int | None
    Q: int
    C: int
    T: int  # the unpadded length, for the cost estimates
    num_warps: int | None
    num_stages: int
    interpret: bool


def _dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul accumulated in float32; float32 inputs use IEEE precision (Triton would pick TF32 otherwise)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask(s_QC, qi, kj, Q, C, window, seg_q_Q, seg_k_C):
    """Set invisible scores of pair (qi, kj) to the mask value; a branch skips it where every pair is visible.

    Only the elementwise mask sits under the branch: the loads and dots stay at loop level, where Triton's software
    pipeliner can overlap them. With segment ids every pair is masked.
    """

    def apply(s_QC):
        q_pos_Q = qi * Q + jnp.arange(Q, dtype=jnp.int32)
        k_pos_C = kj * C + jnp.arange(C, dtype=jnp.int32)
        vis_QC = k_pos_C[None, :] <= q_pos_Q[:, None]
        if window is not None:
            vis_QC = vis_QC & (q_pos_Q[:, None] - k_pos_C[None, :] < window)
        if seg_q_Q is not None:
            vis_QC = vis_QC & (seg_q_Q[:, None] == seg_k_C[None, :])
        return jnp.where(vis_QC, s_QC, _MASK_VALUE)

    if seg_q_Q is not None:
        return apply(s_QC)
    return lax.cond(schedule.block_needs_mask(qi, kj, Q, C, window), apply, lambda s_QC: s_QC, s_QC)


def _fwd_kernel(*refs, Q, C, nk, window, scale, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), seg_ref = refs, None
    qi = pl.program_id(0)
    q_QH = q_ref[...]
    seg_q_Q = seg_ref[pl.ds(pl.multiple_of(qi * Q, Q), Q)] if has_seg else None

    def body(kj, carry):
        acc_QH, m_Q, l_Q = carry
        k_slice = pl.ds(pl.multiple_of(kj * C, C), C)
        k_CH, v_CH = k_ref[k_slice, :], v_ref[k_slice, :]
        seg_k_C = seg_ref[k_slice] if has_seg else None
        s_QC = _mask(_dot(q_QH, k_CH, trans_b=True) * scale, qi, kj, Q, C, window, seg_q_Q, seg_k_C)
        m_new_Q = jnp.maximum(m_Q, jnp.max(s_QC, axis=1))
        correction_Q = jnp.exp(m_Q - m_new_Q)
        p_QC = jnp.exp(s_QC - m_new_Q[:, None])
        l_new_Q = correction_Q * l_Q + jnp.sum(p_QC, axis=1)
        acc_QH = correction_Q[:, None] * acc_QH + _dot(p_QC.astype(v_CH.dtype), v_CH)
        return acc_QH, m_new_Q, l_new_Q

    lo, hi = schedule.kv_block_range(qi, Q, C, window, nk)
    init = (
        jnp.zeros(q_QH.shape, jnp.float32),
        jnp.full((Q,), _MASK_VALUE, jnp.float32),
        jnp.zeros((Q,), jnp.float32),
    )
    acc_QH, m_Q, l_Q = lax.fori_loop(lo, hi + 1, body, init)
    o_ref[...] = (acc_QH / l_Q[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_Q + jnp.log(l_Q)


def _dkv_kernel(*refs, Q, C, nq, G, window, scale, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref), seg_ref = refs, None
    kj = pl.program_id(0)
    k_CH, v_CH = k_ref[...], v_ref[...]
    seg_k_C = seg_ref[pl.ds(pl.multiple_of(kj * C, C), C)] if has_seg else None
    lo, hi = schedule.q_block_range(kj, Q, C, window, nq)

    def head(g, carry):
        def body(qi, carry):
            dk_CH, dv_CH = carry
            q_slice = pl.ds(pl.multiple_of(qi * Q, Q), Q)
            q_QH, do_QH = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
            lse_Q, d_Q = lse_ref[g, q_slice], d_ref[g, q_slice]
            seg_q_Q = seg_ref[q_slice] if has_seg else None
            s_QC = _mask(_dot(q_QH, k_CH, trans_b=True) * scale, qi, kj, Q, C, window, seg_q_Q, seg_k_C)
            p_QC = jnp.exp(s_QC - lse_Q[:, None])  # masked entries: exp(-huge) = 0 exactly
            dv_CH = dv_CH + _dot(p_QC.astype(do_QH.dtype), do_QH, trans_a=True)
            ds_QC = p_QC * (_dot(do_QH, v_CH, trans_b=True) - d_Q[:, None])
            dk_CH = dk_CH + _dot(ds_QC.astype(q_QH.dtype), q_QH, trans_a=True)
            return dk_CH, dv_CH

        return lax.fori_loop(lo, hi + 1, body, carry)

    zeros_CH = jnp.zeros(k_CH.shape, jnp.float32)
    dk_CH, dv_CH = lax.fori_loop(0, G, head, (zeros_CH, zeros_CH))
    dk_ref[...] = (dk_CH * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CH.astype(dv_ref.dtype)


def _dq_kernel(*refs, Q, C, nk, window, scale, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, d_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref), seg_ref = refs, None
    qi = pl.program_id(0)
    q_QH, do_QH, lse_Q, d_Q = q_ref[...], do_ref[...], lse_ref[...], d_ref[...]
    seg_q_Q = seg_ref[pl.ds(pl.multiple_of(qi * Q, Q), Q)] if has_seg else None

    def body(kj, dq_QH):
        k_slice = pl.ds(pl.multiple_of(kj * C, C), C)
        k_CH, v_CH = k_ref[k_slice, :], v_ref[k_slice, :]
        seg_k_C = seg_ref[k_slice] if has_seg else None
        s_QC = _mask(_dot(q_QH, k_CH, trans_b=True) * scale, qi, kj, Q, C, window, seg_q_Q, seg_k_C)
        p_QC = jnp.exp(s_QC - lse_Q[:, None])
        ds_QC = p_QC * (_dot(do_QH, v_CH, trans_b=True) - d_Q[:, None])
        return dq_QH + _dot(ds_QC.astype(k_CH.dtype), k_CH)

    lo, hi = schedule.kv_block_range(qi, Q, C, window, nk)
    dq_QH = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q_QH.shape, jnp.float32))
    dq_ref[...] = (dq_QH * scale).astype(dq_ref.dtype)


def _compiler_params(cfg: _Config):
    # 4 warps for every head dim: on an H200 (benchmarks/gpu_sweep.py, T 8192, H 128, blocks 64 x 64, bf16) 8 warps
    # took 3.71 ms forward and 16.6 ms forward+backward, 4 warps 2.81 and 9.59.
    num_warps = cfg.num_warps if cfg.num_warps is not None else 4
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def _forward(cfg: _Config, q_BTNH, k_BTKH, v_BTKH, seg_BT):
    B, T_pad, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G, Q, C = N // K, cfg.Q, cfg.C
    has_seg = seg_BT is not None
    kv_spec = pl.BlockSpec((None, T_pad, None, H), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    in_specs = [pl.BlockSpec((None, Q, None, H), lambda i, b, h: (b, i, h, 0)), kv_spec, kv_spec]
    args = [q_BTNH, k_BTKH, v_BTKH]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, T_pad), lambda i, b, h: (b, 0)))
        args.append(seg_BT)
    kernel = functools.partial(_fwd_kernel, Q=Q, C=C, nk=T_pad // C, window=cfg.window, scale=H**-0.5, has_seg=has_seg)
    itemsize = q_BTNH.dtype.itemsize
    return pl.pallas_call(
        kernel,
        grid=(T_pad // Q, B, N),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, Q, None, H), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, Q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
            jax.ShapeDtypeStruct((B, N, T_pad), jnp.float32),
        ],
        compiler_params=_compiler_params(cfg),
        cost_estimate=cost_estimate(B, cfg.T, N, K, H, cfg.window, Q, C, itemsize, "forward"),
        interpret=cfg.interpret,
        name="flash_gpu_forward",
    )(*args)


def _backward(cfg: _Config, q_BTNH, k_BTKH, v_BTKH, seg_BT, o_BTNH, lse_BNT, do_BTNH, dlse_BNT):
    B, T_pad, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G, Q, C = N // K, cfg.Q, cfg.C
    has_seg = seg_BT is not None
    itemsize = q_BTNH.dtype.itemsize
    # D_i = sum_j P_ij dP_ij = rowsum(dO * O); a logsumexp cotangent adds P * dlse to dS, i.e. subtracts from D.
    d_BNT = jnp.einsum("btnh,btnh->bnt", do_BTNH.astype(jnp.float32), o_BTNH.astype(jnp.float32)) - dlse_BNT
    seg_args = [seg_BT] if has_seg else []

    # dK/dV: program (KV block j, batch b, KV head kh) sees its G query heads as one [T_pad, G, H] block.
    group_spec = pl.BlockSpec((None, T_pad, G, H), lambda j, b, kh: (b, 0, kh, 0))
    rows_spec = pl.BlockSpec((None, G, T_pad), lambda j, b, kh: (b, kh, 0))
    kv_block_spec = pl.BlockSpec((None, C, None, H), lambda j, b, kh: (b, j, kh, 0))
    seg_spec = [pl.BlockSpec((None, T_pad), lambda j, b, kh: (b, 0))] if has_seg else []
    dk_BTKH, dv_BTKH = pl.pallas_call(
        functools.partial(_dkv_kernel, Q=Q, C=C, nq=T_pad // Q, G=G, window=cfg.window, scale=H**-0.5, has_seg=has_seg),
        grid=(T_pad // C, B, K),
        in_specs=[group_spec, kv_block_spec, kv_block_spec, *seg_spec, group_spec, rows_spec, rows_spec],
        out_specs=[kv_block_spec, kv_block_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BTKH.shape, k_BTKH.dtype), jax.ShapeDtypeStruct(v_BTKH.shape, v_BTKH.dtype)],
        compiler_params=_compiler_params(cfg),
        cost_estimate=cost_estimate(B, cfg.T, N, K, H, cfg.window, Q, C, itemsize, "dkv"),
        interpret=cfg.interpret,
        name="flash_gpu_dkv",
    )(q_BTNH, k_BTKH, v_BTKH, *seg_args, do_BTNH, lse_BNT, d_BNT)

    # dQ: program (query block i, batch b, query head h) walks the KV blocks of KV head h // G.
    q_spec = pl.BlockSpec((None, Q, None, H), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, T_pad, None, H), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    row_spec = pl.BlockSpec((None, None, Q), lambda i, b, h: (b, h, i))
    seg_spec = [pl.BlockSpec((None, T_pad), lambda i, b, h: (b, 0))] if has_seg else []
    dq_BTNH = pl.pallas_call(
        functools.partial(_dq_kernel, Q=Q, C=C, nk=T_pad // C, window=cfg.window, scale=H**-0.5, has_seg=has_seg),
        grid=(T_pad // Q, B, N),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
        compiler_params=_compiler_params(cfg),
        cost_estimate=cost_estimate(B, cfg.T, N, K, H, cfg.window, Q, C, itemsize, "dq"),
        interpret=cfg.interpret,
        name="flash_gpu_dq",
    )(q_BTNH, k_BTKH, v_BTKH, *seg_args, do_BTNH, lse_BNT, d_BNT)
    return dq_BTNH, dk_BTKH, dv_BTKH


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q_BTNH, k_BTKH, v_BTKH, seg_BT):
    return _forward(cfg, q_BTNH, k_BTKH, v_BTKH, seg_BT)


def _flash_fwd(cfg, q_BTNH, k_BTKH, v_BTKH, seg_BT):
    o_BTNH, lse_BNT = _forward(cfg, q_BTNH, k_BTKH, v_BTKH, seg_BT)
    return (o_BTNH, lse_BNT), (q_BTNH, k_BTKH, v_BTKH, seg_BT, o_BTNH, lse_BNT)


def _flash_bwd(cfg, residuals, cotangents):
    do_BTNH, dlse_BNT = cotangents
    dq_BTNH, dk_BTKH, dv_BTKH = _backward(cfg, *residuals, do_BTNH, dlse_BNT)
    return dq_BTNH, dk_BTKH, dv_BTKH, None  # segment ids get no gradient


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT, block_q, block_k):
    schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT)
    H = q_BTNH.shape[3]
    if H < _MIN_BLOCK or not _is_pow2(H):
        raise ValueError(f"head dim H must be a power of two >= {_MIN_BLOCK} (16, 32, 64, 128, ...), got {H}")
    if not any(q_BTNH.dtype == d for d in _DTYPES) or len({q_BTNH.dtype, k_BTKH.dtype, v_BTKH.dtype}) != 1:
        raise ValueError(
            f"q, k, v must share one of float32, bfloat16, float16; got {q_BTNH.dtype}, {k_BTKH.dtype}, {v_BTKH.dtype}"
        )
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)


@functools.partial(
    jax.jit, static_argnames=("window", "block_q", "block_k", "num_warps", "num_stages", "interpret", "return_lse")
)
def flash_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    window: int | None = None,
    segment_ids_BT=None,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
    return_lse: bool = False,
):
    """Causal (optionally sliding-window, optionally packed) GQA self-attention with Pallas/Triton kernels.

    q_BTNH [B, T, N, H]; k_BTKH, v_BTKH [B, T, K, H] (N a multiple of K); float32, bfloat16 or float16, H a power of
    two >= 16. window: W keys per query (itself included) or None. segment_ids_BT: int [B, T] or None. block_q,
    block_k: powers of two >= 16 (clamped for short sequences; T is padded to a multiple of both). num_warps (default
    4) and num_stages go to Triton. interpret=True runs the kernels on the CPU.

    Returns o [B, T, N, H] in q's dtype, and with return_lse also the float32 logsumexp [B, N, T] of the scaled
    scores. Differentiable in q, k, v (custom VJP; the logsumexp's cotangent is honoured too).
    """
    _check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT, block_q, block_k)
    T = q_BTNH.shape[1]
    Q, C, T_pad = _plan(T, block_q, block_k)
    cfg = _Config(None if window is None else int(window), Q, C, T, num_warps, num_stages, interpret)
    # Padded keys sit after every real query, so causality hides them; padded query rows are sliced off.
    pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))
    q_BTNH_, k_BTKH_, v_BTKH_ = (jnp.pad(x, pad) for x in (q_BTNH, k_BTKH, v_BTKH))
    seg_BT = None
    if segment_ids_BT is not None:
        seg_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, T_pad - T)), mode="edge")
    o_BTNH, lse_BNT = _flash(cfg, q_BTNH_, k_BTKH_, v_BTKH_, seg_BT)
    o_BTNH, lse_BNT = o_BTNH[:, :T], lse_BNT[:, :, :T]
    return (o_BTNH, lse_BNT) if return_lse else o_BTNH
