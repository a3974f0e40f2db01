"""The train step: loss against a float64 reference, schedule, decay mask, sharded and accumulated steps, NaN skips,
config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cwm_jax.config import ConfigError
from cwm_jax.sharding import make_mesh
from cwm_jax.train import config as run_config
from cwm_jax.train.optimizer import decay_mask, learning_rate
from cwm_jax.train.step import Trainer, chunked_cross_entropy

T = 32
B = 8
LR = 1e-3


def tiny_run(**overrides) -> ml_collections.ConfigDict:
    cfg = run_config.default_config()
    cfg.model = ml_collections.ConfigDict(dict(preset="tiny", num_layers=4, vocab_size=97, sliding_window=8))
    cfg.seq_len, cfg.global_batch, cfg.steps = T, B, 10
    cfg.dtype = "float32"
    cfg.remat = "none"
    cfg.loss.chunk = 8
    cfg.loss.z_loss = 1e-3
    cfg.optimizer.lr = LR
    cfg.optimizer.warmup_steps = 0
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def packed_batch(seed=0, nan_row=None):
    """Two documents per row (segments 1, 2), positions restarting, a loss mask with some zeros."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 97, (B, T + 1)).astype(np.int32)
    cut = 13
    positions = np.concatenate([np.arange(cut), np.arange(T - cut)]).astype(np.int32)
    segments = np.concatenate([np.ones(cut), 2 * np.ones(T - cut)]).astype(np.int32)
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    mask[:, cut - 1] = 0  # the last token of document 1 does not predict document 2
    if nan_row is not None:
        mask[nan_row, 3] = np.nan
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        positions=np.tile(positions, (B, 1)),
        segment_ids=np.tile(segments, (B, 1)),
        loss_mask=mask,
    )


def mesh_of(**sizes):
    full = {**dict(data=1, fsdp=1, tensor=1, sequence=1), **sizes}
    return make_mesh(**full, devices=jax.devices()[: math.prod(full.values())])


@pytest.fixture(scope="module")
def single_device_run():
    """Three steps of the tiny run on one device: (losses, final params as numpy)."""
    cfg = tiny_run()
    trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of())
    return _three_steps(trainer)


def _three_steps(trainer):
    state = trainer.init_state()
    losses = []
    for i in range(3):
        state, metrics = trainer.step(state, trainer.global_batch(packed_batch(i)))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state["params"]))


def test_chunked_cross_entropy_matches_float64_reference():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 11, 16)).astype(np.float32)
    w = rng.standard_normal((16, 37)).astype(np.float32)
    targets = rng.integers(0, 37, (2, 11))
    mask = (rng.random((2, 11)) > 0.3).astype(np.float32)
    logits = h.astype(np.float64) @ w.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll_ref = ((lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask).sum()
    z_ref = (lse**2 * mask).sum()
    for chunk in (1, 4, 11, 64):  # 11 positions: 4 needs padding
        nll, z = chunked_cross_entropy(jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(mask), chunk)
        np.testing.assert_allclose(float(nll), nll_ref, rtol=1e-5)
        np.testing.assert_allclose(float(z), z_ref, rtol=1e-5)


def test_loss_equals_full_logits_loss_of_the_model():
    cfg = tiny_run()
    trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of())
    state = trainer.init_state()
    batch = packed_batch()
    loss, _, _ = jax.jit(trainer.loss_and_grads)(state["params"], batch)
    model = trainer.model(state["params"])
    logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tgt = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    expected = (((lse - tgt) * m).sum() + 1e-3 * (lse**2 * m).sum()) / m.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_schedule_warmup_then_cosine_and_linear():
    opt = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1))
    sched = learning_rate(opt, 110)
    assert float(sched(0)) == 0.0 and math.isclose(float(sched(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(sched(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(sched(60)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel_tol=1e-5)
    assert math.isclose(float(sched(110)), 0.1, rel_tol=1e-5)
    opt.decay = "linear"
    assert math.isclose(float(learning_rate(opt, 110)(60)), 0.55, rel_tol=1e-5)


def test_weight_decay_skips_norms_only():
    params = {"embed": 1, "final_norm": 1, "lm_head": 1, "layers": {"attn_norm": 1, "q": 1, "mlp_norm": 1, "up": 1}}
    mask = decay_mask(params)
    assert mask == {
        "embed": True,
        "final_norm": False,
        "lm_head": True,
        "layers": {"attn_norm": False, "q": True, "mlp_norm": False, "up": True},
    }


@pytest.mark.parametrize(
    "sizes", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, tensor=2, sequence=2)]
)
def test_sharded_steps_match_one_device(single_device_run, sizes):
    losses_1, params_1 = single_device_run
    cfg = tiny_run()
    trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of(**sizes))
    losses, params = _three_steps(trainer)
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    # Adam moves a weight by about lr * m / sqrt(v) per step: a relative gradient difference e (float reassociation
    # across shards) moves it by about lr * e. 1e-2 * lr over 3 steps leaves room for weights whose gradient is
    # near zero, where m / sqrt(v) is most sensitive, and is still 100x below one step's update.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1), strict=True):
        np.testing.assert_allclose(a, b, atol=3 * 1e-2 * LR, rtol=0)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_kernel_train_steps_match_the_xla_reference(single_device_run, impl):
    """The Pallas kernels (interpret mode here) drop into the sharded train step: packed segments, local and global
    layers, fsdp x tensor; same losses and weights as the XLA attention on one device, within the bar above."""
    losses_1, params_1 = single_device_run
    cfg = tiny_run(attention_impl=impl)
    trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of(fsdp=4, tensor=2))
    losses, params = _three_steps(trainer)
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1), strict=True):
        np.testing.assert_allclose(a, b, atol=3 * 1e-2 * LR, rtol=0)


