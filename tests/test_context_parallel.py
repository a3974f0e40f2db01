"""cwm_jax.context_parallel: sharded attention against the dense oracle on the whole sequence, the zigzag layout, the
collectives each layer type compiles to, and the whole model under a `sequence` mesh against the unsharded model.

Shape legend as in cwm_jax/attention.py. conftest.py gives 8 CPU devices; meshes are sequence=n, fsdp=8/n.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax import context_parallel as cp
from cwm_jax import sharding
from cwm_jax.attention import attention_dense
from cwm_jax.config import cwm_tiny
from cwm_jax.model import CwmModel

B, T, N, K, H = 2, 64, 4, 2, 8
# Document boundaries per row: inside shards, and (row 1) exactly on the chunk boundary 16 and 32 of n = 2 and 4, so
# packed documents cross shard boundaries both ways.
CUTS = ([13, 40], [16, 45])
# fp32, relative to the largest entry of the reference: blocked vs dense differ by summation order only (~3e-7).
RTOL = 1e-5


def _inputs():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    w = rng.standard_normal((B, T, N, H)).astype(np.float32)
    seg = np.zeros((B, T), np.int32)
    for b, cuts in enumerate(CUTS):
        seg[b, cuts] = 1
    return q, k, v, w, np.cumsum(seg, axis=1).astype(np.int32)


def _loss_and_out(attend, q, k, v, seg, w):
    o = attend(q, k, v, segment_ids_BT=seg)
    return jnp.sum(o * w), o


@functools.cache
def _reference(window):
    """Dense-oracle output and (dq, dk, dv) of sum(o * w) on the whole, unsharded sequence."""
    q, k, v, w, seg = _inputs()
    attend = functools.partial(attention_dense, window=window)
    f = jax.jit(jax.grad(functools.partial(_loss_and_out, attend), argnums=(0, 1, 2), has_aux=True))
    grads, o = f(q, k, v, seg, w)
    return np.asarray(o), [np.asarray(g) for g in grads]


def _assert_close(got, ref, what):
    err = float(np.max(np.abs(np.asarray(got) - ref)))
    assert err <= RTOL * float(np.max(np.abs(ref))), (what, err)


CASES = [
    # n, layout, window: global; local with a halo (W - 1 <= piece); local beyond a piece (all-gather fallback); and
    # a halo of exactly one piece (n = 4 zigzag pieces are 8 long).
    *[(n, layout, w) for n in (2, 4) for layout in cp.LAYOUTS for w in (None, 5, 40)],
    (4, "zigzag", 9),
]


@pytest.mark.parametrize("n,layout,window", CASES)
def test_matches_dense_oracle(n, layout, window):
    q, k, v, w, seg = _inputs()
    o_ref, grads_ref = _reference(window)
    mesh = sharding.make_mesh(sequence=n, fsdp=-1)
    perm = functools.partial(cp.to_zigzag, n=n) if layout == "zigzag" else lambda x: x
    attend = functools.partial(cp.context_parallel_attention, window=window, layout=layout, block_q=8, block_k=16)
    f = jax.jit(jax.grad(functools.partial(_loss_and_out, attend), argnums=(0, 1, 2), has_aux=True))
    with jax.set_mesh(mesh):
        args = [jax.device_put(perm(x), NamedSharding(mesh, P(None, "sequence"))) for x in (q, k, v, seg, w)]
        compiled = f.lower(*args).compile()
        grads, o = compiled(*args)
    unperm = functools.partial(cp.from_zigzag, n=n) if layout == "zigzag" else lambda x: x
    _assert_close(unperm(o), o_ref, "o")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        _assert_close(unperm(g), g_ref, name)
    # Forward and backward: a halo layer moves keys with collective-permutes only, never gathers K/V.
    hlo = compiled.as_text()
    if cp.uses_halo(window, T, n, layout):
        assert "collective-permute" in hlo and "all-gather" not in hlo
    else:
        assert "all-gather" in hlo and "collective-permute" not in hlo


def test_zigzag_permutation():
    np.testing.assert_array_equal(cp.zigzag_permutation(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(cp.zigzag_permutation(4, 1), np.arange(4))
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    z = cp.to_zigzag(x, 3)
    assert isinstance(z, np.ndarray)
    np.testing.assert_array_equal(z[:, 4:8], x[:, 20:24])  # shard 0 holds chunks 0 and 5 of 4 positions
    np.testing.assert_array_equal(cp.from_zigzag(z, 3), x)
    np.testing.assert_array_equal(cp.from_zigzag(cp.to_zigzag(jnp.asarray(x), 2), 2), x)
    for n, axis in ((2, 0), (3, 0), (4, 1)):
        y = x[0] if axis == 0 else x
        perm = cp.zigzag_permutation(24, n)
        np.testing.assert_array_equal(cp.to_zigzag(y, n, axis=axis), np.take(y, perm, axis=axis))
        np.testing.assert_array_equal(cp.from_zigzag(np.take(y, perm, axis=axis), n, axis=axis), y)
    with pytest.raises(ValueError, match="T=30 is not a multiple"):
        cp.zigzag_permutation(30, 4)


def test_communicated_bytes():
    # The 32B model's shape per shard at T = 131072 on sequence = 8: a halo of W - 1 keys per piece vs 7/8 of T.
    glob = cp.communicated_bytes(1, 131072, 8, 128, 8, None, "zigzag")
    local = cp.communicated_bytes(1, 131072, 8, 128, 8, 8192, "zigzag")
    assert glob == 7 * 16384 * (2 * 8 * 128 * 2 + 4)
    assert local == 2 * 8191 * (2 * 8 * 128 * 2 + 4)
    assert cp.communicated_bytes(1, 131072, 8, 128, 8, 8192, "natural") == local // 2
    # Pieces of 8192 tokens on sequence = 16: W - 1 fits, W + 1 does not (all-gather fallback).
    assert cp.uses_halo(8192, 262144, 16, "zigzag") and not cp.uses_halo(8194, 262144, 16, "zigzag")


def test_errors():
    q = jnp.zeros((B, T, N, H))
    kv = jnp.zeros((B, T, K, H))
    with pytest.raises(ValueError, match="size > 1"):
        cp.context_parallel_attention(q, kv, kv)
    with jax.set_mesh(sharding.make_mesh(sequence=4, fsdp=-1)):
        with pytest.raises(ValueError, match="multiple of 8"):
            cp.context_parallel_attention(q[:, :60], kv[:, :60], kv[:, :60], layout="zigzag")
        with pytest.raises(ValueError, match="'natural', 'zigzag'"):
            cp.context_parallel_attention(q, kv, kv, layout="ring")
    with pytest.raises(ValueError, match="'natural', 'zigzag'"):
        CwmModel(cwm_tiny(num_layers=1), rngs=nnx.Rngs(0), sequence_layout="ring")
    # Abstract parameters suffice: the layout is checked before any is used.
    model = nnx.eval_shape(lambda: CwmModel(cwm_tiny(num_layers=1), rngs=nnx.Rngs(0), sequence_layout="zigzag"))
    tokens = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="sequence_layout='natural'"):
        model(tokens)  # no mesh
    with jax.set_mesh(sharding.make_mesh(sequence=1, fsdp=-1)), pytest.raises(ValueError, match="size > 1"):
        model(tokens)


def test_model_matches_unsharded():
    """cwm_tiny (local W = 16, last layer global) with packed documents, zigzag on sequence=2: the same logits, loss
    and gradients as the unsharded model.

    The loss is a sum over tokens, so the trainer permutes targets like the inputs and needs no inverse permutation.
    """
    cfg, n = cwm_tiny(), 2
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    targets = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    seg = _inputs()[-1]
    # RoPE positions restart at each document start.
    doc_start = np.maximum.accumulate(np.where(np.diff(seg, prepend=seg[:, :1]) != 0, np.arange(T), 0), axis=1)
    positions = (np.arange(T) - doc_start).astype(np.int32)

    def loss_and_grad(layout):
        graphdef, state = nnx.split(CwmModel(cfg, rngs=nnx.Rngs(0), block_size=8, sequence_layout=layout))

        def loss_fn(state, tokens, positions, seg, targets):
            logits = nnx.merge(graphdef, state)(tokens, positions, seg)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

        return state, jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    state, step = loss_and_grad("natural")
    (loss_ref, logits_ref), grads_ref = step(state, tokens, positions, seg, targets)

    state, step = loss_and_grad("zigzag")
    mesh = sharding.make_mesh(sequence=n, fsdp=-1)
    with jax.set_mesh(mesh):
        args = [
            jax.device_put(cp.to_zigzag(x, n), NamedSharding(mesh, P(None, "sequence")))
            for x in (tokens, positions, seg, targets)
        ]
        compiled = step.lower(state, *args).compile()
        (loss, logits), grads = compiled(state, *args)
    np.testing.assert_allclose(np.asarray(cp.from_zigzag(logits, n)), np.asarray(logits_ref), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    for name in ("q", "k", "v", "down"):
        g, g_ref = np.asarray(grads["layers"][name][...]), np.asarray(grads_ref["layers"][name][...])
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * np.abs(g_ref).max(), err_msg=name)
    # Local layers exchange halos, the global ones gather K/V.
    hlo = compiled.as_text()
    assert "collective-permute" in hlo and "all-gather" in hlo
