"""Weight-only quantization (cwm_jax/quant.py): the arithmetic against numpy, the model and quantized checkpoints.

Quality on a trained model is in tests/test_quant_quality.py; the CLI in tests/test_quant_convert.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cwm_jax
from cwm_jax import checkpoint, quant, sharding
from cwm_jax.config import cwm_32b, cwm_tiny
from cwm_jax.hf import CheckpointError
from cwm_jax.model import CwmModel, layer_shapes


def test_config_validation_names_the_problem():
    with pytest.raises(quant.QuantError, match="bits must be 8 or 4, got 3"):
        quant.QuantConfig(bits=3)
    with pytest.raises(quant.QuantError, match="int4 needs a group size"):
        quant.QuantConfig(bits=4)
    with pytest.raises(quant.QuantError, match="group_size must be a positive integer"):
        quant.QuantConfig(bits=8, group_size=0)
    with pytest.raises(quant.QuantError, match="group_size=48 does not divide the input width 64 of weight 'q'"):
        quant.check_config(cwm_tiny(), quant.QuantConfig(bits=4, group_size=48))
    qc = quant.QuantConfig(bits=4, group_size=32, head=False)
    assert quant.QuantConfig.from_json(qc.to_json()) == qc
    assert qc.names == quant.LAYER_WEIGHTS


def _numpy_quantize(w2, bits, group):
    """Symmetric absmax quantization in float64: per output column, or per (input group, output column).

    qwix's convention: the absmax maps to qmax + 0.5 (127.5, 7.5), so the signed range's extra negative code is used
    and the largest magnitude rounds to the clipped end.
    """
    k, out = w2.shape
    g = k if group is None else group
    blocks = w2.astype(np.float64).reshape(k // g, g, out)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(blocks).max(axis=1) / (qmax + 0.5)  # [G, out]
    q = np.clip(np.round(blocks / scale[:, None]), -qmax - 1, qmax)
    return q.reshape(k, out), scale


@pytest.mark.parametrize("bits, group", [(8, None), (8, 32), (4, 32), (4, 16)])
@pytest.mark.parametrize("name", ["q", "o", "down"])
def test_quantize_matches_a_float64_absmax_reference(bits, group, name):
    shape = layer_shapes(cwm_tiny())[name]
    w = np.random.RandomState(0).normal(0, 0.02, shape).astype(np.float32)
    qc = quant.QuantConfig(bits=bits, group_size=group, scale_dtype="float32")
    qvalue, scale = quant.quantize(w, name, qc)
    k = math.prod(shape[: quant.N_IN[name]])
    ref_q, ref_scale = _numpy_quantize(w.reshape(k, -1), bits, group)
    assert (
        qvalue.shape == shape
        and qvalue.dtype == qc.qtype
        and scale.shape == quant.scale_shape(shape, quant.N_IN[name], qc)
    )
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    # Identical codes, except the absmax element of a negative group, exactly at -(qmax + 0.5): float32 lands just
    # inside (-127.49999 -> -127) where exact arithmetic rounds to -128; both are within half a step.
    ours = qvalue.reshape(k, -1).astype(np.int32)
    ratio = w.reshape(k, -1) / np.repeat(ref_scale, k // ref_scale.shape[0], axis=0)
    differ = ours != ref_q
    assert np.all(np.abs(ours - ref_q) <= 1) and np.all(np.abs(np.abs(ratio[differ]) - (2 ** (bits - 1) - 0.5)) < 1e-4)
    deq = np.asarray(quant.dequantize(jnp.asarray(qvalue), jnp.asarray(scale), quant.N_IN[name]))
    # Each value is within half a step of its group's scale.
    step = np.repeat(ref_scale, k // ref_scale.shape[0], axis=0).reshape(shape)
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-7)


def test_matmul_equals_dense_matmul_of_the_dequantized_weight():
    qc = quant.QuantConfig(bits=4, group_size=16, scale_dtype="float32")
    w = np.random.RandomState(1).normal(0, 0.02, (4, 16, 64)).astype(np.float32)  # the "o" weight: n_in = 2
    qvalue, scale = quant.quantize(w, "o", qc)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 64), jnp.float32)
    y = quant.matmul(x, quant.QWeight(jnp.asarray(qvalue), jnp.asarray(scale)), 2)
    ref = x @ quant.dequantize(jnp.asarray(qvalue), jnp.asarray(scale), 2).reshape(64, 64)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-6, rtol=0)


def test_weight_bytes_of_the_32b_model():
    c = cwm_32b()
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    NH, KH = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    linear = L * (D * NH + 2 * D * KH + NH * D + 3 * D * F)  # q, k, v, o, gate, up, down
    other = V * D + L * 2 * D + D  # embedding and norms
    assert linear + other + D * V == cwm_jax.param_count(c)
    assert quant.weight_bytes(c, None)["total"] == 2 * cwm_jax.param_count(c)
    b8 = quant.weight_bytes(c, quant.QuantConfig(bits=8))
    # int8: one byte per weight, one bf16 scale per output channel of every weight.
    scales8 = 2 * (L * (NH + 2 * KH + D + 2 * F + D) + V)
    assert b8 == dict(
        quantized=linear + D * V, scales=scales8, unquantized=2 * other, total=linear + D * V + scales8 + 2 * other
    )
    b4 = quant.weight_bytes(c, quant.QuantConfig(bits=4, group_size=128, head=False))
    scales4 = 2 * L * (D // 128 * (NH + 2 * KH) + NH // 128 * D + D // 128 * 2 * F + F // 128 * D)
    assert b4 == dict(
        quantized=linear // 2,
        scales=scales4,
        unquantized=2 * (other + D * V),
        total=linear // 2 + scales4 + 2 * (other + D * V),
    )
    # The figures: ~34 GB at int8, ~18 GB (int4 head) / ~19 GB (bf16 head) at int4.
    assert 33e9 < b8["total"] < 35e9
    assert 17.5e9 < quant.weight_bytes(c, quant.QuantConfig(bits=4, group_size=128))["total"] < 18.5e9
    assert 18.5e9 < b4["total"] < 19.5e9


def _quantized_leaves(model, qc):
    return quant.quantize_leaves(checkpoint.model_leaves(model), qc)


@pytest.fixture(scope="module")
def tiny_model():
    return CwmModel(cwm_tiny(num_layers=4, sliding_window=8), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("qc", [quant.QuantConfig(bits=8), quant.QuantConfig(bits=4, group_size=32, head=False)])
def test_quantized_checkpoint_round_trip(tmp_path, tiny_model, qc):
    dst = tmp_path / "q"
    checkpoint.save_streaming(dst, tiny_model.config, _quantized_leaves(tiny_model, qc), quant_config=qc)
    assert quant.read(dst) == qc
    stored = dict(checkpoint.iter_leaves(dst))
    assert stored[("layers", "0", "q", "qvalue")].dtype == qc.qtype
    assert (("lm_head", "qvalue") in stored) == qc.head
    model = cwm_jax.load(dst)
    assert model.quant_config == qc and model.layers["q"][...].dtype == qc.qtype
    for name in quant.LAYER_WEIGHTS:  # the stacked integers are the stored per-layer ones
        np.testing.assert_array_equal(np.asarray(model.layers[name][...][2]), stored[("layers", "2", name, "qvalue")])
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 24)))
    out, ref = np.asarray(model(tokens)), np.asarray(tiny_model(tokens))
    # The quantized model computes exactly the float model whose weights are the dequantized ones (float32 here).
    deq = {
        path: value
        if path[-1] not in qc.names
        else np.asarray(quant.dequantize(*quant.quantize(value, path[-1], qc), quant.N_IN[path[-1]]))
        for path, value in checkpoint.model_leaves(tiny_model)
    }
    checkpoint.save_streaming(tmp_path / "deq", tiny_model.config, deq.items())
    np.testing.assert_allclose(out, np.asarray(cwm_jax.load(tmp_path / "deq")(tokens)), atol=1e-5, rtol=0)
    assert np.abs(out - ref).max() > 0  # quantization did happen
    if qc.bits == 8:  # int8 per channel on random weights (std 0.02): within 2% of the logit scale
        assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
    # Restored into an fsdp x tensor mesh: integers and scales sharded like their weights, same logits.
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    sharded = cwm_jax.load(dst, mesh=mesh)
    assert sharded.layers["gate"][...].sharding.spec[2] == "tensor"
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(sharded, tokens)), out, atol=1e-5, rtol=0)


def test_quantized_checkpoint_errors(tmp_path, tiny_model):
    qc = quant.QuantConfig(bits=8)
    leaves = [(p, v.astype(np.int8) if p[-1] == "qvalue" else v) for p, v in _quantized_leaves(tiny_model, qc)]
    bad = [(p, v.astype(np.int16)) if p == ("layers", "1", "k", "qvalue") else (p, v) for p, v in leaves]
    with pytest.raises(CheckpointError, match=r"leaf \('layers', '1', 'k', 'qvalue'\) is int16, expected int8"):
        checkpoint.save_streaming(tmp_path / "bad", tiny_model.config, bad, quant_config=qc)
    assert not (tmp_path / "bad").exists()
    # A float leaf where the quantized pair is expected.
    with pytest.raises(CheckpointError, match="unexpected leaf"):
        checkpoint.save_streaming(
            tmp_path / "bad", tiny_model.config, checkpoint.model_leaves(tiny_model), quant_config=qc
        )
    assert not (tmp_path / "bad").exists()


def test_generator_serves_a_quantized_checkpoint(tmp_path, tiny_model):
    from cwm_jax.generator import Generator
    from cwm_jax.tokenizer import ByteTokenizer

    qc = quant.QuantConfig(bits=4, group_size=32)
    dst = tmp_path / "q4"
    marker = tmp_path / "tokenizer.byte"
    marker.write_text("")
    checkpoint.save_streaming(
        dst, tiny_model.config, _quantized_leaves(tiny_model, qc), quant_config=qc, files=[marker]
    )
    gen = Generator.from_checkpoint(dst)
    assert isinstance(gen.tokenizer, ByteTokenizer) and gen.model.quant_config == qc
    text = gen.complete("def f(x):", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str)
