"""cwm_jax.sharding: the mesh helper, logical-axis rules, activation constraints and sharded initialisation.

conftest.py gives the process 8 host CPU devices. The model tests compare a tiny CWM initialised in shards on a mesh
with the same model built eagerly on one device: parameters, logits and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cwm_jax import sharding
from cwm_jax.config import cwm_tiny
from cwm_jax.model import CwmModel

# 4 query heads and 2 KV heads: both divide tensor=2, so every weight is really sharded on the meshes below.
CFG = cwm_tiny()
BATCH, LENGTH = 8, 32
MESHES = {"fsdp4_tensor2": dict(fsdp=4, tensor=2), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


def make_model():
    return CwmModel(CFG, rngs=nnx.Rngs(0))


def leaves_with_paths(state):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "conftest.py should force 8 host devices"


# --------------------------------------------------------------------------------------------------- make_mesh


def test_make_mesh_fills_the_minus_one_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    assert dict(sharding.make_mesh(data=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert dict(sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape)["data"] == 2
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh4 = sharding.make_mesh(tensor=2, devices=jax.devices()[:4])
    assert dict(mesh4.shape)["fsdp"] == 2 and mesh4.devices.size == 4


@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(data=2, fsdp=2, tensor=1), "needs 4 devices, but there are 8"),  # no -1: product != device count
        (dict(data=4, fsdp=4), "needs 16 devices"),
        (dict(data=3), "3 does not divide"),  # fsdp=-1 cannot fill 8 devices
        (dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
        (dict(tensor=0), "must be a positive integer or -1"),
        (dict(data=-2), "must be a positive integer or -1"),
        (dict(data=1.5), "must be a positive integer or -1"),
    ],
)
def test_make_mesh_rejects_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(**sizes)


# --------------------------------------------------------------------------------------------- logical_to_spec


def test_logical_to_spec_follows_the_rules():
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert sharding.logical_to_spec(("layers", "heads", "head_dim", "embed")) == P(None, "tensor", None, "fsdp")
    assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("embed", "vocab")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("act_batch", "act_length", None)) == P(("data", "fsdp"), "sequence", None)


def test_logical_to_spec_drops_mesh_axes_that_do_not_divide():
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    k_axes = ("layers", "embed", "kv_heads", "head_dim")
    # 2 KV heads cannot be split 4 ways: that dimension is replicated, the rest stays sharded.
    assert sharding.logical_to_spec(k_axes, (8, 64, 2, 16), mesh) == P(None, "fsdp", None, None)
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), (8, 64, 4, 16), mesh) == P(
        None, "fsdp", "tensor", None
    )
    # Without a shape nothing can be checked, so nothing is dropped.
    assert sharding.logical_to_spec(k_axes, None, mesh) == P(None, "fsdp", "tensor", None)
    # A multi-axis rule keeps the axes whose running product divides the dimension.
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("act_batch", "act_embed"), (8, 64), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("act_batch", "act_embed"), (6, 64), mesh) == P("data", None)
    assert sharding.logical_to_spec(("act_batch", "act_embed"), (3, 64), mesh) == P(None, None)


def test_logical_to_spec_mesh_axes_used_once_and_missing_axes_dropped():
    rules = (("a", "tensor"), ("b", ("tensor", "fsdp")))
    assert sharding.logical_to_spec(("a", "b"), rules=rules) == P("tensor", "fsdp")
    # A mesh without "data" or "sequence" axes (built by hand) still works: those rules are dropped.
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    assert sharding.logical_to_spec(("act_batch", "act_length"), (8, 4), mesh) == P("fsdp", None)


def test_logical_to_spec_errors():
    with pytest.raises(KeyError, match="'experts'"):
        sharding.logical_to_spec(("embed", "experts"))
    with pytest.raises(ValueError, match="rank"):
        sharding.logical_to_spec(("embed", "mlp"), (64,))


def test_use_rules_nests_and_restores():
    assert sharding.current_rules() is sharding.DEFAULT_RULES
    with sharding.use_rules((("embed", "tensor"),)):
        assert sharding.logical_to_spec(("embed",)) == P("tensor")
        with pytest.raises(KeyError, match="'mlp'"):
            sharding.logical_to_spec(("mlp",))
    assert sharding.current_rules() is sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed",)) == P("fsdp")


# --------------------------------------------------------------------------------------------------- constrain


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((8, 4, 6))
    assert sharding.constrain(x, ("act_batch", "act_length", "act_vocab")) is x
    jaxpr = jax.make_jaxpr(lambda x: sharding.constrain(x, ("act_batch", "act_length", "act_vocab")))(x)
    assert "sharding_constraint" not in str(jaxpr)


def test_constrain_under_set_mesh_in_jit():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    axes = ("act_batch", "act_length", "act_vocab")

    def f(x):
        return sharding.constrain(x * 2, axes)

    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    with jax.set_mesh(mesh):
        assert "sharding_constraint" in str(jax.make_jaxpr(f)(x))
        y = jax.jit(f)(x)
    np.testing.assert_array_equal(y, 2 * x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
    assert y.addressable_shards[0].data.shape == (2, 4, 3)
    # A batch of 6 cannot be split 4 ways: only "data" is kept; vocab 5 is not split at all.
    with jax.set_mesh(mesh):
        y = jax.jit(f)(jnp.ones((6, 4, 5)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, None)), 3)
    # Other rules, entered before the function is traced.
    with jax.set_mesh(mesh), sharding.use_rules((("act_batch", None), ("act_length", "tensor"), ("act_vocab", None))):
        y = jax.jit(lambda x: sharding.constrain(x * 2, axes))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor", None)), 3)


def test_constrain_inside_shard_map_skips_manual_axes():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

    def body(x):
        return sharding.constrain(x * 2, ("act_batch", "act_length", "act_vocab"))

    x = jnp.ones((8, 4, 6))
    with jax.set_mesh(mesh):
        y = jax.jit(jax.shard_map(body, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}))(x)
        z = jax.jit(jax.shard_map(body, in_specs=P("data"), out_specs=P("data")))(x)  # every axis manual
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(z, 2 * x)


# ------------------------------------------------------------------------------------ param specs and sharded init


def test_param_specs_of_the_abstract_model():
    abstract = nnx.state(nnx.eval_shape(make_model))
    specs = sharding.param_specs(abstract, sharding.make_mesh(fsdp=2, tensor=4))
    assert specs["layers"]["q"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["k"] == P(None, "fsdp", None, None)  # 2 KV heads on tensor=4: replicated
    assert specs["layers"]["o"] == P(None, "tensor", None, "fsdp")
    assert specs["layers"]["down"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"] == P(None, "fsdp")
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["final_norm"] == P("fsdp")
    # Leaves without logical axes are replicated.
    assert sharding.param_specs({"x": jnp.ones(3), "v": nnx.Param(jnp.ones(3))}) == {"x": P(), "v": P()}


class Toy(nnx.Module):
    """Two parameters shaped like the stacked q kernel and a stacked norm: a cheap stand-in to compile the init of."""

    def __init__(self, rngs: nnx.Rngs):
        q = jax.random.normal(rngs.params(), (8, 64, 4, 16)) * 0.02
        self.q = nnx.Param(q, logical_axes=("layers", "embed", "heads", "head_dim"))
        self.norm = nnx.Param(jnp.ones((8, 64)), logical_axes=("layers", "embed"))


def test_sharded_init_never_holds_a_whole_parameter():
    """The compiled init moves no data between devices and allocates no buffer of a parameter's full shape."""
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    _, init = sharding._sharded_init(lambda: Toy(nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        compiled = init.lower().compile()
        state = compiled()
    hlo = compiled.as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in hlo, op
    assert "[8,64,4,16]" not in hlo and "[8,64]" not in hlo
    assert "[8,16,2,16]" in hlo  # the q shard of one device: fsdp=4 on embed, tensor=2 on heads
    assert state["q"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert state["norm"][...].sharding.spec == P(None, "fsdp")
    memory = compiled.memory_analysis()
    if memory is not None:  # per device: one q shard and one norm shard; scratch far below a whole q
        shards = 4 * (8 * 16 * 2 * 16 + 8 * 16)
        assert shards <= memory.output_size_in_bytes <= shards + 64  # + the output tuple
        assert memory.temp_size_in_bytes < 4 * 8 * 64 * 4 * 16 // 2


@pytest.fixture(scope="module")
def single_device():
    """The eager one-device model, a batch, and its logits, loss and loss gradient (jitted, no mesh)."""
    model = make_model()
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, CFG.vocab_size)
    targets = jax.random.randint(jax.random.key(2), (BATCH, LENGTH), 0, CFG.vocab_size)
    (loss, logits), grads = loss_and_grad(graphdef, state, tokens, targets)
    return dict(state=state, tokens=tokens, targets=targets, loss=loss, logits=logits, grads=grads)


@pytest.fixture(scope="module")
def sharded():
    """init_sharded models, one per mesh of MESHES, built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            mesh = sharding.make_mesh(**MESHES[name])
            cache[name] = mesh, sharding.init_sharded(make_model, mesh)
        return cache[name]

    return get


def _loss(graphdef, state, tokens, targets):
    logits = nnx.merge(graphdef, state)(tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits


loss_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_init_sharded_shards_every_weight(mesh_name, sharded):
    mesh, model = sharded(mesh_name)
    q = model.layers["q"][...]
    assert q.shape == (8, 64, 4, 16)
    assert q.sharding == NamedSharding(mesh, P(None, "fsdp", "tensor", None))
    assert model.layers["k"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.layers["o"][...].sharding.spec == P(None, "tensor", None, "fsdp")
    assert model.layers["down"][...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
    assert model.final_norm[...].sharding.spec == P("fsdp")
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    assert q.addressable_shards[0].data.shape == (8, 64 // fsdp, 4 // tensor, 16)
    assert model.embed[...].addressable_shards[0].data.shape == (512 // tensor, 64 // fsdp)
    for v in jax.tree.leaves(nnx.state(model)):
        if v.ndim > 1:
            assert v.addressable_shards[0].data.size < v.size


def test_init_sharded_same_parameters_on_any_mesh(sharded, single_device):
    """Same seed, same parameters: bit for bit across meshes; within one ulp of the eager one-device init.

    Not bit-exact against eager: under jit XLA folds normal(key) * 0.02 into one multiply (see init_sharded).
    """
    a = leaves_with_paths(nnx.state(sharded("fsdp4_tensor2")[1]))
    b = leaves_with_paths(nnx.state(sharded("data2_fsdp2_tensor2")[1]))
    eager = leaves_with_paths(single_device["state"])
    assert a.keys() == b.keys() == eager.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_array_max_ulp(a[name], eager[name], maxulp=1)


def test_sharded_forward_matches_single_device(sharded, single_device):
    mesh, model = sharded("fsdp4_tensor2")

    @nnx.jit
    def forward(model, tokens):
        return model(tokens)

    with jax.set_mesh(mesh):
        tokens = jax.device_put(single_device["tokens"], NamedSharding(mesh, P(("data", "fsdp"), None)))
        logits = forward(model, tokens)
    assert logits.dtype == jnp.float32
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
    # Not bit-exact: partitioned matmuls and reductions sum in another order, and the parameters differ from the
    # eager ones by <= 1 ulp. The observed difference is ~4e-7 on logits of magnitude ~0.8.
    np.testing.assert_allclose(logits, single_device["logits"], rtol=0, atol=1e-5)


def test_sharded_gradient_matches_single_device(sharded, single_device):
    mesh, model = sharded("data2_fsdp2_tensor2")
    graphdef, state = nnx.split(model)
    shardings = sharding.param_shardings(state, mesh)

    # XLA left to itself replicates some gradients (the embedding's, for one): a training step pins them to the
    # parameters' shardings, so that FSDP holds only its shard of each.
    @jax.jit
    def sharded_loss_and_grad(state, tokens, targets):
        out, grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(graphdef, state, tokens, targets)
        return out, jax.lax.with_sharding_constraint(grads, shardings)

    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    with jax.set_mesh(mesh):
        tokens = jax.device_put(single_device["tokens"], batch)
        targets = jax.device_put(single_device["targets"], batch)
        (loss, logits), grads = sharded_loss_and_grad(state, tokens, targets)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(state), strict=True):
        assert g.sharding.is_equivalent_to(p.sharding, p.ndim)
    np.testing.assert_allclose(logits, single_device["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss, single_device["loss"], rtol=1e-6)
    # fp32 sums over 8 x 32 tokens and over partitioned contractions, in another order: allow 1e-4 of each
    # leaf's largest entry (the observed error is ~1e-6 of it).
    ref = leaves_with_paths(single_device["grads"])
    got = leaves_with_paths(grads)
    assert got.keys() == ref.keys()
    for name in ref:
        scale = float(np.abs(ref[name]).max())
        assert scale > 0, name
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-4 * scale, err_msg=name)
