"""Tests for cwm_jax.attention: dense oracle vs numpy, blocked reference vs dense, gradients, bf16, window edges, block
skipping and O(T) memory. Shape legend as in cwm_jax/attention.py: B batch, T positions, N query heads, K KV heads,
G = N // K, H head dim, W window.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cwm_jax import attention as attn
from cwm_jax.attention import attention, attention_dense, visited_block_pairs
from cwm_jax.kernels import schedule

B, K, H = 2, 2, 16

# float32 blocked vs dense: both accumulate in float32 but in a different order (online rescaling per KV block), so they
# agree to a few ulp of O(1) values (measured max 6e-7); 1e-5 keeps a wide margin while any masking error is >= 1e-2.
FWD_ATOL = 1e-5
# Gradients sum more terms (dS = P * (dP - D), then over query or key rows): 2e-5 relative to the gradient scale
# (measured max 4e-7 relative, gradients of size ~2-6).
GRAD_RTOL = 2e-5
# bfloat16 inputs vs the float32 dense result on the same (upcast) values: P and the output are rounded to bf16
# (relative 2^-8 each), giving errors of a few 1e-3 on O(1) outputs (measured 8e-3, the same as dense in bf16); 2e-2 is
# the stated bound. bf16 gradients: 3e-2 relative to the gradient scale (measured <= 6e-3).
BF16_ATOL = 2e-2


def _inputs(seed, T, G, dtype=jnp.float32, n_docs=1, batch=B):
    """Random q [B, T, K*G, H], k, v [B, T, K, H] and, when n_docs > 1, packed segment ids [B, T] (None otherwise)."""
    rng = np.random.default_rng(seed)
    q_BTNH = jnp.asarray(rng.standard_normal((batch, T, K * G, H)), dtype)
    k_BTKH = jnp.asarray(rng.standard_normal((batch, T, K, H)), dtype)
    v_BTKH = jnp.asarray(rng.standard_normal((batch, T, K, H)), dtype)
    if n_docs == 1:
        return q_BTNH, k_BTKH, v_BTKH, None
    seg_BT = np.zeros((batch, T), np.int32)
    for b in range(batch):
        # Different random document boundaries per row, like a packed batch.
        cuts = rng.choice(np.arange(1, T), size=n_docs - 1, replace=False)
        seg_BT[b, cuts] = 1
    return q_BTNH, k_BTKH, v_BTKH, jnp.asarray(np.cumsum(seg_BT, axis=1), jnp.int32)


def _numpy_reference(q_BTNH, k_BTKH, v_BTKH, window, seg_BT):
    """Float64 attention with repeated KV heads and a mask built by explicit comparisons, independent of the module."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BTKH, v_BTKH))
    batch, T, N, head_dim = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # query head h reads KV head h // G
    out = np.zeros_like(q)
    for b in range(batch):
        for i in range(T):
            for h in range(N):
                keys = [
                    j
                    for j in range(T)
                    if j <= i
                    and (window is None or i - j < window)
                    and (seg_BT is None or seg_BT[b, i] == seg_BT[b, j])
                ]
                s = np.array([q[b, i, h] @ k[b, j, h] for j in keys]) / np.sqrt(head_dim)
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, keys, h]
    return out


def _fwd(impl, window, block_q=16, block_k=16):
    return jax.jit(
        lambda q, k, v, seg: attention(
            q, k, v, window=window, segment_ids_BT=seg, impl=impl, block_q=block_q, block_k=block_k
        )
    )


