"""cwm_jax.checkpoint: converted checkpoints written leaf by leaf and read back bit for bit, on one device or a mesh.

The reference is the model the leaves came from: its parameters (exact) and its logits (exact on one device, within
1e-5 on a mesh). Streaming, atomicity and the errors for a folder that is not a converted checkpoint are checked too.
"""

import json
import os
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cwm_jax import checkpoint
from cwm_jax.config import cwm_tiny
from cwm_jax.hf import CheckpointError
from cwm_jax.model import CwmModel
from cwm_jax.sharding import make_mesh

TOKENS = (np.arange(2 * 24).reshape(2, 24) * 37) % 512


def _model(dtype: str) -> CwmModel:
    model = CwmModel(cwm_tiny(dtype=dtype, param_dtype=dtype), rngs=nnx.Rngs(0))
    # Norms initialise to ones; random ones make a swapped or dropped norm visible.
    keys = iter(jax.random.split(jax.random.key(1), 3))
    for p in (model.final_norm, model.layers["attn_norm"], model.layers["mlp_norm"]):
        p.set_value((1 + 0.1 * jax.random.normal(next(keys), p.shape)).astype(p.dtype))
    return model


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def saved(request, tmp_path_factory):
    """A tiny random model, its leaves, and the checkpoint written from them (with an extra file)."""
    model = _model(request.param)
    root = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    extra = root / "tokenizer.json"
    extra.write_text('{"fake": "tokenizer"}')
    dst = root / "out" / "ckpt"
    checkpoint.save_streaming(dst, model.config, checkpoint.model_leaves(model), files=[extra])
    return model, dst


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_round_trip_is_bit_identical_in_layout_order(saved):
    model, dst = saved
    ref = list(checkpoint.model_leaves(model))
    got = list(checkpoint.iter_leaves(dst, batch_bytes=50_000))  # several partial loads
    assert [k for k, _ in got] == [k for k, _ in checkpoint.layout(model.config)] == [k for k, _ in ref]
    for (key, a), (_, b) in zip(got, ref, strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, key
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(key))
    assert checkpoint.read_config(dst) == model.config
    assert json.loads((dst / "config.json").read_text())["dtype"] == model.config.param_dtype
    assert (dst / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert sorted(os.listdir(dst.parent)) == ["ckpt"]  # no temporary folder left behind


def test_load_on_one_device_gives_the_same_parameters_and_logits(saved):
    model, dst = saved
    loaded = checkpoint.load(dst)
    assert loaded.config == model.config
    for (key, a), (_, b) in zip(checkpoint.model_leaves(loaded), checkpoint.model_leaves(model), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(key))
    assert loaded.layers["q"][...].sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(_forward(loaded, TOKENS), _forward(model, TOKENS))


def test_load_into_a_mesh_shards_every_parameter(saved):
    model, dst = saved
    mesh = make_mesh(fsdp=4, tensor=2)
    loaded = checkpoint.load(dst, mesh)
    L = model.config.num_layers
    expected = {
        "embed": (loaded.embed, P("tensor", "fsdp"), (256, 16)),
        "lm_head": (loaded.lm_head, P("fsdp", "tensor"), (16, 256)),
        "q": (loaded.layers["q"], P(None, "fsdp", "tensor", None), (L, 16, 2, 16)),
        "o": (loaded.layers["o"], P(None, "tensor", None, "fsdp"), (L, 2, 16, 16)),
        "down": (loaded.layers["down"], P(None, "tensor", "fsdp"), (L, 64, 16)),
    }
    for name, (param, spec, shard_shape) in expected.items():
        x = param[...]
        assert x.sharding.mesh == mesh and x.sharding.spec == spec, name
        assert x.addressable_shards[0].data.shape == shard_shape, name
        assert x.dtype == jnp.dtype(model.config.param_dtype), name
    for (key, a), (_, b) in zip(checkpoint.model_leaves(loaded), checkpoint.model_leaves(model), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(key))
    with jax.set_mesh(mesh):
        logits = _forward(loaded, TOKENS)
    # Matmuls contracting over the fsdp-sharded embed dim sum partial products in another order: not bit-exact.
    atol = 1e-5 if model.config.dtype == "float32" else 0.02  # bf16: a few ulps of 2^-8
    np.testing.assert_allclose(logits, _forward(model, TOKENS), rtol=0, atol=atol)


def test_load_with_dtype_sets_compute_and_parameter_dtype(saved):
    model, dst = saved
    loaded = checkpoint.load(dst, make_mesh(fsdp=8), dtype="float32")
    assert loaded.config.dtype == loaded.config.param_dtype == "float32"
    assert loaded.layers["gate"][...].dtype == jnp.float32 and loaded.embed[...].dtype == jnp.float32
    np.testing.assert_array_equal(loaded.layers["gate"][...], model.layers["gate"][...].astype(jnp.float32))
    np.testing.assert_array_equal(loaded.embed[...], model.embed[...].astype(jnp.float32))


def test_save_streaming_consumes_leaves_lazily(tmp_path):
    model = _model("float32")
    alive, produced, seen = [], [0], []

    def leaves():
        for key, value in checkpoint.model_leaves(model):
            alive.append(weakref.ref(value))
            produced[0] += 1
            yield key, value

    def on_leaf(key, nbytes):
        # leaves produced but not yet written, and arrays still referenced anywhere
        seen.append((key, nbytes, produced[0] - len(seen), sum(r() is not None for r in alive)))

    checkpoint.save_streaming(tmp_path / "ckpt", model.config, leaves(), on_leaf=on_leaf, batch_bytes=40_000)
    layout = checkpoint.layout(model.config)
    assert [k for k, *_ in seen] == [k for k, _ in layout]
    assert sum(n for _, n, *_ in seen) == sum(v.nbytes for _, v in checkpoint.model_leaves(model))
    # a batch of <= 40 kB holds at most 4 of these leaves, plus the one that closed it (the 128 kB embedding goes alone)
    assert max(pending for *_, pending, _ in seen) <= 5
    assert seen[0][2] <= 2, "the first leaf must be written before the generator is drained"
    # only the leaf that closed the batch (held by the generator and the loop) is still alive
    assert max(n_alive for *_, n_alive in seen) <= 1


class Boom(Exception):
    pass


def _failing(model, after: int, error: type[BaseException]):
    for i, leaf in enumerate(checkpoint.model_leaves(model)):
        if i == after:
            raise error("generator failed")
        yield leaf


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failure_midway_leaves_nothing_behind(tmp_path, error):
    model = _model("float32")
    dst = tmp_path / "out" / "ckpt"
    with pytest.raises(error):
        checkpoint.save_streaming(dst, model.config, _failing(model, 30, error), batch_bytes=40_000)
    assert not dst.exists()
    assert os.listdir(tmp_path / "out") == []


def test_existing_destination_needs_overwrite_and_is_replaced_only_when_complete(tmp_path):
    model = _model("float32")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "old.txt").write_text("old")

    def untouchable():
        raise AssertionError("leaves consumed before the destination check")
        yield

    with pytest.raises(FileExistsError, match=str(dst)):
        checkpoint.save_streaming(dst, model.config, untouchable())
    # a failed overwrite keeps the old folder
    with pytest.raises(Boom):
        checkpoint.save_streaming(dst, model.config, _failing(model, 40, Boom), overwrite=True, batch_bytes=40_000)
    assert os.listdir(dst) == ["old.txt"] and os.listdir(tmp_path) == ["ckpt"]
    checkpoint.save_streaming(dst, model.config, checkpoint.model_leaves(model), overwrite=True)
    assert sorted(os.listdir(dst)) == ["config.json", "params"]
    assert os.listdir(tmp_path) == ["ckpt"]
    assert checkpoint.read_config(dst) == model.config


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda k, v: (k, v.astype(np.float16)) if k == ("layers", "2", "q") else (k, v),
            r"\('layers', '2', 'q'\) is float16",
        ),
        (lambda k, v: (k, v[:-1]) if k == ("embed",) else (k, v), r"\('embed',\) has shape \(511, 64\)"),
        (
            lambda k, v: (("layers", "8", "q"), v) if k == ("layers", "7", "q") else (k, v),
            r"unexpected leaf \('layers', '8', 'q'\)",
        ),
        (lambda k, v: None if k == ("layers", "7", "down") else (k, v), r"leaf \('layers', '7', 'down'\) never given"),
    ],
)
def test_bad_leaves_are_named(tmp_path, change, match):
    model = _model("float32")
    leaves = (x for x in (change(k, v) for k, v in checkpoint.model_leaves(model)) if x is not None)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.save_streaming(tmp_path / "ckpt", model.config, leaves)
    assert os.listdir(tmp_path) == []


