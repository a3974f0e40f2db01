"""attention_impl="splash": JAX's splash kernel behind our conventions, against the dense oracle (interpret mode).

Splash's interpret mode is slow on the CPU, so the numeric cases are few and short (T <= 256), each covering several
features: GQA G = 1, 2, 6, head dims 64 and 128, windows and T that are not multiples of 128, segments.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwm_jax.attention import attention_dense
from cwm_jax.kernels import schedule, splash
from cwm_jax.kernels.splash import splash_attention, splash_plan, splash_visits
from cwm_jax.kernels.tpu_compile import compile_for_tpu, has_libtpu


def _inputs(B, T, N, K, H, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, N, H), jnp.float32)
    return q, k, v, do


def _segments(B, T, seed=0):
    """Sorted random document ids per row (packed sequences), a few documents each."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(1, T, (B, 3)), axis=1)
    return jnp.asarray((np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


def _value_and_grads(fn, q, k, v, do):
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do.astype(o.dtype))


CASES = [
    # B, T, N, K, H, window, segments, blocks: causal, G=2, H=64, two query blocks against one KV block (and back).
    (1, 256, 4, 2, 64, None, False, (128, 256)),
    # T and W not multiples of 128 (padding to 256, a window across block edges), G=6, H=128.
    (1, 200, 6, 1, 128, 50, False, (128, 128)),
    # Packed documents with a window, G=1, batch 2 (vmapped), T not a multiple of 128.
    (2, 160, 2, 2, 64, 70, True, (128, 128)),
]


@pytest.mark.parametrize("B,T,N,K,H,window,segments,blocks", CASES)
def test_forward_and_gradients_match_dense_float32(B, T, N, K, H, window, segments, blocks):
    q, k, v, do = _inputs(B, T, N, K, H)
    seg = _segments(B, T) if segments else None
    block_q, block_k = blocks
    ours = functools.partial(
        splash_attention, window=window, segment_ids_BT=seg, block_q=block_q, block_k=block_k, interpret=True
    )
    dense = functools.partial(attention_dense, window=window, segment_ids_BT=seg)
    o, grads = _value_and_grads(ours, q, k, v, do)
    o_ref, grads_ref = _value_and_grads(dense, q, k, v, do)
    assert o.shape == (B, T, N, H) and o.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(o) - np.asarray(o_ref)).max(), 1e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        err = np.abs(np.asarray(g) - np.asarray(g_ref)).max()
        assert err < 1e-4, f"d{name} max abs error {err}"


def test_forward_bf16_matches_float32_oracle_on_rounded_inputs():
    q, k, v, _ = _inputs(1, 128, 4, 2, 128, dtype=jnp.bfloat16, seed=1)
    o = splash_attention(q, k, v, window=40, block_q=128, block_k=128, interpret=True)
    ref = attention_dense(*(x.astype(jnp.float32) for x in (q, k, v)), window=40)
    assert o.dtype == jnp.bfloat16
    # |o| < ~3 here, where a bf16 ulp is 2 ** -6; the output rounding costs half an ulp and the bf16 rounding of the
    # pre-scaled q (H ** -0.5 is not a power of two at H = 128) moves logits by ~2 ** -9 relative: allow 2 ulps.
    err = np.abs(np.asarray(o.astype(jnp.float32)) - np.asarray(ref)).max()
    assert err < 2 * 2.0**-6, err


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    T=st.integers(1, 2048),
    window=st.one_of(st.none(), st.integers(1, 2100)),
    block_q=st.sampled_from([128, 256, 512]),
    block_k=st.sampled_from([128, 256, 512]),
)
def test_splash_visits_equal_our_schedule_on_the_same_blocks(T, window, block_q, block_k):
    """Splash's non-empty blocks are exactly our visited pairs for its blocks; its grid never iterates fewer."""
    got = splash_visits(T, window, block_q, block_k)
    Q, C, T_pad = splash_plan(T, block_q, block_k)
    assert (got["block_q"], got["block_k"], got["padded_len"]) == (Q, C, T_pad)
    assert got["forward"] == len(schedule.pair_table(T_pad, Q, C, window, by="q"))
    assert got["dkv"] == len(schedule.pair_table(T_pad, Q, C, window, by="k"))
    assert got["grid"] >= got["forward"] and got["dkv_grid"] >= got["dkv"]
    if schedule.plan(T, block_q, block_k) == (Q, C, T_pad):  # T needs no extra padding to 128: same plan as ours
        counts = schedule.visit_counts(T, window, block_q, block_k)
        assert (got["forward"], got["dkv"]) == (counts.forward, counts.dkv)
    if window is None or window >= T_pad:
        # Causal: the last query block row sees every KV block, so the shrunk grid is the dense grid.
        assert got["grid"] == (T_pad // Q) * (T_pad // C)


@pytest.mark.parametrize("T,window,block", [(8192, 2048, 512), (8192, 1024, 256), (4096, None, 512)])
def test_splash_visits_closed_form(T, window, block):
    """A window grid shrinks to W/B + 1 columns: splash iterates T/B x (W/B + 1) steps for the closed-form pairs."""
    got = splash_visits(T, window, block, block)
    counts = schedule.visit_counts(T, window, block, block)
    assert got["forward"] == got["dkv"] == counts.forward
    if window is not None:
        assert got["forward"] == schedule.closed_form_pairs(T, window, block)
        assert got["grid"] == got["dkv_grid"] == (T // block) * (window // block + 1)


def test_splash_visits_describe_the_kernel_splash_attention_builds():
    T, window, block = 1024, 300, 256
    Q, C, T_pad = splash_plan(T, block, block)
    kernel = splash._kernel(T_pad, 4, window, Q, C, True)
    got = splash_visits(T, window, block, block)
    assert np.count_nonzero(np.asarray(kernel.fwd_mask_info.block_mask)[0]) == got["forward"]
    assert np.asarray(kernel.fwd_mask_info.block_mask)[0].size == got["grid"]
    assert np.count_nonzero(np.asarray(kernel.dkv_mask_info.block_mask)[0]) == got["dkv"]


def test_invalid_arguments_say_what_was_expected():
    q, k, v, _ = _inputs(1, 128, 4, 2, 64)
    with pytest.raises(ValueError, match="multiples of 128"):
        splash_attention(q, k, v, block_q=100, interpret=True)
    with pytest.raises(ValueError, match="window"):
        splash_attention(q, k, v, window=0, interpret=True)
    with pytest.raises(ValueError, match="GQA"):
        splash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), interpret=True)


@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_compiles_for_tpu_forward_and_backward(generation):
    """Mosaic accepts splash's blocks at a CWM-like shape (bf16, G=6, H=128, W=256, blocks 512)."""
    if not has_libtpu():
        pytest.skip("needs libtpu (pip install -e .[tpu])")
    B, T, N, K, H = 1, 1024, 12, 2, 128
    attn = functools.partial(splash_attention, window=256, block_q=512, block_k=512)

    def forward_backward(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return (o, *vjp(do))

    bf16 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    q, kv, do = bf16((B, T, N, H)), bf16((B, T, K, H)), bf16((B, T, N, H))
    forward = compile_for_tpu(attn, q, kv, kv, generation=generation)
    backward = compile_for_tpu(forward_backward, q, kv, kv, do, generation=generation)
    # One Mosaic call forward; forward (with residuals), dK/dV and dQ kernels for the gradients.
    assert forward.as_text().count('custom_call_target="tpu_custom_call"') == 1
    assert backward.as_text().count('custom_call_target="tpu_custom_call"') == 3
