"""transformers checkpoint folders: name mapping round trip, single and sharded files, errors naming the tensor."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cwm_jax import hf
from cwm_jax.config import CwmConfig


def _shard_of(folder, name):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return os.path.join(folder, json.load(f)["weight_map"][name])


def test_mapping_round_trips_every_tensor_exactly(hf_model_factory):
    folder, torch_model = hf_model_factory()
    model = hf.load_hf(folder)
    ours = dict(hf.hf_state_dict(model))
    theirs = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    # canonical tree is per layer and independent of the stacking
    canonical = hf.unstack_layers(hf.model_params(model))
    assert sorted(canonical["layers"], key=int) == [str(i) for i in range(model.config.num_layers)]
    assert canonical["layers"]["1"]["q"].shape == (32, 4, 8)
    restacked = hf.stack_layers(canonical)
    np.testing.assert_array_equal(restacked["layers"]["o"], model.layers["o"][...])


def test_single_file_checkpoint_and_bf16(hf_model_factory, tmp_path):
    folder, torch_model = hf_model_factory(shard_size="50MB")
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    model = hf.load_hf(folder, param_dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and str(model.lm_head[...].dtype) == "bfloat16"
    ref = torch_model.lm_head.weight.detach().numpy().T
    np.testing.assert_allclose(np.asarray(model.lm_head[...], np.float32), ref, rtol=2**-8)


def test_missing_tensor_is_named(hf_model_factory):
    folder, _ = hf_model_factory()
    name = "model.layers.2.mlp.up_proj.weight"
    index_path = os.path.join(folder, "model.safetensors.index.json")
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=f"{shard}: tensor '{name}' listed in the index is not in the file"):
        hf.load_hf(folder)
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"][name]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(hf.CheckpointError, match=f"tensor '{name}' missing from the checkpoint"):
        hf.load_hf(folder)


def test_wrong_shape_is_named(hf_model_factory):
    folder, _ = hf_model_factory()
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    tensors[name] = np.zeros((8, 32), np.float32)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        hf.CheckpointError, match=rf"tensor '{name}' has shape \(8, 32\), config.json implies \(16, 32\)"
    ):
        hf.load_hf(folder)


def test_unexpected_tensor_and_inconsistent_config(hf_model_factory):
    folder, _ = hf_model_factory()
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(hf.CheckpointError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        hf.load_hf(folder)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["num_key_value_heads"] = 3
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="config.json: num_heads \\(4\\) must be divisible by num_kv_heads \\(3\\)"):
        hf.load_hf(folder)


def test_missing_and_corrupt_shards_are_named(hf_model_factory):
    folder, _ = hf_model_factory()
    shard = _shard_of(folder, "model.norm.weight")
    with open(shard, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(hf.CheckpointError, match=f"{shard}: not a safetensors file"):
        hf.load_hf(folder)
    os.remove(shard)
    with pytest.raises(hf.CheckpointError, match=f"{shard}: shard listed in the index is missing"):
        hf.load_hf(folder)


def test_layout_names_every_parameter_once():
    from cwm_jax.config import cwm_32b, param_count

    layout = hf.hf_layout(cwm_32b())
    assert len(layout) == 3 + 64 * 9
    assert sum(int(np.prod(shape)) for _, shape, _, _ in layout.values()) == param_count(cwm_32b())
    path, hf_shape, shape, n_in = layout["model.layers.63.self_attn.o_proj.weight"]
    assert path == ("layers", "63", "o") and hf_shape == (6144, 6144) and shape == (48, 128, 6144) and n_in == 2
    assert isinstance(CwmConfig.from_hf(cwm_32b().to_hf()), CwmConfig)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("threads", [1, 3])
def test_transpose_2d_and_canonical_view_equal_numpy(monkeypatch, dtype, threads):
    monkeypatch.setattr(hf, "_copy_threads", lambda: threads)
    hf._copy_pool.cache_clear()
    rng = np.random.default_rng(0)
    for shape in [(5, 3), (300, 700), (64, 1)]:
        a = rng.standard_normal(shape).astype(hf.numpy_dtype(dtype))
        t = hf.transpose_2d(a, tile=64)
        assert t.flags.c_contiguous and t.dtype == a.dtype
        np.testing.assert_array_equal(t, a.T)
    # q-like ([heads * hd, hidden] -> [hidden, heads, hd]) and o-like ([hidden, heads * hd] -> [heads, hd, hidden])
    for hf_shape, shape, n_in in [((12, 10), (10, 3, 4), 1), ((10, 12), (3, 4, 10), 2)]:
        a = rng.standard_normal(hf_shape).astype(hf.numpy_dtype(dtype))
        view = hf.canonical_view(a, shape, n_in)
        assert np.shares_memory(view, a) and view.shape == shape
        np.testing.assert_array_equal(view, hf.from_hf_tensor(a, shape, n_in))
    hf._copy_pool.cache_clear()
