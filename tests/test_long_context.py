"""Whole-model forwards at T = 32768 on the CPU: the blocked attention, block skipping and RoPE at long positions.

A narrow model (D 32, two layers, window 256) keeps this to about half a minute; the checks are an independent float64
reference of the last position, agreement across attention block sizes, and that stacked local layers see nothing
beyond their receptive field.

Shapes: B batch, T positions, D hidden, N query heads, K KV heads, H head dim, F MLP width, V vocab, W window.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cwm_jax.config import FULL, SLIDING, cwm_tiny
from cwm_jax.model import CwmModel

T = 32768
W = 256


def long_config(layer_types):
    """A narrow model with these layer types, window W, positions up to T."""
    return cwm_tiny(
        num_layers=len(layer_types),
        layer_types=tuple(layer_types),
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        vocab_size=128,
        sliding_window=W,
        max_position_embeddings=T,
    )


def make_model(config, block_size=512):
    """A CwmModel whose weights have std 1 / sqrt(fan_in), so attention scores are O(1) and every visible key counts.

    The default 0.02 init gives scores ~1e-3, i.e. uniform attention, under which a key too many or too few barely
    moves the output.
    """
    model = CwmModel(config, rngs=nnx.Rngs(0), attention_impl="xla", block_size=block_size)
    keys = iter(jax.random.split(jax.random.key(1), 32))
    for name, p in model.layers.items():
        if not name.endswith("norm"):
            # Stacked [L, in, ...]: the input axis follows the layer axis, except o [L, N, H, D] which reads N * H.
            fan_in = p.shape[1] * p.shape[2] if name == "o" else p.shape[1]
            p[...] = jax.random.normal(next(keys), p.shape, p.dtype) / np.sqrt(fan_in)
        else:
            p[...] = 1.0 + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype)
    model.embed[...] = jax.random.normal(next(keys), model.embed.shape)
    model.lm_head[...] = jax.random.normal(next(keys), model.lm_head.shape) / np.sqrt(config.hidden_size)
    return model


def last_hidden_fn(model):
    """Jitted (tokens [B, T], positions [B, T]) -> final hidden state of the last position [B, D]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens_BT, positions_BT):
        return nnx.merge(graphdef, state)(tokens_BT, positions_BT, return_hidden=True)[:, -1]

    return lambda tokens_BT, positions_BT: run(state, tokens_BT, positions_BT)


@pytest.fixture(scope="module")
def tokens_BT():
    return jax.random.randint(jax.random.key(2), (1, T), 0, 128, dtype=jnp.int32)


@pytest.fixture(scope="module")
def positions_BT():
    return jnp.arange(T, dtype=jnp.int32)[None]


def _rms_norm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x_TNH, pos_T, inv_freq_h):
    # Angles rounded to float32 as the model and transformers compute them; at position 32767 that rounding moves an
    # angle by up to ~2e-3 rad, far above the tolerance, so a float64 angle would test RoPE's precision, not the model.
    angles_Th = (pos_T.astype(np.float32)[:, None] * inv_freq_h[None]).astype(np.float64)
    cos_TH = np.cos(np.concatenate([angles_Th, angles_Th], axis=-1))[:, None]
    sin_TH = np.sin(np.concatenate([angles_Th, angles_Th], axis=-1))[:, None]
    half = x_TNH.shape[-1] // 2
    return x_TNH * cos_TH + np.concatenate([-x_TNH[..., half:], x_TNH[..., :half]], axis=-1) * sin_TH


def _attend(q_RNH, k_SKH, v_SKH, q_pos_R, k_pos_S, window):
    """Dense float64 attention of R query rows over S keys, masked by absolute positions."""
    G = q_RNH.shape[1] // k_SKH.shape[1]
    k_SNH, v_SNH = np.repeat(k_SKH, G, axis=1), np.repeat(v_SKH, G, axis=1)
    s_NRS = np.einsum("rnh,snh->nrs", q_RNH, k_SNH) / np.sqrt(q_RNH.shape[-1])
    vis_RS = k_pos_S[None] <= q_pos_R[:, None]
    if window is not None:
        vis_RS &= q_pos_R[:, None] - k_pos_S[None] < window
    s_NRS = np.where(vis_RS[None], s_NRS, -np.inf)
    p_NRS = np.exp(s_NRS - s_NRS.max(axis=-1, keepdims=True))
    p_NRS /= p_NRS.sum(axis=-1, keepdims=True)
    return np.einsum("nrs,snh->rnh", p_NRS, v_SNH)


