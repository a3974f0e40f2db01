"""The decode attention kernel (kernels/decode.py) against dense float32 attention with explicit masks; which KV blocks
it visits; Mosaic compilation for TPU; greedy generation with attention_impl="pallas" against "xla"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from cwm_jax import generate as gen
from cwm_jax.config import cwm_tiny
from cwm_jax.kernels import decode, tpu_compile
from cwm_jax.model import CwmModel

# Reads past the end of an array (the partial last KV block) return NaN in interpret mode, as unspecified memory may
# on a TPU: the kernel must mask them, never multiply them by a zero probability.
NAN_PADDING = pltpu.InterpretParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")


def _dense(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS=None, window=None):
    """Float32 oracle: `generate._masked_attention` with the visibility mask built from positions here."""
    B, S = k_BSKH.shape[:2]
    k_pos_BS = np.broadcast_to(np.arange(S), (B, S)) if k_pos_BS is None else np.asarray(k_pos_BS)
    k_pos_B1S = k_pos_BS[:, None, :]
    q_pos_BT1 = np.asarray(q_pos_BT)[:, :, None]
    vis_BTS = (k_pos_B1S >= 0) & (k_pos_B1S <= q_pos_BT1) & (q_pos_BT1 >= 0)
    if window is not None:
        vis_BTS &= k_pos_B1S > q_pos_BT1 - window
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return np.asarray(gen._masked_attention(f32(q_BTNH), f32(k_BSKH), f32(v_BSKH), jnp.asarray(vis_BTS)))


def _qkv(B, T, S, G, K=2, H=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, G * K, H))
    k, v = rng.normal(size=(2, B, S, K, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _run(*args, interpret=True, **kw):
    return np.asarray(jax.jit(functools.partial(decode.decode_attention, interpret=interpret, **kw))(*args))


def _global_positions(lengths, T):
    """The last T positions of sequences holding `lengths` tokens; -1 before position 0 and for sequence 0's first
    query (a padding row: with T = 1 sequence 0 is all padding)."""
    q_pos = np.array([np.arange(n - T, n) for n in lengths], np.int32)
    q_pos[q_pos < 0] = -1
    q_pos[0, 0] = -1
    return q_pos


@pytest.mark.parametrize("T, G", [(1, 6), (3, 2), (3, 1)])
def test_global_cache_matches_dense(T, G):
    # Different lengths per sequence; S = 40 is not a multiple of block_k = 16 (a partial last block).
    lengths, S = (2, 17, 40), 40
    q, k, v = _qkv(3, T, S, G, seed=T * 10 + G)
    q_pos = _global_positions(lengths, T)
    got = _run(q, k, v, jnp.asarray(q_pos), block_k=16, interpret=NAN_PADDING if G == 6 else True)
    np.testing.assert_allclose(got, _dense(q, k, v, q_pos), atol=1e-5, rtol=0)
    assert not got[q_pos < 0].any()  # padding rows are exact zeros
    # A window over the global cache: blocks before the window's start are skipped too.
    got = _run(q, k, v, jnp.asarray(q_pos), window=7, block_k=16)
    np.testing.assert_allclose(got, _dense(q, k, v, q_pos, window=7), atol=1e-5, rtol=0)


def _ring(T, R=20):
    """Key positions [B, R + T] of a ring of R slots (slot = position % R) before chunks starting at 5 (ring partly
    empty), 37 (wrapped: positions not in slot order) and 20 (exactly full), then the chunk's own keys; the last query
    of sequence 0 is padding (position -1, never written)."""
    k_pos, q_pos = [], []
    for start in (5, 37, 20):
        ring = np.full(R, -1, np.int32)
        for p in range(max(0, start - R), start):
            ring[p % R] = p
        chunk = np.arange(start, start + T, dtype=np.int32)
        k_pos.append(np.concatenate([ring, chunk]))
        q_pos.append(chunk)
    k_pos, q_pos = np.stack(k_pos), np.stack(q_pos)
    q_pos[0, -1] = k_pos[0, -1] = -1
    return q_pos, k_pos


@pytest.mark.parametrize("T, G", [(3, 6), (1, 1), (1, 2)])
def test_ring_with_positions_matches_dense(T, G):
    q_pos, k_pos = _ring(T)
    W, S = 12, k_pos.shape[1]  # S = 21 or 23: a partial last block of 8
    q, k, v = _qkv(3, T, S, G, seed=T * 10 + G + 5)
    got = _run(
        q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos), window=W, block_k=8, interpret=NAN_PADDING if T == 3 else True
    )
    np.testing.assert_allclose(got, _dense(q, k, v, q_pos, k_pos, window=W), atol=1e-5, rtol=0)
    assert not got[q_pos < 0].any()


def _visited_brute_force(q_pos, k_pos, S, C, window):
    """Blocks holding at least one key in [first query - W + 1, last query], per sequence, by looking at every key."""
    k_pos = np.broadcast_to(np.arange(S), q_pos.shape[:1] + (S,)) if k_pos is None else k_pos
    counts = []
    for qp, kp in zip(q_pos, k_pos, strict=True):
        qp = qp[qp >= 0]
        if not len(qp):
            counts.append(0)
            continue
        hit = (kp >= 0) & (kp <= qp.max())
        if window is not None:
            hit &= kp > qp.min() - window
        counts.append(len({s // C for s in np.flatnonzero(hit)}))
    return counts


def test_visits_only_the_blocks_the_positions_need():
    # Global cache: a block count of ceil(length / C) per sequence, and blocks past it are never read: they hold NaN.
    lengths, S, C, T = (2, 17, 40), 40, 16, 3
    q, k, v = _qkv(3, T, S, 2, seed=1)
    q_pos = _global_positions(lengths, T)
    counts = {
        window: decode.kv_blocks_visited(q_pos, num_keys=S, num_heads=4, num_kv_heads=2, window=window, block_k=C)
        for window in (None, 7)
    }
    for window, count in counts.items():
        assert np.asarray(count)[:, 0].tolist() == _visited_brute_force(q_pos, None, S, C, window)
    assert np.asarray(counts[None])[:, 0].tolist() == [1, 2, 3]  # blocks up to the last position: ceil(length / C)
    assert np.asarray(counts[7])[:, 0].tolist() == [1, 2, 2]  # window 7: 14..16 see 8..16, 37..39 see 31..39
    poisoned_k, poisoned_v = np.array(k), np.array(v)
    poisoned_k[1, 32:] = poisoned_v[1, 32:] = np.nan  # sequence 1 (17 tokens) visits blocks 0 and 1 only
    poisoned_k[2, :16] = poisoned_v[2, :16] = np.nan  # with window 7, sequence 2 starts at block 1
    poisoned_k[0, 16:] = poisoned_v[0, 16:] = np.nan
    got = _run(q, jnp.asarray(poisoned_k), jnp.asarray(poisoned_v), jnp.asarray(q_pos), window=7, block_k=C)
    np.testing.assert_allclose(got, _dense(q, k, v, q_pos, window=7), atol=1e-5, rtol=0)

    # Ring: blocks whose keys are all empty or outside the window are skipped (sequence 0's ring is mostly empty).
    q_pos, k_pos = _ring(1)
    S, C, W = k_pos.shape[1], 8, 12
    counts = decode.kv_blocks_visited(q_pos, k_pos, num_keys=S, num_heads=2, num_kv_heads=2, window=W, block_k=C)
    assert np.asarray(counts)[:, 0].tolist() == _visited_brute_force(q_pos, k_pos, S, C, W) == [0, 3, 2]
    q, k, v = _qkv(3, 1, S, 1, seed=2)
    poisoned_k, poisoned_v = np.array(k), np.array(v)
    poisoned_k[2, :8] = poisoned_v[2, :8] = np.nan  # position 20 with W = 12 sees 9..20: slots 0..7 hold 0..7
    got = _run(
        q, jnp.asarray(poisoned_k), jnp.asarray(poisoned_v), jnp.asarray(q_pos), jnp.asarray(k_pos), window=W, block_k=C
    )
    np.testing.assert_allclose(got, _dense(q, k, v, q_pos, k_pos, window=W), atol=1e-5, rtol=0)


def test_long_cache_reads_only_the_filled_blocks():
    # A 131072-slot cache holding 1000 tokens: 2 blocks of 512 are read; everything after them is NaN.
    S, n = 131072, 1000
    q, k, v = _qkv(1, 1, n, 1, K=1, H=8, seed=3)
    q_pos = jnp.asarray([[n - 1]], jnp.int32)
    assert decode.kv_blocks_visited(q_pos, num_keys=S, num_heads=1, num_kv_heads=1).tolist() == [[2]]
    pad = ((0, 0), (0, S - n), (0, 0), (0, 0))
    k_long, v_long = (jnp.pad(x, pad, constant_values=np.nan).at[:, n:1024].set(0.0) for x in (k, v))
    got = _run(q, k_long, v_long, q_pos)
    np.testing.assert_allclose(got, _dense(q, k, v, q_pos), atol=1e-5, rtol=0)


def test_layer_stack_and_bf16():
    # A stack of layer caches with a traced layer index reads that layer, like a scanned model.
    lengths, S, T = (2, 17, 40), 40, 1
    q_pos = jnp.asarray(_global_positions(lengths, T))
    q, _, _ = _qkv(3, T, S, 6, seed=4)
    _, k_LBSKH, v_LBSKH = _qkv(3, T, S, 6, seed=5)
    k_LBSKH, v_LBSKH = (jnp.stack([x, x[::-1], 2 * x]) for x in (k_LBSKH, v_LBSKH))
    got = np.asarray(
        jax.jit(
            lambda layer: decode.decode_attention(q, k_LBSKH, v_LBSKH, q_pos, layer=layer, block_k=16, interpret=True)
        )(jnp.int32(1))
    )
    np.testing.assert_allclose(got, _dense(q, k_LBSKH[1], v_LBSKH[1], q_pos), atol=1e-5, rtol=0)

    # bf16 inputs against the float32 oracle on the same bf16 values. Outputs are convex combinations of N(0, 1)
    # values (|o| < 4): the bf16 probabilities (2^-9 relative) and the bf16 output (2^-9 relative) leave a few bf16
    # ulps of that scale, 2e-2 at most.
    q, k, v = _qkv(3, T, S, 6, seed=6, dtype=jnp.bfloat16)
    got = _run(q, k, v, q_pos, block_k=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), _dense(q, k, v, q_pos), atol=2e-2, rtol=0)


def test_rejects_bad_shapes():
    q, k, v = _qkv(2, 1, 8, 2)
    with pytest.raises(ValueError, match="q_pos_BT must be"):
        decode.decode_attention(q, k, v, jnp.zeros((2, 3), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="k_pos_BS must be"):
        decode.decode_attention(q, k, v, jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 9), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="window must be"):
        decode.decode_attention(q, k, v, jnp.zeros((2, 1), jnp.int32), window=0, interpret=True)


@pytest.mark.skipif(not tpu_compile.has_libtpu(), reason="needs libtpu to compile for TPU")
@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_compiles_for_tpu(generation):
    # The 32B model's attention shapes: N = 48, K = 8, H = 128, bf16, an 8192-slot cache.
    B, S, N, K, H = 2, 8192, 48, 8, 128
    bf16 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    for T in (1, 8):
        q, kv, pos = bf16((B, T, N, H)), bf16((B, S, K, H)), jax.ShapeDtypeStruct((B, T), jnp.int32)
        k_pos = jax.ShapeDtypeStruct((B, S), jnp.int32)
        glob = tpu_compile.compile_for_tpu(
            lambda q, k, v, p: decode.decode_attention(q, k, v, p, block_k=512), q, kv, kv, pos, generation=generation
        )
        ring = tpu_compile.compile_for_tpu(
            lambda q, k, v, p, kp: decode.decode_attention(q, k, v, p, kp, window=8192, block_k=512),
            *(q, kv, kv, pos, k_pos),
            generation=generation,
        )
        for compiled in (glob, ring):
            # The cache goes to the kernel as it is: no temporary the size of a cache (a relayout or a pad would copy
            # K and V whole on every call).
            assert compiled.memory_analysis().temp_size_in_bytes < B * S * K * H * 2


def _greedy_logits(model, prompts, steps, max_len, chunk):
    """Prefill right-padded prompts in chunks, then `steps` greedy decode steps; all logits and tokens."""
    forward = nnx.jit(gen.forward_cached)
    B, T = len(prompts), -(-max(map(len, prompts)) // chunk) * chunk
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    positions = np.asarray(gen.prompt_positions(lengths, T))
    cache = gen.init_cache(model.config, B, max_len)
    out, last = [], np.zeros((B, model.config.vocab_size), np.float32)
    for start in range(0, T, chunk):
        pos = positions[:, start : start + chunk]
        logits, cache = forward(model, jnp.asarray(tokens[:, start : start + chunk]), jnp.asarray(pos), cache)
        logits = np.asarray(logits)
        out.append(logits[pos >= 0])
        here_BC = pos == lengths[:, None] - 1
        last = np.where(here_BC.any(1)[:, None], (logits * here_BC[..., None]).sum(1), last)
    toks = []
    for i in range(steps):
        tok = last.argmax(-1).astype(np.int32)
        toks.append(tok)
        logits, cache = forward(model, jnp.asarray(tok[:, None]), jnp.asarray((lengths + i)[:, None], jnp.int32), cache)
        last = np.asarray(logits)[:, 0]
        out.append(last)
    return np.concatenate(out), np.stack(toks, 1)


def test_generation_with_the_kernel_equals_xla():
    # Prompts longer than the window W = 8, prefilled in chunks of 5 (ring + chunk in the kernel, the ring wraps),
    # then decoded one token at a time (the kernel over the ring stack in place).
    cfg = cwm_tiny(num_layers=4, sliding_window=8, eos_token_ids=(511,))
    xla = CwmModel(cfg, rngs=nnx.Rngs(0), attention_impl="xla")
    pallas = CwmModel(cfg, rngs=nnx.Rngs(0), attention_impl="pallas")
    long_prompts = [[5, 9, 200, 3, 7, 8, 9, 10, 11, 1], [11, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14]]
    short_prompts = [[5, 9, 200], [11, 2]]  # a context of 7 < W: a ring of R = 7 slots
    for prompts, max_len, steps in ((long_prompts, 30, 12), (short_prompts, 7, 4)):
        want_logits, want_tokens = _greedy_logits(xla, prompts, steps, max_len, chunk=5)
        got_logits, got_tokens = _greedy_logits(pallas, prompts, steps, max_len, chunk=5)
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got_tokens, want_tokens)
    # The whole generate() path (prefill, on-device decode loop) gives the same greedy tokens.
    prompts = [[5, 9, 200, 3, 7], [11, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14]]
    assert gen.generate(pallas, prompts, 12, prefill_chunk=5) == gen.generate(xla, prompts, 12, prefill_chunk=5)
