"""The GPU (Pallas/Triton) flash-attention kernel against the dense oracle, forward and backward.

On the CPU (CI) the kernels run in Pallas' interpret mode; on a GPU backend the same tests run the compiled Triton
kernels (`JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest pytest tests/test_kernels_gpu.py`: the precision
flag keeps XLA's float32 oracle off TF32, which the kernel avoids too).

Shape legend: B batch, T positions, N query heads, K KV heads, H head dim, W window.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwm_jax.attention import attention_dense
from cwm_jax.kernels import flash_gpu, schedule

INTERPRET = jax.default_backend() != "gpu"


def _dense_lse(q_BTNH, k_BTKH, window, seg_BT):
    """Logsumexp [B, N, T] of the scaled, masked float32 scores, built densely here (independent of the kernel)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH.astype(jnp.float32)) * H**-0.5
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    vis_BTS = jnp.asarray((j <= i) & ((i - j < window) if window is not None else True))[None]
    if seg_BT is not None:
        vis_BTS = vis_BTS & (seg_BT[:, :, None] == seg_BT[:, None, :])
    lse_BKGT = jax.nn.logsumexp(jnp.where(vis_BTS[:, None, None], s_BKGTS, -jnp.inf), axis=-1)
    return lse_BKGT.reshape(B, N, T)


def _inputs(seed, B, T, N, K, H, segments):
    """Random q, k, v (float32), packed segment ids (sorted random ids, or None) and cotangents for o and lse."""
    rng = np.random.default_rng(seed)
    q, do = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32) if segments else None
    dlse = jnp.asarray(rng.standard_normal((B, N, T)), jnp.float32)
    return q, k, v, seg, do, dlse


def _run(q, k, v, seg, do, dlse, *, window, block_q, block_k, lse_cotangent):
    """(o, lse, grads) of the kernel and of the float32 oracle, in one jit so each case compiles once."""

    # LLVM -O0: the interpreted kernels compile ~3x faster on CPU and these shapes run in milliseconds either way.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0} if INTERPRET else None)
    def both(q, k, v, seg, do, dlse):
        def kernel(q, k, v):
            return flash_gpu.flash_attention(
                q, k, v, window=window, segment_ids_BT=seg, block_q=block_q, block_k=block_k, interpret=INTERPRET,
                return_lse=True,
            )  # fmt: skip

        def oracle(q, k, v):
            return attention_dense(q, k, v, window=window, segment_ids_BT=seg), _dense_lse(q, k, window, seg)

        dlse_ = dlse if lse_cotangent else jnp.zeros_like(dlse)
        (o, lse), kernel_vjp = jax.vjp(kernel, q, k, v)
        # The oracle runs in float32 on the same (possibly bf16-rounded) inputs and cotangent.
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        (o_ref, lse_ref), oracle_vjp = jax.vjp(oracle, *f32)
        return (o, lse, kernel_vjp((do, dlse_))), (o_ref, lse_ref, oracle_vjp((do.astype(jnp.float32), dlse_)))

    return both(q, k, v, seg, do, dlse)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def _check(*, B, T, N, K, H, window, segments, block_q, block_k, lse_cotangent=False, seed=0):
    q, k, v, seg, do, dlse = _inputs(seed, B, T, N, K, H, segments)
    (o, lse, grads), (o_ref, lse_ref, grads_ref) = _run(
        q, k, v, seg, do, dlse, window=window, block_q=block_q, block_k=block_k, lse_cotangent=lse_cotangent
    )
    assert o.shape == (B, T, N, H) and o.dtype == jnp.float32 and lse.shape == (B, N, T)
    assert _max_err(o, o_ref) < 1e-5
    assert _max_err(lse, lse_ref) < 1e-5
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        assert _max_err(g, g_ref) < 1e-4, f"d{name}"


