"""Native release folders (PyTorch DCP): params.json fields, the RoPE row permutation, parity with the transformers
route and with transformers' logits, errors naming the key."""

import dataclasses
import json
import os
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from conftest import make_hf_model

from cwm_jax import hf
from cwm_jax.config import FULL, CwmConfig, cwm_32b, release_layer_types
from cwm_jax.convert import dcp

T = 20  # > 2x the sliding window of 8, so local and global layers differ

# transformers name -> native name, written out here rather than taken from the module under test.
TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}

# The tiny model of make_hf_model in the native field names; 2 * 4 * 32 / 3 -> 85, * 0.5 -> 42, up to 16s -> 48.
PARAMS = {
    "model": {
        "dim": 32,
        "n_layers": 4,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "vocab_size": 97,
        "ffn_exp": 4,
        "ffn_dim_multiplier": 0.5,
        "multiple_of": 16,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "pos_embed_impl": "scaled_rope",
        "scaled_rope": {"scale_factor": 8, "old_context_len": 32, "low_freq_factor": 1, "high_freq_factor": 4},
        "max_seq_len": 512,
        "window_attn": {"window_pattern": 4, "local_window": 8, "global_window": None, "global_last_layer": True},
    },
    "tokenizer": {"name": "tiktoken", "path": None},
}


