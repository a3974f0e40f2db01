"""The decoder against transformers' PyTorch CWM: logits, gradients, bf16, packing, RoPE frequencies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cwm_jax import hf
from cwm_jax.config import FULL, SLIDING, cwm_32b, cwm_tiny
from cwm_jax.model import CwmModel

T = 30  # >= 3 x the window of 8 in the first case; not a multiple of the block size 8 used below


def _tokens(vocab, batch=2, length=T, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, size=(batch, length))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


CASES = {
    # GQA ratio 1, window < T (T = 3.75 W), last layer global as in the release.
    "gqa1_window_lt_T": dict(
        num_attention_heads=4, num_key_value_heads=4, sliding_window=8, layer_types=[FULL, SLIDING, SLIDING, FULL]
    ),
    # GQA ratio 2, window == T, transformers' fallback pattern (no layer_types in config.json).
    "gqa2_window_eq_T": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=T),
    # GQA ratio 4, window > T, five layers so the pattern does not divide the depth.
    "gqa4_window_gt_T": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=2 * T,
        num_hidden_layers=5,
        layer_types=[FULL, SLIDING, SLIDING, SLIDING, FULL],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_fp32(hf_model_factory, case):
    folder, torch_model = hf_model_factory(initializer_range=0.1, **CASES[case])
    model = hf.load_hf(folder, block_size=8)
    assert model.config.layer_types == tuple(torch_model.config.layer_types)
    ids = _tokens(model.config.vocab_size)
    ref = _torch_logits(torch_model, ids)
    out = np.asarray(model(jnp.asarray(ids)))
    assert out.dtype == np.float32
    # fp32 throughout on both sides; 1e-4 is the bar and leaves ~100x headroom over what we measure.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # hidden-state output plus the head on one position equals the full logits there.
    h = model(jnp.asarray(ids), return_hidden=True)
    np.testing.assert_allclose(np.asarray(model.logits(h[:, -1:])), out[:, -1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_kernel_impls_match_transformers_fp32(hf_model_factory, impl):
    """The Pallas kernels (interpret mode on this CPU) inside the whole model: same bar as the XLA reference."""
    for case in sorted(CASES):
        folder, torch_model = hf_model_factory(initializer_range=0.1, **CASES[case])
        model = hf.load_hf(folder, attention_impl=impl)
        ids = _tokens(model.config.vocab_size)
        out = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
        np.testing.assert_allclose(out, _torch_logits(torch_model, ids), atol=1e-4, rtol=0, err_msg=case)


@pytest.mark.parametrize("impl", ["xla", "pallas", "splash"])
def test_gradients_match_transformers(hf_model_factory, impl):
    # No pad token: torch's nn.Embedding(padding_idx=...) zeroes that row's gradient, a training convention of the
    # PyTorch module rather than part of the function being differentiated.
    folder, torch_model = hf_model_factory(initializer_range=0.1, pad_token_id=None, **CASES["gqa1_window_lt_T"])
    model = hf.load_hf(folder, block_size=8, attention_impl=impl)
    ids = _tokens(model.config.vocab_size, seed=1)
    targets = _tokens(model.config.vocab_size, seed=2)

    torch_model.zero_grad()
    logits = torch_model(torch.tensor(ids)).logits
    loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1))
    loss_t.backward()

    def loss_fn(m):
        lp = jax.nn.log_softmax(m(jnp.asarray(ids)), axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], axis=-1))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-6)
    grad_model = hf.model_from_params(
        model.config,
        {
            "embed": grads.embed[...],
            "final_norm": grads.final_norm[...],
            "lm_head": grads.lm_head[...],
            "layers": {name: p[...] for name, p in grads.layers.items()},
        },
    )
    ours = dict(hf.hf_state_dict(grad_model))
    worst = 0.0
    for name, p in torch_model.named_parameters():
        ref = p.grad.numpy()
        scale = np.abs(ref).max()
        err = np.abs(ours[name] - ref).max()
        worst = max(worst, err / scale)
        # fp32 on both sides; relative to the tensor's largest gradient (the error is rounding, not structure).
        assert err <= 1e-4 * scale + 1e-7, (name, err, scale)
    assert worst < 1e-4


def test_bf16_logits_close_to_fp32_reference(hf_model_factory):
    folder, torch_model = hf_model_factory(initializer_range=0.1, **CASES["gqa2_window_eq_T"])
    model = hf.load_hf(folder, param_dtype="bfloat16", block_size=8)
    assert model.embed[...].dtype == jnp.bfloat16
    ids = _tokens(model.config.vocab_size)
    ref = _torch_logits(torch_model, ids)
    out = np.asarray(model(jnp.asarray(ids)))
    assert out.dtype == np.float32
    # bf16 weights and activations (8 mantissa bits) against the fp32 reference: what holds here is a max abs error
    # of a few percent of the logit scale and the same top-1 token almost everywhere.
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 0.05 * scale
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_packed_segments_equal_separate_documents():
    cfg = cwm_tiny(sliding_window=4)
    model = CwmModel(cfg, rngs=nnx.Rngs(0), block_size=8)
    a, b = _tokens(cfg.vocab_size, 1, 13, seed=3), _tokens(cfg.vocab_size, 1, 11, seed=4)
    packed = jnp.asarray(np.concatenate([a, b], axis=1))
    seg = jnp.asarray([[1] * 13 + [2] * 11])
    pos = jnp.asarray([list(range(13)) + list(range(11))])
    out = np.asarray(model(packed, positions_BT=pos, segment_ids_BT=seg))
    alone_a = np.asarray(model(jnp.asarray(a)))
    alone_b = np.asarray(model(jnp.asarray(b)))
    np.testing.assert_allclose(out[:, :13], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 13:], alone_b, atol=1e-5, rtol=0)
    # Without segment ids the second document sees the first: the check above can fail.
    mixed = np.asarray(model(packed, positions_BT=pos))
    assert np.abs(mixed[:, 13:] - alone_b).max() > 1e-3


def _llama3_inv_freq_float64(head_dim, theta, factor, low, high, orig):
    out = []
    for j in range(head_dim // 2):
        f = theta ** (-2 * j / head_dim)
        wl = 2 * math.pi / f
        if wl > orig / low:
            f = f / factor
        elif wl >= orig / high:
            s = (orig / wl - low) / (high - low)
            f = (1 - s) * f / factor + s * f
        out.append(f)
    return np.array(out)


def test_rope_frequencies_match_transformers_llama3():
    cfg = cwm_32b()
    ours = cfg.rope_inv_freq()
    exact = _llama3_inv_freq_float64(128, 1e6, 16.0, 1.0, 4.0, 8192)
    # Ours are the float64 values rounded once to fp32: within half an fp32 ulp (6e-8 relative) of the exact ones.
    np.testing.assert_allclose(ours, exact, rtol=6.5e-8, atol=0)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.CwmConfig(), "cpu")
    # transformers computes in fp32; its smoothed band accumulates up to ~3e-7 relative error (measured 2.75e-7).
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=4e-7, atol=0)
    # The scaling is exercised: low frequencies are divided by 16, high ones kept.
    assert ours[0] == 1.0 and np.isclose(ours[-1], exact[-1]) and exact[-1] < 1e6 ** (-126 / 128) / 15


def test_remat_and_dense_impl_give_the_same_function():
    cfg = cwm_tiny(num_layers=3, layer_types=(FULL, SLIDING, FULL), sliding_window=5)
    ids = jnp.asarray(_tokens(cfg.vocab_size, 1, 21, seed=5))

    def loss_and_grads(**kwargs):
        model = CwmModel(cfg, rngs=nnx.Rngs(7), block_size=8, **kwargs)
        loss, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(ids) ** 2)))(model)
        return float(loss), grads.layers["q"][...]

    loss, g = loss_and_grads()
    for kwargs in (dict(remat="full"), dict(remat="dots"), dict(attention_impl="dense")):
        loss_k, g_k = loss_and_grads(**kwargs)
        assert loss_k == pytest.approx(loss, rel=1e-6), kwargs
        np.testing.assert_allclose(
            np.asarray(g_k), np.asarray(g), atol=1e-6 * float(jnp.abs(g).max()), err_msg=str(kwargs)
        )
    with pytest.raises(ValueError, match="remat"):
        CwmModel(cfg, rngs=nnx.Rngs(0), remat="some")


def test_parameters_carry_logical_axes():
    model = CwmModel(cwm_tiny(), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    axes = {"/".join(map(str, path)): v.get_metadata()["logical_axes"] for path, v in nnx.to_flat_state(state)}
    assert axes["layers/q"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embed"] == ("vocab", "embed") and axes["lm_head"] == ("embed", "vocab")
    assert all(len(a) == v.ndim for a, (_, v) in zip(axes.values(), nnx.to_flat_state(state), strict=True))