def _grad(impl, window, w_BTNH, block_q=16, block_k=16):
    def loss(q, k, v, seg):
        o = attention(q, k, v, window=window, segment_ids_BT=seg, impl=impl, block_q=block_q, block_k=block_k)
        return jnp.sum(o.astype(jnp.float32) * w_BTNH)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _max_abs(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.mark.parametrize(
    "T,G,window,n_docs",
    [(13, 1, None, 1), (13, 2, 1, 1), (13, 4, 4, 2), (13, 2, 13, 3), (13, 2, 16, 1), (13, 4, None, 3)],
)
def test_dense_matches_numpy(T, G, window, n_docs):
    q, k, v, seg = _inputs(0, T, G, n_docs=n_docs)
    o = jax.jit(functools.partial(attention_dense, window=window))(q, k, v, segment_ids_BT=seg)
    ref = _numpy_reference(q, k, v, window, None if seg is None else np.asarray(seg))
    # float32 JAX vs float64 numpy: only float32 rounding separates them.
    np.testing.assert_allclose(np.asarray(o), ref, atol=2e-6, rtol=0)


FWD_CASES = [
    # T, block_q, block_k, window, G, n_docs: T a multiple of the blocks or not, block_q != block_k, W in
    # {1, 5, 16, 17, T, T + 3, None}, packed documents, GQA groups 1/2/4, and blocks clamped for tiny T.
    (64, 16, 16, 16, 1, 1),
    (64, 16, 32, 17, 4, 3),
    (64, 32, 16, 64, 2, 2),
    (37, 16, 16, 1, 2, 1),
    (37, 16, 16, 40, 4, 3),
    (37, 16, 32, 5, 2, 2),
    (37, 16, 16, None, 1, 3),
    (100, 16, 16, 100, 2, 3),
    (100, 32, 16, 103, 1, 1),
    (100, 16, 32, None, 4, 2),
    (100, 32, 16, 5, 2, 1),
    (5, 512, 512, None, 2, 2),
    (37, 512, 16, 3, 2, 1),
]


@pytest.mark.parametrize("T,block_q,block_k,window,G,n_docs", FWD_CASES)
def test_blocked_matches_dense(T, block_q, block_k, window, G, n_docs):
    q, k, v, seg = _inputs(1, T, G, n_docs=n_docs)
    o = _fwd("xla", window, block_q, block_k)(q, k, v, seg)
    o_ref = _fwd("dense", window)(q, k, v, seg)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert _max_abs(o, o_ref) <= FWD_ATOL


GRAD_CASES = [
    (37, 16, 16, 5, 2, 2),
    (64, 16, 32, 17, 4, 1),
    (100, 32, 16, None, 1, 3),
]


@pytest.mark.parametrize("T,block_q,block_k,window,G,n_docs", GRAD_CASES)
def test_blocked_grads_match_dense(T, block_q, block_k, window, G, n_docs):
    q, k, v, seg = _inputs(2, T, G, n_docs=n_docs)
    w_BTNH = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    grads = _grad("xla", window, w_BTNH, block_q, block_k)(q, k, v, seg)
    grads_ref = _grad("dense", window, w_BTNH)(q, k, v, seg)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        assert _max_abs(g, g_ref) <= GRAD_RTOL * max(1.0, float(jnp.max(jnp.abs(g_ref))))


def test_bf16_blocked_vs_dense_fp32():
    T, window = 100, 17
    q, k, v, seg = _inputs(4, T, 2, dtype=jnp.bfloat16, n_docs=2)
    o = _fwd("xla", window)(q, k, v, seg)
    assert o.dtype == jnp.bfloat16
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref = _fwd("dense", window)(*up, seg)
    assert _max_abs(o, o_ref) <= BF16_ATOL
    # Gradients: bf16 blocked vs float32 dense on the same values, relative to the gradient scale.
    w_BTNH = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    grads = _grad("xla", window, w_BTNH)(q, k, v, seg)
    grads_ref = _grad("dense", window, w_BTNH)(*up, seg)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == jnp.bfloat16
        assert _max_abs(g, g_ref) <= 3e-2 * float(jnp.max(jnp.abs(g_ref)))


@pytest.mark.parametrize("impl", ["xla", "dense"])
@pytest.mark.parametrize("window,i", [(8, 20), (17, 32), (1, 9)])
def test_window_edge_exact(impl, window, i):
    # Blocks of 16 put the window edge inside a block (i=20, W=8) and on a skipped block boundary (i=32, W=17).
    q, k, v, _ = _inputs(6, 40, 2)
    f = _fwd(impl, window)
    o = f(q, k, v, None)
    inside, outside = i - (window - 1), i - window
    o_in = f(q, k, v.at[:, inside].add(1.0), None)
    assert _max_abs(o_in[:, i], o[:, i]) > 1e-3
    o_out = f(q, k.at[:, outside].add(3.0), v.at[:, outside].add(1.0), None)
    np.testing.assert_array_equal(np.asarray(o_out[:, i]), np.asarray(o[:, i]))


def test_padded_keys_invisible():
    # T=37 padded to 48: garbage (NaN keys, huge values) in the padded positions must not reach any real query.
    T, T_pad, window = 37, 48, None
    q, k, v, _ = _inputs(7, T, 2)
    pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))
    blocked = jax.jit(lambda q, k, v: attn._attention_blocked(q, k, v, None, window, 16, 16))
    clean = blocked(*(jnp.pad(x, pad) for x in (q, k, v)))
    k_bad = jnp.pad(k, pad, constant_values=jnp.nan)
    v_bad = jnp.pad(v, pad, constant_values=1e30)
    dirty = blocked(jnp.pad(q, pad), k_bad, v_bad)
    np.testing.assert_array_equal(np.asarray(dirty[:, :T]), np.asarray(clean[:, :T]))
    assert schedule.plan(T, 16, 16) == (16, 16, T_pad)