def _native_name(hf_name):
    if hf_name in TOP:
        return TOP[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"layers.{i}.{LAYER[rest]}"


def _to_interleaved(w, n_heads):
    """Half-split rows -> native interleaved rows, by explicit index: native row 2j <- j, 2j+1 <- j + head_dim/2."""
    head_dim = w.shape[0] // n_heads
    index = []
    for h in range(n_heads):
        for j in range(head_dim // 2):
            index += [h * head_dim + j, h * head_dim + head_dim // 2 + j]
    return w[torch.tensor(index)]


def _write_native(folder, torch_model, *, dtype=torch.float32, prefix=True, edit=None, params=PARAMS):
    """A native release folder from a transformers model: native names, interleaved q/k rows, params.json."""
    c = torch_model.config
    tensors = {}
    for name, value in torch_model.state_dict().items():
        value = value.detach().to(dtype).clone()
        if name.endswith("q_proj.weight"):
            value = _to_interleaved(value, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = _to_interleaved(value, c.num_key_value_heads)
        tensors[_native_name(name)] = value
    if edit:
        edit(tensors)
    os.makedirs(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {"model": tensors} if prefix else tensors
        torch_dcp.save(state, storage_writer=torch_dcp.FileSystemWriter(str(folder)), no_dist=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    return str(folder)


def _canonical(items):
    tree = {"layers": {}}
    for t, array in items:
        node = tree
        for key in t.path[:-1]:
            node = node.setdefault(key, {})
        node[t.path[-1]] = array
    return tree


def _read(folder):
    config = dcp.read_params_json(folder)
    return config, dcp.scan_dcp(folder, config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    layer_types = list(release_layer_types(4))
    hf_folder, torch_model = make_hf_model(root, initializer_range=0.1, head_dim=16, layer_types=layer_types)
    return hf_folder, torch_model, _write_native(root / "native", torch_model)


def _logits(config, canonical, ids):
    model = hf.model_from_params(config, hf.stack_layers(canonical))
    return np.asarray(model(jnp.asarray(ids)))


def test_params_json_reads_as_config_json(tiny):
    hf_folder, _, native = tiny
    config = dcp.read_params_json(native)
    expected = CwmConfig.from_hf(hf_folder)
    ids = dict(bos_token_id=expected.bos_token_id, eos_token_ids=expected.eos_token_ids, pad_token_id=0)
    assert dataclasses.replace(config, **ids) == expected
    assert config.param_dtype == "float32"  # from .metadata


def test_every_tensor_bit_identical_to_the_transformers_route(tiny, monkeypatch):
    hf_folder, _, native = tiny
    config, tensors = _read(native)
    assert {t.key.split(".", 1)[0] for t in tensors} == {"model"}
    loads = []
    real_load = torch_dcp.load

    def counting_load(state_dict, **kwargs):
        loads.append(list(state_dict))
        return real_load(state_dict, **kwargs)

    monkeypatch.setattr(torch_dcp, "load", counting_load)
    ours = {t.path: (t, a) for t, a in dcp.iter_dcp_tensors(native, tensors)}
    assert loads == [[t.key] for t in tensors]  # one tensor per read
    theirs = {t.path: a for t, a in hf.iter_hf_tensors(hf.scan_hf_checkpoint(hf_folder, config))}
    assert sorted(ours) == sorted(theirs)
    for path, (t, array) in ours.items():
        assert array.dtype == theirs[path].dtype and array.shape == t.shape, path
        np.testing.assert_array_equal(array, theirs[path], err_msg=str(path))


def test_logits_match_transformers_and_need_the_permutation(tiny):
    _, torch_model, native = tiny
    config, tensors = _read(native)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, size=(2, T))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.float().numpy()
    out = _logits(config, _canonical(dcp.iter_dcp_tensors(native, tensors)), ids)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    unpermuted = [dataclasses.replace(t, rope_heads=0) for t in tensors]
    assert sum(t.rope_heads > 0 for t in tensors) == 2 * config.num_layers
    wrong = _logits(config, _canonical(dcp.iter_dcp_tensors(native, unpermuted)), ids)
    assert np.abs(wrong - ref).max() > 1e-2


def test_rope_rows_to_half_split_inverts_the_interleaving():
    w = torch.arange(3 * 8 * 2, dtype=torch.float32).reshape(3 * 8, 2)
    back = dcp.rope_rows_to_half_split(_to_interleaved(w, 3).numpy(), 3)
    np.testing.assert_array_equal(back, w.numpy())
    assert not np.array_equal(_to_interleaved(w, 3).numpy(), w.numpy())


def test_bf16_and_plain_keys(tiny, tmp_path):
    _, torch_model, native = tiny
    reference = {t.path: a for t, a in dcp.iter_dcp_tensors(native, _read(native)[1])}
    bf16 = _write_native(tmp_path / "bf16", torch_model, dtype=torch.bfloat16, prefix=False)
    config, tensors = _read(bf16)
    assert config.param_dtype == config.dtype == "bfloat16"
    assert tensors[0].key == "tok_embeddings.weight"
    for t, array in dcp.iter_dcp_tensors(bf16, tensors):
        assert array.dtype == ml_dtypes.bfloat16, t.key
        # torch's fp32 -> bf16 rounding equals ml_dtypes', so the bits must agree exactly.
        expected = reference[t.path].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(array.view(np.uint16), expected.view(np.uint16), err_msg=t.key)


def test_release_numbers_read_as_the_32b_preset(tmp_path):
    # The 32B values are the spec's; ffn_dim_multiplier / multiple_of are the guess that gives its MLP width 21504.
    model = dict(
        dim=6144,
        n_layers=64,
        n_heads=48,
        n_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        ffn_exp=4,
        ffn_dim_multiplier=1.3125,
        multiple_of=256,
        norm_eps=1e-5,
        rope_theta=1e6,
        pos_embed_impl="scaled_rope",
        scaled_rope=dict(scale_factor=16, old_context_len=8192, low_freq_factor=1, high_freq_factor=4),
        max_seq_len=131072,
        window_attn=dict(window_pattern=4, local_window=8192, global_window=131072, global_last_layer=True),
    )
    with open(tmp_path / "params.json", "w") as f:
        json.dump({"model": model, "tokenizer": {"name": "tiktoken"}}, f)
    config = dcp.read_params_json(tmp_path)  # no .metadata: bfloat16
    assert config == cwm_32b()
    assert len(config.global_layers) == 17
    del model["window_attn"], model["n_kv_heads"]  # native defaults: every layer global, n_kv_heads = n_heads
    with open(tmp_path / "params.json", "w") as f:
        json.dump({"model": model}, f)
    config = dcp.read_params_json(tmp_path)
    assert config.layer_types == (FULL,) * 64 and config.sliding_window is None and config.num_kv_heads == 48


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("n_heads"), "missing required key 'model.n_heads'"),
        (lambda m: m.pop("vocab_size"), "missing required key 'model.vocab_size'"),
        (lambda m: m.update(dim="32"), "'model.dim' must be a positive integer"),
        (lambda m: m["window_attn"].pop("local_window"), "'model.window_attn.local_window' is missing"),
        (lambda m: m["window_attn"].update(global_window=64), "'model.window_attn.global_window' = 64 < max_seq_len"),
        (lambda m: m.update(qk_norm=True), "'model.qk_norm' = True is not part of the CWM architecture"),
        (lambda m: m.update(pos_embed_impl="yarn"), "'model.pos_embed_impl' is 'yarn'"),
        (lambda m: m.update(n_kv_heads=3), "num_heads .4. must be divisible by num_kv_heads .3."),
    ],
)
def test_bad_params_json_is_named(tmp_path, change, message):
    params = json.loads(json.dumps(PARAMS))
    change(params["model"])
    with open(tmp_path / "params.json", "w") as f:
        json.dump(params, f)
    with pytest.raises(hf.CheckpointError, match=f"params.json: {message}"):
        dcp.read_params_json(tmp_path)


def test_missing_params_json_and_model_section(tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"params.json: not found"):
        dcp.read_params_json(tmp_path)
    with open(tmp_path / "params.json", "w") as f:
        json.dump({"tokenizer": {}}, f)
    with pytest.raises(hf.CheckpointError, match=r"params.json: no 'model' object"):
        dcp.read_params_json(tmp_path)


def _delete(name):
    return lambda tensors: tensors.pop(name)


def _replace(name, value):
    return lambda tensors: tensors.__setitem__(name, value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_delete("layers.2.feed_forward.w3.weight"), "tensor 'model.layers.2.feed_forward.w3.weight' missing from"),
        (_delete("output.weight"), "tensor 'model.output.weight' missing from the checkpoint"),
        (
            _replace("layers.1.attention.wk.weight", torch.zeros(16, 32)),
            r"tensor 'model.layers.1.attention.wk.weight' has shape \(16, 32\), params.json implies \(32, 32\)",
        ),
        (
            _replace("layers.0.attention.wq.bias", torch.zeros(64)),
            "unexpected entry 'model.layers.0.attention.wq.bias'",
        ),
        (_replace("layers.4.ffn_norm.weight", torch.zeros(32)), "unexpected entry 'model.layers.4.ffn_norm.weight'"),
    ],
)
def test_bad_tensors_are_named(tiny, tmp_path, edit, message):
    _, torch_model, _ = tiny
    folder = _write_native(tmp_path / "bad", torch_model, edit=edit)
    config = dcp.read_params_json(folder)
    with pytest.raises(hf.CheckpointError, match=rf"{os.path.join(folder, '.metadata')}: {message}"):
        dcp.scan_dcp(folder, config)


def test_missing_metadata_is_named(tmp_path):
    with open(tmp_path / "params.json", "w") as f:
        json.dump(PARAMS, f)
    config = dcp.read_params_json(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"\.metadata: not found"):
        dcp.scan_dcp(tmp_path, config)


def test_dcp_to_orbax_cli_equals_the_hf_route(tiny, tmp_path, capsys):
    from cwm_jax import checkpoint
    from cwm_jax.convert import cli

    hf_folder, _, native = tiny
    assert cli.main(["dcp-to-orbax", native, str(tmp_path / "from_dcp"), "--quiet"]) == 0
    assert cli.main(["hf-to-orbax", hf_folder, str(tmp_path / "from_hf"), "--quiet"]) == 0
    assert "tensors" in capsys.readouterr().out
    assert (tmp_path / "from_dcp" / "params.json").exists()  # carried along with the tokenizer files
    from_hf = dict(checkpoint.iter_leaves(str(tmp_path / "from_hf")))
    for path, array in checkpoint.iter_leaves(str(tmp_path / "from_dcp")):
        np.testing.assert_array_equal(array, from_hf[path], err_msg=str(path))
