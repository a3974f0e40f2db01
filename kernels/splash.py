"""attention_impl="splash": CWM attention through JAX's own TPU splash-attention kernel, as a baseline for ours.

Shape legend: B batch, T query positions (self-attention, so also the key positions), N query heads, K KV heads,
G = N // K query heads per KV head, H head dim, W window; T_pad the padded length, Q / C the query / KV block sizes.

Wraps `jax.experimental.pallas.ops.tpu.splash_attention` with the project's conventions: inputs [B, T, N, H] and
[B, T, K, H], visibility as in `cwm_jax.attention` (query i sees key j iff j <= i, i - W < j with a window, and equal
segment ids with segments), scale H ** -0.5, any T. Splash works on one example [N, T, H] with T a multiple of 128 and
of its block sizes, and does not scale q; this module pads, pre-scales, transposes and vmaps over the batch. Gradients
are splash's own (its custom VJP: a dK/dV kernel and a dQ kernel); `splash_visits` reports the block pairs its mask
processing keeps, to set against `schedule.visit_counts`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

from cwm_jax.kernels import schedule

# Splash's KV blocks must be multiples of the TPU lane width, and its sequence a multiple of its blocks.
LANES = 128


def splash_plan(seq_len: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(Q, C, T_pad) splash runs with: T rounded up to 128, then `schedule.plan`'s clamping to that length."""
    if block_q % LANES or block_k % LANES or block_q < 1 or block_k < 1:
        raise ValueError(f"splash block sizes must be positive multiples of {LANES}, got {block_q} and {block_k}")
    return schedule.plan(schedule.round_up(seq_len, LANES), block_q, block_k)


def _mask(T_pad: int, window: int | None) -> splash.Mask:
    """Splash's mask for one head: causal, or causal within a W-key window.

    LocalMask((W - 1, 0)) is already causal (0 keys to the right), so it stands alone rather than as
    `CausalMask & LocalMask`: a single computable mask lets splash evaluate it inside the kernel from q_sequence,
    while a LogicalAnd has no mask function and splash would materialise its partial blocks and read them from HBM.
    """
    if window is None:
        return splash.CausalMask((T_pad, T_pad))
    return splash.LocalMask((T_pad, T_pad), (window - 1, 0), offset=0)


def _block_sizes(Q: int, C: int) -> splash.BlockSizes:
    """The same (Q, C) for the forward, dQ and dK/dV passes, as our kernels use; separate (unfused) dQ kernel."""
    return splash.BlockSizes(
        block_q=Q,
        block_kv=C,
        block_kv_compute=C,
        block_q_dkv=Q,
        block_kv_dkv=C,
        block_kv_dkv_compute=C,
        block_q_dq=Q,
        block_kv_dq=C,
    )


@functools.cache
def _multi_head_mask(T_pad: int, N: int, window: int | None):
    """One mask object per shape and window: splash's mask processing is lru-cached on it."""
    return splash.MultiHeadMask([_mask(T_pad, window)] * N)  # one unique mask: splash processes it once


def _kernel(T_pad: int, N: int, window: int | None, Q: int, C: int, interpret: bool):
    """The splash kernel for one example [N, T_pad, H].

    make_splash_mha, not make_splash_mqa vmapped over KV heads: its k/v index maps read KV head h // G for query head
    h and its dK/dV kernel accumulates the G query heads of a KV head in scratch (grid kv x heads x q), so GQA runs in
    one kernel call that never repeats K/V. Built in the caller's trace (its mask-info arrays become constants of that
    trace, on whatever devices it targets); the host-side mask processing is cached by splash itself.
    """
    return splash.make_splash_mha(
        _multi_head_mask(T_pad, N, window),
        block_sizes=_block_sizes(Q, C),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    window: int | None = None,
    segment_ids_BT=None,
    block_q: int = 512,
    block_k: int = 512,
    interpret: bool = False,
):
    """Causal GQA self-attention [B, T, N, H] x [B, T, K, H] -> [B, T, N, H] (q's dtype) with splash attention.

    window: W keys per query (itself included), or None for causal. segment_ids_BT: int [B, T] document ids, or None.
    block_q, block_k: splash's query / KV block sizes (multiples of 128; clamped to the padded length), used by the
    forward and both backward kernels. interpret: run splash's Pallas kernels in interpret mode (CPU tests).
    Differentiable through splash's custom VJP.
    """
    window = schedule.check_inputs(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT)
    B, T, N, H = q_BTNH.shape
    Q, C, T_pad = splash_plan(T, block_q, block_k)
    kernel = _kernel(T_pad, N, window, Q, C, bool(interpret))

    # Splash applies no softmax scale; scaling q in float32 and rounding once keeps bf16 inputs to one rounding.
    q_BTNH = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype)
    pad = T_pad - T
    if pad:
        # Padded keys sit after every real query, so causality alone hides them; padded query rows are sliced off.
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BTKH, v_BTKH))
        if segment_ids_BT is not None:
            segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), mode="edge")
    q_BNTH, k_BKTH, v_BKTH = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BTKH, v_BTKH))
    if segment_ids_BT is None:
        o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    else:
        seg_BT = segment_ids_BT.astype(jnp.int32)
        o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH, splash.SegmentIds(q=seg_BT, kv=seg_BT))
    return o_BNTH.transpose(0, 2, 1, 3)[:, :T]


def splash_visits(T: int, window: int | None, block_q: int, block_k: int) -> dict:
    """Block pairs and grid steps of splash's passes for one head, from splash's own mask processing.

    Returns {"forward": non-empty (query block, KV block) pairs of the forward (and dQ) mask info, "grid": grid steps
    the forward iterates per head after splash shrinks its KV axis to the widest row, "dkv" / "dkv_grid": the same for
    the dK/dV pass (its query axis shrunk to the tallest column), "block_q", "block_k", "padded_len"}. Uses the
    padding and clamping of `splash_attention`, so it describes what that call runs.
    """
    window = schedule.check_window(window)
    Q, C, T_pad = splash_plan(T, block_q, block_k)
    mask = splash.MultiHeadMask([_mask(T_pad, window)])
    # The same calls and arguments as make_splash_mha: the dK/dV grid shrinks since the dQ kernel is not fused.
    fwd, _ = mask_info_lib.process_mask(mask, (Q, C), head_shards=1, q_seq_shards=1)
    dkv, _ = mask_info_lib.process_mask_dkv(mask, (Q, C), head_shards=1, q_seq_shards=1, shrink_grid=True)
    fwd_blocks, dkv_blocks = np.asarray(fwd.block_mask)[0], np.asarray(dkv.block_mask)[0]
    return {
        "forward": int(np.count_nonzero(fwd_blocks)),
        "grid": int(fwd_blocks.size),
        "dkv": int(np.count_nonzero(dkv_blocks)),
        "dkv_grid": int(dkv_blocks.size),
        "block_q": Q,
        "block_k": C,
        "padded_len": T_pad,
    }