def test_block_skipping_counts():
    local = [visited_block_pairs(T, 512, 256, 256) for T in (4096, 8192)]
    glob = [visited_block_pairs(T, None, 256, 256) for T in (4096, 8192)]
    assert 1.9 <= local[1] / local[0] <= 2.1  # O(T * W)
    assert glob[1] / glob[0] > 3.5  # O(T^2)
    for T, g in zip((4096, 8192), glob, strict=True):
        nq = T // 256
        assert g == nq * (nq + 1) // 2
    assert visited_block_pairs(4096, 4096, 256, 256) == glob[0]  # W == T behaves like global


@pytest.mark.parametrize("T,block_q,block_k,window", [(100, 16, 32, 17), (100, 32, 16, 5), (64, 16, 16, None)])
def test_block_ranges_are_tight_and_consistent(T, block_q, block_k, window):
    Q, C, T_pad = schedule.plan(T, block_q, block_k)
    nq, nk = T_pad // Q, T_pad // C
    i, j = np.arange(T_pad)[:, None], np.arange(T_pad)[None, :]
    vis = (j <= i) & ((i - j < window) if window is not None else True)
    needed = {(a, b) for a in range(nq) for b in range(nk) if vis[a * Q : (a + 1) * Q, b * C : (b + 1) * C].any()}
    by_q = set()
    for a in range(nq):
        lo, hi = attn._kv_block_range(a, Q, C, window, nk)
        # The XLA reference's index-based ranges and the kernels' closed-form schedule agree.
        assert (int(lo), int(hi)) == schedule.kv_block_range(a, Q, C, window, nk)
        by_q |= {(a, b) for b in range(int(lo), int(hi) + 1)}
    by_k = set()
    for b in range(nk):
        lo, hi = attn._q_block_range(b, Q, C, window, nq)
        assert (int(lo), int(hi)) == schedule.q_block_range(b, Q, C, window, nq)
        by_k |= {(a, b) for a in range(int(lo), int(hi) + 1)}
    assert by_q == needed == by_k
    assert visited_block_pairs(T, window, block_q, block_k) == len(needed)