@pytest.mark.parametrize(
    "T, N, K, H, window, segments, block_q, block_k, B",
    [
        (64, 4, 2, 16, 8, False, 16, 16, 1),  # window below the block
        (64, 6, 1, 16, 32, False, 32, 16, 1),  # window equal to block_q, G = 6
        (80, 12, 2, 16, 40, True, 32, 16, 1),  # window above the block and no multiple of it, G = 6, segments
        (40, 2, 2, 16, 64, False, 16, 32, 1),  # window >= T, G = 1, T no multiple of block_k
        (50, 4, 2, 64, None, True, 16, 32, 2),  # causal, segments, T no multiple of either block, B = 2
        (33, 6, 1, 16, 1, True, 16, 16, 1),  # each query sees only itself: whole block rows masked
        (20, 4, 2, 16, 5, True, 32, 32, 1),  # T below the block: padded up to one power-of-two block
        (32, 2, 1, 128, None, False, 16, 16, 1),  # head dim 128
    ],
)
def test_matches_dense(T, N, K, H, window, segments, block_q, block_k, B):
    _check(
        B=B, T=T, N=N, K=K, H=H, window=window, segments=segments, block_q=block_q, block_k=block_k,
        lse_cotangent=segments,
    )  # fmt: skip


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    T=st.integers(16, 80),
    heads=st.sampled_from([(2, 2), (4, 2), (6, 1), (12, 2)]),
    H=st.sampled_from([16, 64]),
    window=st.one_of(st.none(), st.integers(1, 96)),
    segments=st.booleans(),
    block_q=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32]),
    lse_cotangent=st.booleans(),
)
def test_matches_dense_random_shapes(T, heads, H, window, segments, block_q, block_k, lse_cotangent):
    N, K = heads
    _check(
        B=1, T=T, N=N, K=K, H=H, window=window, segments=segments, block_q=block_q, block_k=block_k,
        lse_cotangent=lse_cotangent, seed=T,
    )  # fmt: skip


def test_bfloat16_against_float32_oracle():
    B, T, N, K, H, window = 1, 48, 4, 2, 64, 20
    q, k, v, seg, do, dlse = _inputs(1, B, T, N, K, H, segments=True)
    q, k, v, do = (x.astype(jnp.bfloat16) for x in (q, k, v, do))
    (o, lse, grads), (o_ref, lse_ref, grads_ref) = _run(
        q, k, v, seg, do, dlse, window=window, block_q=16, block_k=32, lse_cotangent=False
    )
    assert o.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    # bf16 keeps 8 significant bits (ulp 2**-7 at 1.0): the output and gradients are rounded to bf16 and the kernel
    # casts P and dS to bf16 for the matmuls, so allow 2 ulps of each tensor's scale (observed: 0.3 to 0.6).
    for name, x, x_ref in [("o", o, o_ref), *zip(("dq", "dk", "dv"), grads, grads_ref, strict=True)]:
        scale = max(1.0, float(jnp.max(jnp.abs(x_ref))))
        assert _max_err(x, x_ref) < 2 * 2**-7 * scale, name
    assert _max_err(lse, lse_ref) < 1e-5  # bf16 products are exact in float32: the logsumexp loses nothing


def test_cost_estimate_counts_visited_pairs():
    B, T, N, K, H, W, bq, bk = 2, 64, 4, 2, 16, 24, 16, 32
    counts = schedule.visit_counts(T, W, bq, bk)
    assert counts.forward < counts.grid  # a local layer skips pairs, and the estimate must count only the visited
    fwd = flash_gpu.cost_estimate(B, T, N, K, H, W, bq, bk, 4, pass_="forward")
    assert fwd.flops == 4 * bq * bk * H * N * B * counts.forward
    assert fwd.transcendentals == bq * bk * N * B * counts.forward
    bwd = flash_gpu.cost_estimate(B, T, N, K, H, W, bq, bk, 4, pass_="backward")
    assert bwd.flops == 10 * bq * bk * H * N * B * counts.dkv
    dkv = flash_gpu.cost_estimate(B, T, N, K, H, W, bq, bk, 2, pass_="dkv")
    dq = flash_gpu.cost_estimate(B, T, N, K, H, W, bq, bk, 2, pass_="dq")
    assert dkv.flops + dq.flops == 14 * bq * bk * H * N * B * counts.dkv  # 4 + 3 matmuls: dQ recomputes S and dP
    assert fwd.bytes_accessed == 2 * B * T * (N + K) * H * 4 + B * N * T * 4


@pytest.mark.parametrize("block_q, block_k", [(48, 16), (16, 8), (16, 0)])
def test_bad_block_size_raises(block_q, block_k):
    q, k, v, *_ = _inputs(0, 1, 32, 2, 1, 16, segments=False)
    with pytest.raises(ValueError, match=r"power of two >= 16 \(16, 32, 64, 128"):
        flash_gpu.flash_attention(q, k, v, block_q=block_q, block_k=block_k, interpret=INTERPRET)


def test_lowers_to_triton_for_cuda():
    """Without a GPU: the forward and both backward kernels lower to Triton IR (powers of two, 2-D dots >= 16)."""
    B, T, N, K, H = 1, 200, 12, 2, 128
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    ]

    def loss(q, k, v, seg):
        o = flash_gpu.flash_attention(q, k, v, window=100, segment_ids_BT=seg, block_q=64, block_k=32)
        return o.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
    names = re.findall(r'name = "(flash_gpu_\w+)"', lowered.as_text())
    assert sorted(names) == ["flash_gpu_dkv", "flash_gpu_dq", "flash_gpu_forward"]
