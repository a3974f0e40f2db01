"""cwm-convert quantize and hf-to-orbax --quantize, in-process, on tiny models.

References: `quant.quantize` of each source leaf (bit for bit), an independent numpy check of each quantized weight
(w ~= qvalue * scale within half a step plus the scale's own rounding; absmax reaches the integer range), the logits
of a float model holding the numpy-dequantized weights (the quantized model must match it to float rounding), and the
float model's logits (int8 within a few % of their scale). Each bad input: exit status 2, one line naming it, no DST.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cwm_jax
from cwm_jax import checkpoint, hf, quant
from cwm_jax.config import cwm_tiny
from cwm_jax.convert import cli
from cwm_jax.model import CwmModel

# Input widths 64 (D, N * H) and 128 (F): groups of 32 and 64 divide them, the default int4 group of 128 does not.
CONFIG = cwm_tiny(num_layers=2, vocab_size=256)
TOKENS = (np.arange(2 * 16).reshape(2, 16) * 37) % 256
TOKENIZER = '{"fake": "tokenizer"}'


def _convert(*args):
    return cli.main([*args, "--quiet"])


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    """(folder of a float32 converted checkpoint of a tiny random model, with a tokenizer file; its logits)."""
    model = CwmModel(CONFIG, rngs=nnx.Rngs(0))
    # Norms initialise to ones; random ones make a misplaced norm visible.
    keys = iter(jax.random.split(jax.random.key(1), 3))
    for p in (model.final_norm, model.layers["attn_norm"], model.layers["mlp_norm"]):
        p.set_value((1 + 0.1 * jax.random.normal(next(keys), p.shape)).astype(p.dtype))
    root = tmp_path_factory.mktemp("float")
    (root / "tokenizer.json").write_text(TOKENIZER)
    folder = root / "ckpt"
    checkpoint.save_streaming(folder, CONFIG, checkpoint.model_leaves(model), files=[root / "tokenizer.json"])
    return str(folder), np.asarray(_forward(model, jnp.asarray(TOKENS)))


def _dequantize_np(qvalue, scale, n_in):
    """Independent of qwix: qvalue [in, out] (as float) times each group's scale, in the canonical shape."""
    k = int(np.prod(qvalue.shape[:n_in]))
    q_KO = qvalue.reshape(k, -1).astype(np.float32)
    scale_KO = np.repeat(scale.astype(np.float32), k // scale.shape[0], axis=0)
    return (q_KO * scale_KO).reshape(qvalue.shape), scale_KO


def _check_weight(w, qvalue, scale, name, qc):
    """The quantized weight is absmax-symmetric: |q| <= 2^(bits-1), each group's absmax reaches the top of the range,
    and qvalue * scale is within half a step of w plus what rounding the scale to its dtype moves."""
    n_in = quant.N_IN[name]
    deq, scale_KO = _dequantize_np(qvalue, scale, n_in)
    top = 2 ** (qc.bits - 1)
    q_KO = np.abs(qvalue.reshape(scale_KO.shape).astype(np.float32))
    assert q_KO.max() <= top, name
    group = scale_KO.shape[0] // scale.shape[0]
    assert q_KO.reshape(scale.shape[0], group, -1).max(axis=1).min() >= top - 1, name
    scale_eps = 2.0**-8 if qc.scale_dtype == "bfloat16" else 1e-6
    bound = scale_KO * (0.5 + (top + 0.5) * scale_eps) + 1e-7
    err = np.abs(w.reshape(scale_KO.shape).astype(np.float32) - deq.reshape(scale_KO.shape))
    assert np.all(err <= bound), (name, float((err / scale_KO).max()))


QUANTIZE_CASES = [
    # (flags, the QuantConfig they mean)
    (["--bits", "8"], quant.QuantConfig(bits=8)),
    (["--bits", "8", "--group-size", "32"], quant.QuantConfig(bits=8, group_size=32)),
    (["--bits", "4", "--group-size", "32"], quant.QuantConfig(bits=4, group_size=32)),
    (
        ["--bits", "4", "--group-size", "64", "--keep-head", "--scale-dtype", "float32"],
        quant.QuantConfig(bits=4, group_size=64, head=False, scale_dtype="float32"),
    ),
]


@pytest.mark.parametrize("flags,qc", QUANTIZE_CASES, ids=["int8", "int8_g32", "int4_g32", "int4_g64_head_f32"])
def test_quantize(float_ckpt, tmp_path, capsys, monkeypatch, flags, qc):
    src, ref_logits = float_ckpt
    dst = str(tmp_path / "quantized")
    # Slabs of a few columns, so the per-slab quantization is checked against whole-leaf `quant.quantize` below.
    monkeypatch.setattr(quant, "QUANT_SLAB_BYTES", 4096)
    assert _convert("quantize", src, dst, *flags) == 0
    specs = checkpoint.leaf_specs(CONFIG, qc)
    line = capsys.readouterr().out
    assert f"{len(specs)} tensors" in line and "peak RSS" in line and qc.describe() in line, line

    assert quant.read(dst) == qc
    assert quant.read(src) is None
    assert open(os.path.join(dst, "tokenizer.json")).read() == TOKENIZER
    assert json.load(open(os.path.join(dst, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    leaves = dict(checkpoint.iter_leaves(dst))
    assert sorted(leaves) == sorted(specs)
    for path, (shape, dtype) in specs.items():
        assert (leaves[path].shape, str(leaves[path].dtype)) == (tuple(shape), dtype), path

    source = dict(checkpoint.iter_leaves(src))
    canonical: dict = {"layers": {str(i): {} for i in range(CONFIG.num_layers)}}
    for path, w in source.items():
        name = path[-1]
        if name in qc.names:
            qvalue, scale = leaves[(*path, "qvalue")], leaves[(*path, "scale")]
            assert qvalue.dtype == jnp.dtype(qc.qtype) and qvalue.shape == w.shape, path
            assert scale.dtype == jnp.dtype(qc.scale_dtype), path
            assert scale.shape == quant.scale_shape(w.shape, quant.N_IN[name], qc), path
            ref_q, ref_s = quant.quantize(w, name, qc)
            np.testing.assert_array_equal(qvalue.astype(np.int8), ref_q.astype(np.int8), err_msg=str(path))
            np.testing.assert_array_equal(scale.astype(np.float32), ref_s.astype(np.float32), err_msg=str(path))
            _check_weight(w, qvalue, scale, name, qc)
            value = _dequantize_np(qvalue, scale, quant.N_IN[name])[0]
        else:
            assert (*path, "qvalue") not in leaves
            np.testing.assert_array_equal(leaves[path], w, err_msg=str(path))
            value = w
        node = canonical
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    model = cwm_jax.load(dst)
    assert model.quant_config == qc
    logits = np.asarray(_forward(model, jnp.asarray(TOKENS)))
    # The quantized model computes with exactly the dequantized weights: only float rounding differs.
    dequantized = hf.model_from_params(CONFIG, hf.stack_layers(canonical))
    np.testing.assert_allclose(logits, np.asarray(_forward(dequantized, jnp.asarray(TOKENS))), atol=2e-5, rtol=0)
    # Against the float model, relative to the logits' scale (std 0.17 here). Measured max / rms error over that
    # scale: int8 0.037 / 0.009 (per channel and groups of 32); int4 0.72 / 0.14 (groups of 32), 0.46 / 0.11 (64).
    scale = ref_logits.std()
    err = np.abs(logits - ref_logits)
    assert err.max() > 0  # really quantized
    if qc.bits == 8:
        assert err.max() <= 0.08 * scale, err.max() / scale
    else:
        assert np.sqrt(np.mean(err**2)) <= 0.3 * scale, np.sqrt(np.mean(err**2)) / scale
        assert err.max() >= 0.08 * scale  # int4 is visibly coarser than int8's bound


def test_hf_to_orbax_quantize_equals_convert_then_quantize(hf_model_factory, tmp_path, capsys):
    src, _ = hf_model_factory()  # widths 32 (D, N * H) and 48 (F): groups of 16 divide them
    (tmp_path / "hf" / "tokenizer.json").write_text(TOKENIZER)
    one_pass, two_pass, float_dst = (str(tmp_path / n) for n in ("one_pass", "two_pass", "float"))
    flags = ("--group-size", "16", "--dtype", "bfloat16")
    assert _convert("hf-to-orbax", src, one_pass, "--quantize", "4", *flags) == 0
    assert "int4 (groups of 16, quantized head)" in capsys.readouterr().out
    assert _convert("hf-to-orbax", src, float_dst, "--dtype", "bfloat16") == 0
    assert _convert("quantize", float_dst, two_pass, "--bits", "4", "--group-size", "16") == 0
    qc = quant.QuantConfig(bits=4, group_size=16)
    assert quant.read(one_pass) == quant.read(two_pass) == qc
    for file in ("config.json", "tokenizer.json"):
        assert open(os.path.join(one_pass, file)).read() == open(os.path.join(two_pass, file)).read(), file
    a, b = dict(checkpoint.iter_leaves(one_pass)), dict(checkpoint.iter_leaves(two_pass))
    assert sorted(a) == sorted(b) == sorted(checkpoint.leaf_specs(checkpoint.read_config(one_pass), qc))
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        np.testing.assert_array_equal(a[path].astype(np.float32), b[path].astype(np.float32), err_msg=str(path))
    assert a[("layers", "1", "down", "qvalue")].dtype == jnp.int4
    assert a[("embed",)].dtype == jnp.bfloat16


def _expect_error(capsys, args, *fragments):
    assert _convert(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    for fragment in fragments:
        assert fragment in err, err
    return err


def _nothing_left(parent, dst):
    assert not os.path.exists(dst)
    assert not [p for p in os.listdir(parent) if p.startswith(".")], os.listdir(parent)


QUANTIZE_ERRORS = [
    # (flags, fragments of the one-line message)
    (["--bits", "3"], ["--bits must be 8 or 4, got 3"]),
    (["--bits", "8", "--group-size", "0"], ["--group-size", "positive"]),
    (["--bits", "4", "--group-size", "48"], ["group_size=48", "input width 64", "'q'"]),
    (["--bits", "4"], ["group_size=128", "input width 64"]),  # int4's default group
]


@pytest.mark.parametrize("flags,fragments", QUANTIZE_ERRORS, ids=["bits3", "group0", "group48", "int4_default"])
def test_quantize_bad_flags(float_ckpt, tmp_path, capsys, flags, fragments):
    src, _ = float_ckpt
    dst = str(tmp_path / "out" / "quantized")
    os.makedirs(tmp_path / "out")
    _expect_error(capsys, ["quantize", src, dst, *flags], "cwm-convert quantize: error:", *fragments)
    _nothing_left(tmp_path / "out", dst)


def test_quantize_refuses_quantized_source_and_existing_dst(float_ckpt, tmp_path, capsys):
    src, _ = float_ckpt
    once = str(tmp_path / "once")
    assert _convert("quantize", src, once, "--bits", "8") == 0
    capsys.readouterr()
    os.makedirs(tmp_path / "out")
    twice = str(tmp_path / "out" / "twice")
    _expect_error(capsys, ["quantize", once, twice, "--bits", "4", "--group-size", "32"], once, "already quantized")
    _nothing_left(tmp_path / "out", twice)
    back = str(tmp_path / "out" / "hf")
    _expect_error(capsys, ["orbax-to-hf", once, back], once, "is quantized", "float checkpoint")
    _nothing_left(tmp_path / "out", back)

    # An existing DST stays as it is without --overwrite, and is replaced with it.
    dst = tmp_path / "out" / "existing"
    dst.mkdir()
    (dst / "marker").write_text("keep")
    _expect_error(capsys, ["quantize", src, str(dst), "--bits", "8"], str(dst), "already exists", "--overwrite")
    assert (dst / "marker").read_text() == "keep"
    assert _convert("quantize", src, str(dst), "--bits", "8", "--overwrite") == 0
    assert quant.read(dst) == quant.QuantConfig(bits=8) and not (dst / "marker").exists()


def test_hf_to_orbax_quantize_bad_flags(hf_model_factory, tmp_path, capsys):
    src, _ = hf_model_factory()
    capsys.readouterr()  # transformers' save progress
    os.makedirs(tmp_path / "out")
    dst = str(tmp_path / "out" / "orbax")
    for flags, fragments in (
        (["--quantize", "5"], ["--quantize must be 8 or 4, got 5"]),
        (["--quantize", "4"], ["group_size=128", "input width 32"]),  # int4's default group on 32-wide weights
        (["--quantize", "4", "--group-size", "24"], ["group_size=24", "input width 32"]),
        (["--group-size", "16"], ["only with --quantize"]),
        (["--keep-head"], ["only with --quantize"]),
    ):
        _expect_error(capsys, ["hf-to-orbax", src, dst, *flags], "cwm-convert hf-to-orbax: error:", *fragments)
        _nothing_left(tmp_path / "out", dst)