def _memory(impl, T, window, grad):
    """Compiled temp + argument + output bytes of the forward or of grad w.r.t. q, k, v (B=1, N=4, K=2, H=32)."""
    q = jax.ShapeDtypeStruct((1, T, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32)

    def f(q, k, v):
        return attention(q, k, v, window=window, impl=impl, block_q=256, block_k=256)

    if grad:
        f = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
    stats = jax.jit(f).lower(q, kv, kv).compile().memory_analysis()
    assert stats is not None, "memory_analysis() unavailable on this backend"
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("window", [256, None], ids=["local", "global"])
def test_memory_linear_in_T(window, grad):
    mem = [_memory("xla", T, window, grad) for T in (2048, 4096, 8192)]
    assert mem[1] / mem[0] <= 2.3 and mem[2] / mem[1] <= 2.3, mem
    if window is None:
        return
    # The dense oracle is quadratic, so the same measurement does detect O(T^2) memory.
    dense = [_memory("dense", T, window, grad) for T in (2048, 4096)]
    assert dense[1] / dense[0] > 3, dense
    assert dense[1] > 10 * mem[1]


def _assert_same_loss_and_grads(model, model_ref, q, k, v):
    """Loss within 1e-5 relative and gradients wrt q, k, v within GRAD_RTOL of the reference's."""
    loss, grads = jax.jit(jax.value_and_grad(model, argnums=(0, 1, 2)))(q, k, v)
    loss_ref, grads_ref = jax.jit(jax.value_and_grad(model_ref, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert _max_abs(g, g_ref) <= GRAD_RTOL * max(1.0, float(jnp.max(jnp.abs(g_ref))))


def test_inside_scan_and_cond():
    # The model scans layers and picks local/global per layer with lax.cond; gradients must flow through both.
    T, window = 40, 8
    q, k, v, seg = _inputs(8, T, 2, n_docs=2)
    is_local_L = jnp.array([True, False, True])

    def model(q, k, v):
        def layer(x_BTNH, is_local):
            o = jax.lax.cond(
                is_local,
                lambda x: attention(x, k, v, window=window, segment_ids_BT=seg, impl="xla", block_q=16, block_k=16),
                lambda x: attention(x, k, v, segment_ids_BT=seg, impl="xla", block_q=16, block_k=16),
                x_BTNH,
            )
            return x_BTNH + o, None

        return jnp.sum(jax.lax.scan(layer, q, is_local_L)[0] ** 2)

    def model_ref(q, k, v):
        # Same three layers unrolled in Python with the dense oracle: no scan, no cond.
        x_BTNH = q
        for w in (window, None, window):
            x_BTNH = x_BTNH + attention_dense(x_BTNH, k, v, window=w, segment_ids_BT=seg)
        return jnp.sum(x_BTNH**2)

    _assert_same_loss_and_grads(model, model_ref, q, k, v)


def test_inside_scan_with_a_run_time_window():
    # The model's path for impl "xla": each scanned layer passes its window as a traced int32 (GLOBAL_WINDOW for a
    # global layer) instead of a lax.cond; values and gradients equal the dense oracle layer by layer.
    T, window = 40, 8
    q, k, v, seg = _inputs(10, T, 2, n_docs=2)
    windows_L = jnp.array([window, attn.GLOBAL_WINDOW, window, attn.GLOBAL_WINDOW], jnp.int32)

    def model(q, k, v):
        def layer(x_BTNH, w):
            o = attention(x_BTNH, k, v, window=w, segment_ids_BT=seg, impl="xla", block_q=16, block_k=16)
            return x_BTNH + o, None

        return jnp.sum(jax.lax.scan(layer, q, windows_L)[0] ** 2)

    def model_ref(q, k, v):
        x_BTNH = q
        for w in (window, None, window, None):
            x_BTNH = x_BTNH + attention_dense(x_BTNH, k, v, window=w, segment_ids_BT=seg)
        return jnp.sum(x_BTNH**2)

    _assert_same_loss_and_grads(model, model_ref, q, k, v)
    with pytest.raises(ValueError, match="integer scalar"):
        attention(q, k, v, window=jnp.float32(8.0), impl="xla")


def test_impl_dispatch_and_errors():
    q, k, v, seg = _inputs(9, 8, 2, n_docs=2)
    np.testing.assert_array_equal(
        np.asarray(attention(q, k, v, window=3, segment_ids_BT=seg, impl="dense")),
        np.asarray(attention_dense(q, k, v, window=3, segment_ids_BT=seg)),
    )
    with pytest.raises(ValueError, match="'xla', 'dense', 'pallas', 'splash'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
