"""cwm-convert end to end, in-process: HF -> Orbax -> HF round trips, logits, sharded restore, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from cwm_jax import checkpoint, hf
from cwm_jax.convert import cli
from cwm_jax.sharding import make_mesh


def _convert(*args):
    return cli.main([*args, "--quiet"] if args[0] != "--help" else list(args))


def _all_tensors(folder):
    out = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, file)))
    return out


@pytest.fixture
def hf_folder(hf_model_factory):
    return hf_model_factory(initializer_range=0.1)


def test_hf_orbax_hf_round_trip_is_bit_identical(hf_folder, tmp_path, capsys):
    src, torch_model = hf_folder
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    assert _convert("hf-to-orbax", src, str(tmp_path / "orbax"), "--dtype", "float32") == 0
    line = capsys.readouterr().out
    assert "tensors" in line and "peak RSS" in line
    assert (tmp_path / "orbax" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert _convert("orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back"), "--max-shard-size", "30KB") == 0
    original, back = _all_tensors(src), _all_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name in original:
        assert original[name].dtype == back[name].dtype, name
        np.testing.assert_array_equal(original[name], back[name], err_msg=name)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 30 KB
    reloaded = transformers.CwmForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 97, (2, 20)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), torch_model(ids).logits.numpy())


def test_converted_logits_match_transformers_and_sharded_restore(hf_folder, tmp_path):
    src, torch_model = hf_folder
    dst = str(tmp_path / "orbax")
    assert _convert("hf-to-orbax", src, dst) == 0
    ids = np.random.RandomState(1).randint(0, 97, (2, 24))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    model = checkpoint.load(dst, block_size=8)
    assert model.config.param_dtype == "float32"  # the source's dtype
    out = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded = checkpoint.load(dst, mesh=mesh, block_size=8)
    assert sharded.layers["q"][...].sharding.spec[1] == "fsdp"
    with jax.set_mesh(mesh):
        out_sharded = np.asarray(jax.jit(lambda m, t: m(t))(sharded, jnp.asarray(ids)))
    # The same function with sharded matmuls: only the summation order differs.
    np.testing.assert_allclose(out_sharded, out, atol=1e-5, rtol=0)


def test_bf16_conversion(hf_folder, tmp_path):
    src, _ = hf_folder
    dst = str(tmp_path / "orbax")
    assert _convert("hf-to-orbax", src, dst, "--dtype", "bfloat16") == 0
    assert checkpoint.read_config(dst).param_dtype == "bfloat16"
    leaves = dict(checkpoint.iter_leaves(dst))
    ref = hf.read_canonical(src, checkpoint.read_config(dst))["layers"]["2"]["down"]
    np.testing.assert_array_equal(leaves[("layers", "2", "down")], ref.astype(leaves[("layers", "2", "down")].dtype))
    assert _convert("orbax-to-hf", dst, str(tmp_path / "back")) == 0
    back = transformers.CwmForCausalLM.from_pretrained(tmp_path / "back")
    assert back.dtype == torch.bfloat16


def _codecs(ckpt) -> set[str]:
    """The codec names of every stored array's zarr.json in a converted checkpoint."""
    names = set()
    for root, _, files in os.walk(os.path.join(ckpt, "params")):
        if "zarr.json" in files:
            text = open(os.path.join(root, "zarr.json")).read()
            names.update(n for n in ("zstd", "bytes", "blosc", "gzip") if f'"name":"{n}"' in text.replace(" ", ""))
    return names


def test_compression_none_stores_the_same_leaves_uncompressed(hf_folder, tmp_path):
    src, _ = hf_folder
    zstd, none = str(tmp_path / "zstd"), str(tmp_path / "none")
    assert _convert("hf-to-orbax", src, zstd, "--dtype", "bfloat16") == 0
    assert _convert("hf-to-orbax", src, none, "--dtype", "bfloat16", "--compression", "none") == 0
    assert "zstd" in _codecs(zstd)
    assert _codecs(none) == {"bytes"}
    a, b = list(checkpoint.iter_leaves(zstd)), list(checkpoint.iter_leaves(none))
    assert [k for k, _ in a] == [k for k, _ in b]
    for (key, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16), err_msg=str(key))


def _expect_error(capsys, args, *fragments):
    assert _convert(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    for fragment in fragments:
        assert fragment in err, err
    return err


def _shard_of(folder, name):
    index = json.loads(open(os.path.join(folder, "model.safetensors.index.json")).read())
    return os.path.join(folder, index["weight_map"][name])


def _nothing_left(tmp_path, dst):
    assert not os.path.exists(dst)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], os.listdir(tmp_path)


BAD_INPUTS = [
    "missing_shard",
    "truncated_shard",
    "corrupt_header",
    "missing_tensor",
    "unexpected_tensor",
    "wrong_shape",
    "wrong_dtype",
    "other_model_type",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(hf_folder, tmp_path, capsys, case):
    src, _ = hf_folder
    dst = str(tmp_path / "out")
    name = "model.layers.1.mlp.gate_proj.weight"
    shard = _shard_of(src, name)
    if case == "missing_shard":
        os.remove(shard)
        expected = (shard, "missing")
    elif case == "truncated_shard":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) - 100])
        expected = (shard,)
    elif case == "corrupt_header":
        with open(shard, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage")
        expected = (shard,)
    elif case in ("missing_tensor", "unexpected_tensor", "wrong_shape", "wrong_dtype"):
        tensors = load_file(shard)
        index_path = os.path.join(src, "model.safetensors.index.json")
        index = json.loads(open(index_path).read())
        if case == "missing_tensor":
            del tensors[name]
            del index["weight_map"][name]
            expected = (name, "missing")
        elif case == "unexpected_tensor":
            tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
            index["weight_map"]["model.layers.1.mlp.extra.weight"] = os.path.basename(shard)
            expected = ("model.layers.1.mlp.extra.weight", "unexpected")
        elif case == "wrong_shape":
            tensors[name] = np.zeros((48, 31), np.float32)
            expected = (name, "(48, 31)", "(48, 32)")
        else:
            tensors[name] = tensors[name].astype(np.float16)
            expected = (name, "float16", "float32")
        save_file(tensors, shard, metadata={"format": "pt"})
        open(index_path, "w").write(json.dumps(index))
    else:
        config_path = os.path.join(src, "config.json")
        config = json.loads(open(config_path).read())
        config["model_type"] = "mistral"
        open(config_path, "w").write(json.dumps(config))
        expected = ("config.json", "mistral")
    _expect_error(capsys, ["hf-to-orbax", src, dst], *expected)
    _nothing_left(tmp_path, dst)


def test_existing_destination_needs_overwrite(hf_folder, tmp_path, capsys):
    src, _ = hf_folder
    dst = tmp_path / "orbax"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    _expect_error(capsys, ["hf-to-orbax", src, str(dst)], str(dst), "--overwrite")
    assert (dst / "keep.txt").read_text() == "precious"
    assert _convert("hf-to-orbax", src, str(dst), "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and checkpoint.read_config(str(dst)).num_layers == 4
    _expect_error(capsys, ["orbax-to-hf", str(dst), str(dst)], str(dst))
    _expect_error(capsys, ["orbax-to-hf", src, str(tmp_path / "x")], src)  # not an Orbax checkpoint


def test_module_entry_point_and_sizes():
    import cwm_jax

    assert cwm_jax.load is checkpoint.load
    assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("2GiB") == 2 * 2**30
    assert cli.parse_size("300") == 300 and cli.parse_size("1.5MB") == 1_500_000
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["orbax-to-hf", "a", "b", "--max-shard-size", "lots"])
