"""The TPU flash-attention kernel (kernels/flash_tpu.py) and the shared block schedule (kernels/schedule.py).

Numbers come from Pallas' TPU interpreter on the CPU, against the dense float32 oracle; layouts come from Mosaic
itself: every kernel configuration below is also compiled ahead of time for v5e, v5p and v6e with libtpu.
"""

import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from cwm_jax import attention as attn
from cwm_jax import sharding
from cwm_jax.kernels import flash_tpu, schedule, tpu_compile

# ---------------------------------------------------------------------------------------------- the block schedule


def _brute_force_pairs(T_pad, Q, C, window):
    """Pairs holding at least one visible (query, key) pair, from the full T x T visibility (the test's oracle)."""
    i, j = np.arange(T_pad)[:, None], np.arange(T_pad)[None, :]
    vis = (j <= i) if window is None else (j <= i) & (i - window < j)
    return int(vis.reshape(T_pad // Q, Q, T_pad // C, C).any(axis=(1, 3)).sum())


@pytest.mark.parametrize("block_q, block_k", [(8, 8), (16, 16), (8, 32), (32, 8), (16, 128), (128, 128)])
def test_visit_counts_equal_brute_force(block_q, block_k):
    for T, W in itertools.product([1, 7, 64, 100, 129, 256, 300], [None, 1, 5, 8, 16, 33, 64, 128, 200, 512]):
        Q, C, T_pad = schedule.plan(T, block_q, block_k)
        counts = schedule.visit_counts(T, W, block_q, block_k)
        brute = _brute_force_pairs(T_pad, Q, C, W)
        assert counts.forward == counts.dq == counts.dkv == brute, (T, W, block_q, block_k)
        assert counts.forward <= counts.grid == (T_pad // Q) * (T_pad // C)


@pytest.mark.parametrize("block", [2, 8, 16, 128])
def test_visit_count_closed_form(block):
    for n, w in itertools.product([1, 2, 5, 16], [1, 2, 3, 8, 20]):
        T, W = n * block, w * block
        assert schedule.visit_counts(T, W, block, block).forward == schedule.closed_form_pairs(T, W, block), (T, W)
    with pytest.raises(ValueError, match="divide"):
        schedule.closed_form_pairs(100, 24, block=16)


def test_ranges_agree_for_ints_numpy_and_traced_scalars():
    Q, C, W, nq, nk = 16, 32, 40, 12, 6
    traced_kv = jax.jit(lambda i: schedule.kv_block_range(i, Q, C, W, nk))
    traced_q = jax.jit(lambda j: schedule.q_block_range(j, Q, C, W, nq))
    lo_n, hi_n = schedule.kv_block_range(np.arange(nq), Q, C, W, nk)
    for qi in range(nq):
        lo, hi = schedule.kv_block_range(qi, Q, C, W, nk)
        assert (lo, hi) == (lo_n[qi], hi_n[qi]) == tuple(int(x) for x in traced_kv(jnp.int32(qi)))
    for kj in range(nk):
        lo, hi = schedule.q_block_range(kj, Q, C, W, nq)
        assert (lo, hi) == tuple(int(x) for x in traced_q(jnp.int32(kj)))


def test_pair_table_rows_and_mask_flags():
    T_pad, Q, C, W = 256, 32, 64, 100
    i, j = np.arange(T_pad)[:, None], np.arange(T_pad)[None, :]
    vis = (j <= i) & (i - W < j)
    for by in ("q", "k"):
        t = schedule.pair_table(T_pad, Q, C, W, by=by)
        row = t.q_block if by == "q" else t.k_block
        # Rows are contiguous, first/last mark their ends, and each row's pairs are consecutive blocks.
        starts = np.flatnonzero(np.diff(row, prepend=-1))
        assert np.array_equal(np.flatnonzero(t.first), starts)
        assert np.array_equal(np.flatnonzero(t.last), np.append(starts[1:] - 1, len(row) - 1))
        for qb, kb, m in zip(t.q_block, t.k_block, t.needs_mask, strict=True):
            block = vis[qb * Q : (qb + 1) * Q, kb * C : (kb + 1) * C]
            assert block.any() and bool(m) == (not block.all()), (by, qb, kb)


# ---------------------------------------------------------------------------------------------- numbers


def _inputs(B, T, N, K, H, segments, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
    seg = jnp.sort(jax.random.randint(ks[3], (B, T), 0, 4), axis=1) if segments else None
    do = jax.random.normal(ks[4], (B, T, N, H), jnp.float32).astype(dtype)
    return q, k, v, seg, do


def _dense_lse(q, k, window, seg):
    """Logsumexp [B, N, T] of the dense scaled scores, straight from the definition."""
    B, T, N, H = q.shape
    K = k.shape[2]
    s = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, N // K, H), k) * H**-0.5
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    vis = (j <= i) if window is None else (j <= i) & (i - window < j)
    vis = vis[None] if seg is None else vis[None] & (seg[:, :, None] == seg[:, None, :])
    s = jnp.where(vis[:, None, None], s, -jnp.inf)
    return jax.nn.logsumexp(s, axis=-1).reshape(B, N, T)


def _check(B, T, N, K, H, window, segments, block_q, block_k, interpret=True):
    q, k, v, seg, do = _inputs(B, T, N, K, H, segments)

    def ours(q, k, v):
        return flash_tpu.flash_attention(
            q,
            k,
            v,
            window=window,
            segment_ids_BT=seg,
            block_q=block_q,
            block_k=block_k,
            interpret=interpret,
            return_lse=True,
        )

    (o, lse), vjp = jax.vjp(ours, q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: attn.attention_dense(q, k, v, window=window, segment_ids_BT=seg), q, k, v)
    # float32 on both sides (exact float32 matmuls on the CPU): the bars, 1e-5 forward and 1e-4 gradients.
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(_dense_lse(q, k, window, seg)), atol=1e-5, rtol=0)
    for ours_g, ref_g, name in zip(vjp((do, jnp.zeros_like(lse))), ref_vjp(do), "qkv", strict=True):
        np.testing.assert_allclose(np.asarray(ours_g), np.asarray(ref_g), atol=1e-4, rtol=0, err_msg=f"d{name}")


# Each line names what it covers; block_k is 128 (the TPU lane width), block_q 8..32 so windows fall below, on and
# above both block sizes.
CASES = {
    "causal_gqa2_T_not_multiple": dict(B=2, T=200, N=4, K=2, H=64, window=None, segments=False, block_q=32),
    "window_below_block_k_gqa6": dict(B=1, T=256, N=6, K=1, H=64, window=64, segments=False, block_q=16),
    "window_equal_block_k": dict(B=1, T=384, N=2, K=2, H=64, window=128, segments=False, block_q=32),
    "window_not_multiple_segments": dict(B=2, T=300, N=6, K=1, H=64, window=200, segments=True, block_q=16),
    "window_ge_T_head_dim_128": dict(B=1, T=160, N=4, K=2, H=128, window=500, segments=False, block_q=32),
    "gqa1_window_below_block_q_segments": dict(B=1, T=256, N=2, K=2, H=128, window=5, segments=True, block_q=32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_lse_and_gradients_match_dense_fp32(case):
    _check(**CASES[case], block_k=128)


@st.composite
def _shapes(draw):
    G = draw(st.sampled_from([1, 2, 6]))
    K = draw(st.sampled_from([1, 2])) if G < 6 else 1
    T = draw(st.integers(9, 300))
    block_q = draw(st.sampled_from([8, 16, 32]))
    window = draw(st.one_of(st.none(), st.integers(1, 2 * T)))
    return dict(
        B=draw(st.integers(1, 2)),
        T=T,
        N=G * K,
        K=K,
        H=draw(st.sampled_from([64, 128])),
        window=window,
        segments=draw(st.booleans()),
        block_q=block_q,
    )


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True, print_blob=True)
@hypothesis.given(_shapes())
def test_random_shapes_match_dense(shape):
    _check(**shape, block_k=128)


def test_agrees_with_splash():
    """Our TPU kernel and JAX's splash kernel (both interpreted) on the same random inputs: outputs and gradients."""
    from cwm_jax.kernels import splash

    q, k, v, seg, do = _inputs(1, 256, 6, 2, 128, True, seed=5)
    fns = {
        "ours": lambda q, k, v: flash_tpu.flash_attention(
            q, k, v, window=100, segment_ids_BT=seg, block_q=32, block_k=128, interpret=True
        ),
        "splash": lambda q, k, v: splash.splash_attention(
            q, k, v, window=100, segment_ids_BT=seg, block_q=128, block_k=128, interpret=True
        ),
    }
    (o1, vjp1), (o2, vjp2) = (jax.vjp(f, q, k, v) for f in fns.values())
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), atol=1e-5, rtol=0)
    for a, b in zip(vjp1(do), vjp2(do), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_bf16_close_to_float32_oracle():
    q, k, v, seg, do = _inputs(1, 256, 6, 1, 128, True, dtype=jnp.bfloat16)
    o = flash_tpu.flash_attention(q, k, v, window=100, segment_ids_BT=seg, block_q=32, block_k=128, interpret=True)
    ref = attn.attention_dense(*(x.astype(jnp.float32) for x in (q, k, v)), window=100, segment_ids_BT=seg)
    # bf16 inputs, float32 statistics: the error is the bf16 rounding of P before the PV matmul and of the output,
    # ~2^-8 relative to |o| <= max |v| ~ 4; 2e-2 is a few bf16 ulps at that scale.
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o.astype(jnp.float32)), np.asarray(ref), atol=2e-2, rtol=0)


def test_race_detector_and_grid_steps():
    """Pallas' TPU interpreter with its race detector finds no race, and the kernel's grid runs exactly the pairs of
    the schedule (one grid point per visited pair and (batch, KV head))."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # races_found lives here

    steps = []

    def record(token, point, core):
        steps.append(tuple(int(i) for i in point))
        return token  # the interpreter threads an ordering token through the callback

    params = pltpu.InterpretParams(detect_races=True, grid_point_recorder=record)
    q, k, v, seg, do = _inputs(1, 256, 4, 2, 64, True)
    o, vjp = jax.vjp(
        lambda q, k, v: flash_tpu.flash_attention(
            q, k, v, window=64, segment_ids_BT=seg, block_q=32, block_k=128, interpret=params
        ),
        q,
        k,
        v,
    )
    jax.block_until_ready(vjp(do))
    assert tpu_interpreter.races is not None and not tpu_interpreter.races.races_found
    counts = flash_tpu.visit_counts(256, 64, 32, 128)
    # forward + dK/dV + dQ, each over B x K = 2 (batch, KV head) rows of the grid.
    assert len(steps) == 2 * (counts.forward + counts.dkv + counts.dq)


def _pallas_costs(fn, *args):
    """The `pl.CostEstimate` of every pallas_call in fn's jaxpr (backward passes included when fn differentiates)."""
    costs = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                costs.append((eqn.params["name"], eqn.params["cost_estimate"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return costs


def test_cost_estimate_counts_visited_pairs_only():
    q, k, v, _, do = _inputs(1, 512, 6, 2, 64, False)

    def fwd_bwd(q, k, v):
        o, vjp = jax.vjp(
            lambda q, k, v: flash_tpu.flash_attention(q, k, v, window=128, block_q=64, block_k=128, interpret=True),
            q,
            k,
            v,
        )
        return vjp(do)

    costs = dict(_pallas_costs(fwd_bwd, q, k, v))
    pairs = flash_tpu.visit_counts(512, 128, 64, 128)
    assert pairs.forward < (512 // 64) * (512 // 128)
    unit = 2 * 64 * 128 * 64 * 6  # 2 flops x Q x C x H per pair, for each of the 6 query heads
    assert costs["cwm_flash_fwd"].flops == 2 * unit * pairs.forward  # S = QK^T and PV
    assert costs["cwm_flash_bwd_dkv"].flops == 4 * unit * pairs.dkv  # S, dP, dV, dK
    assert costs["cwm_flash_bwd_dq"].flops == 3 * unit * pairs.dq  # S, dP, dQ
    assert costs["cwm_flash_fwd"].transcendentals == 64 * 128 * 6 * pairs.forward


def test_bad_arguments_name_the_problem():
    q, k, v, _, _ = _inputs(1, 64, 4, 2, 64, False)
    with pytest.raises(ValueError, match="block_k=64: the TPU kernel needs a power of two >= 128"):
        flash_tpu.flash_attention(q, k, v, block_q=8, block_k=64, interpret=True)
    with pytest.raises(ValueError, match="block_q=12"):
        flash_tpu.flash_attention(q, k, v, block_q=12, block_k=128, interpret=True)
    with pytest.raises(ValueError, match="GQA"):
        flash_tpu.flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), interpret=True)
    with pytest.raises(ValueError, match="window"):
        flash_tpu.flash_attention(q, k, v, window=0, interpret=True)


def test_default_blocks_per_generation():
    assert flash_tpu.default_blocks("v5e") == flash_tpu.DEFAULT_BLOCKS["v5e"]
    assert flash_tpu.default_blocks("v9") == flash_tpu.FALLBACK_BLOCKS
    assert flash_tpu.tpu_generation(jax.devices("cpu")[0]) is None


# ---------------------------------------------------------------------------------------------- dispatch and mesh


def test_attention_entry_point_dispatches_to_the_kernel():
    q, k, v, seg, _ = _inputs(2, 40, 4, 2, 8, True)
    ref = attn.attention(q, k, v, window=7, segment_ids_BT=seg, impl="dense")
    out = attn.attention(q, k, v, window=7, segment_ids_BT=seg, impl="pallas")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'xla', 'dense', 'pallas', 'splash'"):
        attn.attention(q, k, v, impl="flash")


def test_kernel_runs_per_shard_under_a_mesh():
    """Under an fsdp x tensor mesh the kernel runs in shard_map (batch over fsdp, heads over tensor): same numbers."""
    q, k, v, seg, do = _inputs(4, 48, 8, 4, 16, True)

    def loss(q, k, v):
        o = attn.attention(q, k, v, window=9, segment_ids_BT=seg, impl="pallas")
        return jnp.sum(o * do), o

    (_, ref), ref_g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, out), grads = f(q, k, v)
        text = f.lower(q, k, v).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    for a, b in zip(grads, ref_g, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- Mosaic compilation

needs_libtpu = pytest.mark.skipif(not tpu_compile.has_libtpu(), reason="libtpu not installed (pip install -e .[tpu])")


def _fwd_bwd(window, segments, block_q, block_k):
    def f(q, k, v, seg):
        o, vjp = jax.vjp(
            lambda q, k, v: flash_tpu.flash_attention(
                q, k, v, window=window, segment_ids_BT=seg if segments else None, block_q=block_q, block_k=block_k
            ),
            q,
            k,
            v,
        )
        return vjp(o)

    return f


def _abstract(B, T, N, K, H, dtype):
    return (
        jax.ShapeDtypeStruct((B, T, N, H), dtype),
        jax.ShapeDtypeStruct((B, T, K, H), dtype),
        jax.ShapeDtypeStruct((B, T, K, H), dtype),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    )


@needs_libtpu
@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_test_configurations_compile_for_tpu(generation):
    """Every configuration of the numeric tests above (float32 and bf16) compiles with Mosaic, forward and backward."""
    configs = [dict(c, block_k=128) for c in CASES.values()]
    for c in configs:
        for dtype in (jnp.float32, jnp.bfloat16):
            f = _fwd_bwd(c["window"], c["segments"], c["block_q"], c["block_k"])
            tpu_compile.compile_for_tpu(
                f, *_abstract(c["B"], c["T"], c["N"], c["K"], c["H"], dtype), generation=generation
            )


@needs_libtpu
@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_32b_shapes_compile_with_default_blocks(generation):
    """The 32B model's attention (48 / 8 heads, head_dim 128, bf16) with this generation's default blocks: local and
    global layers, forward and backward, with segment ids; the compiler's cost analysis sees the kernel's FLOPs."""
    bq, bk = flash_tpu.DEFAULT_BLOCKS[generation]
    for window, segments in ((8192, True), (None, False)):
        compiled = tpu_compile.compile_for_tpu(
            _fwd_bwd(window, segments, bq, bk), *_abstract(1, 16384, 48, 8, 128, jnp.bfloat16), generation=generation
        )
        counts = flash_tpu.visit_counts(16384, window, bq, bk)
        # forward 2, dK/dV 4 and dQ 3 matmuls of 2 x Q x C x H flops per visited pair and query head.
        kernel_flops = 2 * 48 * bq * bk * 128 * (2 * counts.forward + 4 * counts.dkv + 3 * counts.dq)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert cost["flops"] >= kernel_flops
        assert cost["flops"] < 1.2 * kernel_flops  # the kernels' estimate dominates; nothing counts the dense grid