def test_a_folder_that_is_not_a_converted_checkpoint_is_named(tmp_path):
    folder = tmp_path / "hf_like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cwm_tiny().to_hf()))
    for call in (checkpoint.read_config, lambda p: list(checkpoint.iter_leaves(p)), checkpoint.load):
        with pytest.raises(CheckpointError, match=f"{folder}: not a converted cwm-jax checkpoint"):
            call(folder)
    with pytest.raises(CheckpointError, match="not a converted"):
        checkpoint.read_config(tmp_path / "missing")
    # config.json and params/ present, but params/ holds no Orbax checkpoint
    (folder / "params").mkdir()
    with pytest.raises(CheckpointError, match=f"{folder / 'params'}: not a readable Orbax checkpoint"):
        checkpoint.load(folder)


def _arrays(n: int, nbytes: int, produced: list, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise Boom(f"source failed at {i}")
        array = np.full(nbytes, i % 251, np.uint8)
        produced.append(weakref.ref(array))
        yield ("leaf", str(i)), array


@pytest.mark.parametrize("hold", [1, 5])
def test_read_ahead_keeps_the_order_reads_ahead_and_bounds_what_is_alive(hold):
    produced: list = []
    got, held, alive = [], [], []
    for key, array in checkpoint.read_ahead(_arrays(30, 1000, produced), max_bytes=3000):
        if not got:
            # the thread works while the consumer holds its first array: it fills the 3000-byte budget
            deadline = time.monotonic() + 10
            while len(produced) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(produced) >= 3, "nothing was read ahead"
        got.append((key, int(array[0])))
        held = [*held, array][-hold:]  # a consumer that keeps its last `hold` arrays (an Orbax batch)
        del array
        alive.append(sum(r() is not None for r in produced))
    assert got == [(("leaf", str(i)), i % 251) for i in range(30)]
    # the budget (3 arrays) plus one pulled at the limit; a consumer holding more than the budget makes the thread
    # wait until it asks for the next array, so then it is what the consumer holds plus the one it asked for
    assert max(alive) <= max(3, hold) + 1, alive


def test_read_ahead_raises_the_source_error_in_its_place():
    got = []
    with pytest.raises(Boom, match="source failed at 3"):
        for key, _ in checkpoint.read_ahead(_arrays(10, 100, [], fail_at=3), max_bytes=10_000):
            got.append(key)
    assert got == [("leaf", "0"), ("leaf", "1"), ("leaf", "2")]


def test_read_ahead_stops_its_thread_when_the_consumer_stops():
    pairs = checkpoint.read_ahead(_arrays(10**6, 100, []), max_bytes=1000)
    assert next(pairs)[0] == ("leaf", "0")
    pairs.close()
    for thread in threading.enumerate():
        if thread.name == "cwm-read-ahead":
            thread.join(timeout=10)
            assert not thread.is_alive()


def test_save_streaming_from_read_ahead_writes_every_leaf(tmp_path):
    model = _model("float32")
    checkpoint.save_streaming(
        tmp_path / "ckpt",
        model.config,
        checkpoint.read_ahead(checkpoint.model_leaves(model), max_bytes=40_000),
        batch_bytes=40_000,
    )
    for (key, a), (_, b) in zip(checkpoint.iter_leaves(tmp_path / "ckpt"), checkpoint.model_leaves(model), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(key))


def test_read_ahead_with_sizes_never_exceeds_the_budget():
    sizes = [2500, 500, 500, 2000, 1000, 2500, 300] * 4
    produced: list = []

    def pairs():
        for i, n in enumerate(sizes):
            array = np.zeros(n, np.uint8)
            produced.append(weakref.ref(array))
            yield ("leaf", str(i)), array

    alive_bytes = []
    for _, array in checkpoint.read_ahead(pairs(), max_bytes=3000, sizes=sizes):
        time.sleep(0.002)  # a slow writer: the thread runs ahead as far as the budget lets it
        alive_bytes.append(sum(r().nbytes for r in produced if r() is not None))  # the one held here included
        del array
    assert len(alive_bytes) == len(sizes)
    assert max(alive_bytes) <= 3000, alive_bytes