def test_gradient_accumulation_equals_one_big_batch():
    batch = packed_batch(3)
    results = []
    for micro in (1, 4):
        cfg = tiny_run(microbatches=micro)
        trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of(fsdp=2))
        params = trainer.init_state()["params"]
        with jax.set_mesh(trainer.mesh):
            results.append(jax.jit(trainer.loss_and_grads)(params, trainer.global_batch(batch)))
    (loss1, _, g1), (loss4, _, g4) = results
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * scale, rtol=0)


def test_non_finite_batch_is_skipped_and_counted():
    cfg = tiny_run()
    trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of())
    state = trainer.init_state()
    state, _ = trainer.step(state, trainer.global_batch(packed_batch(0)))
    before = jax.tree.map(np.asarray, jax.device_get(state))
    state, metrics = trainer.step(state, trainer.global_batch(packed_batch(1, nan_row=2)))
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1 and np.isnan(float(metrics["loss"]))
    after = jax.tree.map(np.asarray, jax.device_get(state))
    assert int(after["step"]) == 2 and int(after["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"]), strict=True):
        np.testing.assert_array_equal(a, b)
    state, metrics = trainer.step(state, trainer.global_batch(packed_batch(2)))
    assert bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


@pytest.mark.parametrize(
    "overrides, devices, match",
    [
        (
            {"mesh.fsdp": 3},
            8,
            r"mesh.data=1 x mesh.fsdp=3 x mesh.tensor=1 x mesh.sequence=1 needs 3 devices, but there are 8",
        ),
        ({"mesh.fsdp": -1, "mesh.data": 3}, 8, r"mesh.fsdp=-1 cannot fill 8 devices"),
        (
            {"mesh.fsdp": 2, "mesh.tensor": 4},
            8,
            r"mesh.tensor=4 must divide model.num_heads=4 and "
            r"model.num_kv_heads=2",
        ),
        ({"mesh.fsdp": 8, "global_batch": 4}, 8, r"must be divisible by mesh.data x mesh.fsdp = 8"),
        ({"mesh.fsdp": 4, "microbatches": 4}, 4, r"global_batch=8 / microbatches=4 = 2 rows"),
        ({"mesh.fsdp": 2, "mesh.sequence": 4, "seq_len": 36}, 8, r"seq_len=36 must be divisible by 8"),
        ({"model.preset": "huge"}, 8, r"model.preset is 'huge'"),
        ({"model.num_layer": 2}, 8, r"model.num_layer is not a CwmConfig field"),
        ({"optimizer.decay": "step"}, 1, r"optimizer.decay is 'step'"),
        ({"attention_impl": "flash"}, 1, r"attention_impl='flash'; valid values are 'xla', 'dense', 'pallas'"),
    ],
)
def test_config_errors_name_the_keys(overrides, devices, match):
    cfg = tiny_run()
    cfg.mesh.fsdp = 1
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ConfigError, match=match):
        run_config.validate(cfg, devices)


def test_a_valid_config_resolves_the_free_axis():
    cfg = tiny_run()
    cfg.mesh.update(dict(data=2, fsdp=-1, tensor=2, sequence=1))
    model, mesh = run_config.validate(cfg, 8)
    assert mesh == dict(data=2, fsdp=2, tensor=2, sequence=1) and model.vocab_size == 97
    assert model.param_dtype == "float32" and model.dtype == "float32"


def test_optimizer_state_is_sharded_like_its_parameters():
    cfg = tiny_run()
    trainer = Trainer(cfg, run_config.model_config(cfg), mesh_of(fsdp=4, tensor=2))
    state = trainer.init_state()
    mu = state["opt_state"][1][0].mu  # clip_by_global_norm, then adamw's (scale_by_adam, ...)
    assert mu["layers"]["q"].sharding == state["params"]["layers"]["q"].sharding
    assert mu["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert isinstance(optax.tree.norm(mu), jax.Array)


def test_init_from_a_converted_checkpoint(tmp_path):
    from flax import nnx

    from cwm_jax import checkpoint, hf
    from cwm_jax.model import CwmModel
    from cwm_jax.train.loop import _initial_params

    cfg = tiny_run()
    model_config = run_config.model_config(cfg)
    source = CwmModel(model_config, rngs=nnx.Rngs(7))
    checkpoint.save_streaming(tmp_path / "ckpt", model_config, checkpoint.model_leaves(source))
    cfg.init_from = str(tmp_path / "ckpt")
    trainer = Trainer(cfg, model_config, mesh_of(fsdp=4, tensor=2))
    state = trainer.init_state(_initial_params(cfg, trainer))
    assert state["params"]["layers"]["q"].sharding == trainer.param_shardings["layers"]["q"]
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(hf.model_params(source)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = tiny_run(**{"model.num_layers": 2})
    other.init_from = cfg.init_from
    with pytest.raises(
        ConfigError,
        match=r"has num_layers=4, layer_types=.* but the run config's model block gives "
        r"num_layers=2",
    ):
        _initial_params(other, Trainer(other, run_config.model_config(other), mesh_of()))


def test_peak_flops_by_device_kind():
    from types import SimpleNamespace

    from cwm_jax.train.loop import peak_flops

    kinds = {"TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12, "TPU v6 lite": 918e12, "cpu": None}
    for kind, peak in kinds.items():
        assert peak_flops(SimpleNamespace(device_kind=kind)) == peak