def reference_last_logits(model, tokens_T):
    """Float64 logits [V] of the last position for a (global, local) model, computing only what that position needs:
    the local layer reads the last W positions of layer 0, and those read every key of the global layer 0."""
    c = model.config
    assert c.layer_types == (FULL, SLIDING)
    p = {name: np.asarray(v[...], np.float64) for name, v in model.layers.items()}
    inv_freq_h = c.rope_inv_freq()
    pos_T = np.arange(len(tokens_T))
    x_TD = np.asarray(model.embed[...], np.float64)[np.asarray(tokens_T)]
    rows = {0: slice(-W, None), 1: slice(-1, None)}  # query rows each layer must produce
    for layer, window in ((0, None), (1, W)):
        h_TD = _rms_norm(x_TD, p["attn_norm"][layer], c.rms_norm_eps)
        r = rows[layer]
        q_RNH = _rope(np.einsum("td,dnh->tnh", h_TD[r], p["q"][layer]), pos_T[r], inv_freq_h)
        k_TKH = _rope(np.einsum("td,dkh->tkh", h_TD, p["k"][layer]), pos_T, inv_freq_h)
        v_TKH = np.einsum("td,dkh->tkh", h_TD, p["v"][layer])
        o_RNH = _attend(q_RNH, k_TKH, v_TKH, pos_T[r], pos_T, window)
        x_RD = x_TD[r] + np.einsum("rnh,nhd->rd", o_RNH, p["o"][layer])
        h_RD = _rms_norm(x_RD, p["mlp_norm"][layer], c.rms_norm_eps)
        gate_RF, up_RF = h_RD @ p["gate"][layer], h_RD @ p["up"][layer]
        x_TD, pos_T = x_RD + (gate_RF / (1 + np.exp(-gate_RF)) * up_RF) @ p["down"][layer], pos_T[r]
    h_D = _rms_norm(x_TD[-1], np.asarray(model.final_norm[...], np.float64), c.rms_norm_eps)
    return h_D @ np.asarray(model.lm_head[...], np.float64)


def test_global_and_local_layers_at_32k_match_float64_reference_and_other_block_size(tokens_BT, positions_BT):
    model = make_model(long_config((FULL, SLIDING)), block_size=512)
    h_BD = last_hidden_fn(model)(tokens_BT, positions_BT)
    logits_V = np.asarray(model.logits(h_BD[:, None])[0, 0])
    assert np.isfinite(logits_V).all()

    want_V = reference_last_logits(model, tokens_BT[0])
    scale = np.abs(want_V).max()
    assert scale > 0.5  # O(1) logits: the tolerance below is meaningful
    # Measured error ~2e-7 * scale. Mutating the reference moves logits by ~4e-3 * scale for a local window of W - 1,
    # ~3e-3 * scale for a skipped KV block of the global layer and ~4e-5 * scale for one missing global key.
    np.testing.assert_allclose(logits_V, want_V, rtol=0, atol=1e-5 * scale)

    # Same parameters, other blocking: different (query block, KV block) pairs are visited and skipped.
    model_1024 = CwmModel(model.config, rngs=nnx.Rngs(0), attention_impl="xla", block_size=1024)
    nnx.update(model_1024, nnx.state(model, nnx.Param))
    h_1024_BD = last_hidden_fn(model_1024)(tokens_BT, positions_BT)
    logits_1024_V = np.asarray(model_1024.logits(h_1024_BD[:, None])[0, 0])
    np.testing.assert_allclose(logits_1024_V, logits_V, rtol=0, atol=1e-5 * scale)


def test_local_layers_at_32k_see_nothing_beyond_their_receptive_field(tokens_BT, positions_BT):
    L = 2
    model = make_model(long_config((SLIDING,) * L))
    last_hidden = last_hidden_fn(model)
    h_BD = np.asarray(last_hidden(tokens_BT, positions_BT))
    assert np.isfinite(h_BD).all()

    # Through L layers of window W the last token reads back L * (W - 1) positions; RoPE needs the absolute positions.
    field = L * (W - 1) + 1
    h_field_BD = np.asarray(last_hidden(tokens_BT[:, -field:], positions_BT[:, -field:]))
    # A different blocking of the same visible keys: only summation order differs (measured ~6e-7).
    np.testing.assert_allclose(h_field_BD, h_BD, rtol=0, atol=1e-5)
