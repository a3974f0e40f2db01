"""The train state, the loss and the jitted train / eval steps with explicit shardings.

Shapes: B rows, T positions, D hidden, V vocab, M microbatches, n loss chunks, c positions per chunk.

The state is a plain dict: `step`, `params` (float32 master weights, the canonical stacked tree of `cwm_jax.hf`),
`opt_state` (optax), `skipped` (updates skipped for a non-finite loss or gradient). Compute runs in the run's dtype
(bf16 on TPU): the model casts each weight to it inside its matmuls, so no bf16 copy of the weights is kept.

The loss never builds [B, T, V] logits: it scans over chunks of positions, each chunk's logits recomputed in the
backward pass (`jax.checkpoint`), so the head costs [B, c, V] at any context length. It is the summed token
cross-entropy (plus optional z-loss) divided by the number of loss tokens in the whole optimizer batch, so
accumulating M microbatches gives the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cwm_jax import hf, sharding
from cwm_jax.config import CwmConfig
from cwm_jax.context_parallel import to_zigzag
from cwm_jax.model import LAYER_AXES, TOP_AXES, CwmModel
from cwm_jax.train.optimizer import learning_rate, make_optimizer

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
BATCH_AXES = ("act_batch", "act_length")


def param_axes(config: CwmConfig) -> dict:
    """Logical axes of the canonical stacked parameter tree (the shape of `hf.model_params`)."""
    return {
        **{name: TOP_AXES[name] for name in ("embed", "final_norm", "lm_head")},
        "layers": {name: ("layers", *axes) for name, axes in LAYER_AXES.items()},
    }


def strided_chunks(chunk: int, *xs):
    """[B, T, ...] arrays split into n chunks of c positions along T, as [n, B, c, ...] (T padded with zeros to n * c).

    Chunk j holds positions j, j + n, j + 2n, ... (n chunks): a strided split keeps each chunk spread over the
    `sequence` shards, so no shard idles and nothing is gathered along T. `unstrided` puts [n, B, c] back.
    """
    T = xs[0].shape[1]
    n = -(-T // min(chunk, T))
    pad = (-T) % n
    out = []
    for x in xs:
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        out.append(jnp.moveaxis(x.reshape(x.shape[0], (T + pad) // n, n, *x.shape[2:]), 2, 0))
    return out


def unstrided(x_nBc, T: int):
    """[B, T] from the [n, B, c] of `strided_chunks` (the padding dropped)."""
    n, B, c = x_nBc.shape
    return jnp.moveaxis(x_nBc, 0, 2).reshape(B, n * c)[:, :T]


def chunked_cross_entropy(h_BTD, w_DV, targets_BT, mask_BT, chunk: int):
    """(sum of masked token NLL, sum of masked logsumexp^2) from final hidden states, [B, c, V] logits at a time
    (`strided_chunks`; the sums do not depend on the split)."""
    B, T, D = h_BTD.shape
    h_nBcD, t_nBc, m_nBc = strided_chunks(chunk, h_BTD, targets_BT, mask_BT.astype(jnp.float32))
    w_DV = w_DV.astype(h_BTD.dtype)

    @jax.checkpoint
    def body(carry, xs):
        h_BcD, t_Bc, m_Bc = xs
        # One 2-D matmul over B * c rows: XLA's CPU backend runs its backward faster than the 3-D einsum's.
        logits_BcV = jnp.dot(h_BcD.reshape(-1, D), w_DV, preferred_element_type=jnp.float32).reshape(
            B, -1, w_DV.shape[1]
        )
        logits_BcV = sharding.constrain(logits_BcV, ("act_batch", None, "act_vocab"))
        lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        # A one-hot product, not a gather, so a vocab-sharded head needs no all-gather of the logits.
        target_Bc = jnp.sum(logits_BcV * jax.nn.one_hot(t_Bc, logits_BcV.shape[-1], dtype=jnp.float32), axis=-1)
        nll, z = carry
        return (nll + jnp.sum((lse_Bc - target_Bc) * m_Bc), z + jnp.sum(jnp.square(lse_Bc) * m_Bc)), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(body, (zero, zero), (h_nBcD, t_nBc, m_nBc))
    return nll, z


@dataclasses.dataclass
class Trainer:
    """Jitted train and eval steps of one run on one mesh, with the state's and the batch's shardings."""

    cfg: object  # the run config (ConfigDict)
    model_config: CwmConfig
    mesh: jax.sharding.Mesh
    # The [B, T] arrays of a batch and which of them are float32 (a subclass adds its own, e.g. GRPO's advantages).
    batch_keys = BATCH_KEYS
    float_keys = ("loss_mask",)

    def __post_init__(self):
        cfg = self.cfg
        self.optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        self.schedule = learning_rate(cfg.optimizer, cfg.steps)
        # A sharded sequence runs context-parallel attention on the load-balanced (zigzag) layout: `global_batch`
        # permutes every batch array the same way, and the loss, a sum over tokens, needs no inverse.
        self.sequence_shards = dict(zip(self.mesh.axis_names, self.mesh.axis_sizes, strict=True)).get("sequence", 1)
        self.model_kwargs = dict(
            attention_impl=cfg.attention_impl,
            block_size=cfg.attention_block,
            remat=cfg.remat,
            sequence_layout="zigzag" if self.sequence_shards > 1 else "natural",
        )
        # Shapes and dtypes of the state (no arrays): the basis of its shardings and of `abstract_state`.
        self._param_shapes = jax.eval_shape(lambda: hf.model_params(CwmModel(self.model_config, rngs=nnx.Rngs(0))))
        self._opt_shapes = jax.eval_shape(self.optimizer.init, self._param_shapes)
        specs = jax.tree.map(
            lambda axes, x: sharding.logical_to_spec(axes, x.shape, self.mesh),
            param_axes(self.model_config),
            self._param_shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        self.param_shardings = jax.tree.map(self._named, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        self.opt_shardings = _opt_shardings(self._opt_shapes, specs, self.mesh)
        scalar = self._named(PartitionSpec())
        self.state_shardings = dict(
            step=scalar, params=self.param_shardings, opt_state=self.opt_shardings, skipped=scalar
        )
        self.batch_sharding = self._named(sharding.logical_to_spec(BATCH_AXES, self.batch_shape, self.mesh))
        B = self.batch_shape[0]
        indices = self.batch_sharding.addressable_devices_indices_map(self.batch_shape).values()
        self._local_rows = sorted({r for index in indices for r in range(*index[0].indices(B))})
        self._row_position = {r: i for i, r in enumerate(self._local_rows)}
        batch_shardings = {k: self.batch_sharding for k in self.batch_keys}
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, scalar),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            self._eval_step, in_shardings=(self.param_shardings, batch_shardings), out_shardings=scalar
        )

    # --- shapes and shardings ---

    @property
    def batch_shape(self) -> tuple[int, int]:
        return (self.cfg.global_batch, self.cfg.seq_len)

    def _named(self, spec):
        return NamedSharding(self.mesh, spec)

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs (with shardings) of the state: the target of a checkpoint restore and of AOT compiles."""
        shapes = dict(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=self._param_shapes,
            opt_state=self._opt_shapes,
            skipped=jax.ShapeDtypeStruct((), jnp.int32),
        )
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings
        )

    def abstract_batch(self) -> dict:
        B, T = self.batch_shape
        return {
            k: jax.ShapeDtypeStruct(
                (B, T), jnp.float32 if k in self.float_keys else jnp.int32, sharding=self.batch_sharding
            )
            for k in self.batch_keys
        }

    # --- state ---

    def init_state(self, params=None) -> dict:
        """A fresh state: random parameters from the run's seed (or `params`, e.g. a converted checkpoint's)."""
        cfg = self.cfg
        with jax.set_mesh(self.mesh):
            if params is None:
                make = lambda: hf.model_params(CwmModel(self.model_config, rngs=nnx.Rngs(cfg.seed)))  # noqa: E731
                params = jax.jit(make, out_shardings=self.param_shardings)()
            else:
                params = jax.device_put(
                    jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), self.param_shardings
                )
            opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
        zero = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return dict(step=zero, params=params, opt_state=opt_state, skipped=zero.copy())

    def model(self, params) -> CwmModel:
        """A CwmModel around `params` (for sampling and evaluation outside the step)."""
        return hf.model_from_params(self.model_config, params, **self.model_kwargs)

    def local_rows(self) -> list[int]:
        """The global batch rows this process's devices hold (sorted): what its data iterator must produce. Hosts
        share a row when the row's sequence is split over devices of several hosts (context parallelism)."""
        return list(self._local_rows)

    def global_batch(self, local: dict) -> dict:
        """Device arrays of the global batch from this process's rows (numpy [len(local_rows()), T] per key, in
        `local_rows()` order), in the zigzag layout when the sequence is sharded."""
        B, T = self.batch_shape
        n = self.sequence_shards
        where = self._row_position

        def build(x_bT):
            x_bT = to_zigzag(np.asarray(x_bT), n) if n > 1 else np.asarray(x_bT)

            def shard(index):
                rows = range(*index[0].indices(B))  # consecutive global rows, all local
                return x_bT[where[rows[0]] : where[rows[0]] + len(rows), index[1]]

            return jax.make_array_from_callback((B, T), self.batch_sharding, shard)

        return {k: build(local[k]) for k in self.batch_keys}

    # --- steps ---

    def lower(self):
        """The train step lowered for the abstract state and batch (no arrays needed): `.compile()` it for the mesh's
        devices, e.g. abstract TPU devices from `jax.experimental.topologies` (ahead-of-time compilation)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(self.abstract_state(), self.abstract_batch())

    def step(self, state: dict, batch: dict):
        """One optimizer step (donates `state`); returns the new state and a dict of scalar metrics."""
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def eval_loss(self, params, batch: dict):
        """(summed NLL, loss tokens) of one batch."""
        with jax.set_mesh(self.mesh):
            return self._eval(params, batch)

    def _sums(self, params, batch):
        """(summed token NLL, summed logsumexp^2) over the batch's loss tokens."""
        model = hf.model_from_params(self.model_config, params, **self.model_kwargs)
        h_BTD = model(batch["inputs"], batch["positions"], batch["segment_ids"], return_hidden=True)
        return chunked_cross_entropy(
            h_BTD, params["lm_head"], batch["targets"], batch["loss_mask"], self.cfg.loss.chunk
        )

    def _loss(self, params, batch, total):
        """(loss of the batch's share of the optimizer batch, sums to report divided by `total`)."""
        nll, z = self._sums(params, batch)
        loss = (nll + float(self.cfg.loss.z_loss) * z) / total
        return loss, dict(nll=nll, z_loss=z)

    def loss_and_grads(self, params, batch):
        """(loss, summed metrics, gradients) of a whole optimizer batch, accumulated over the run's microbatches.

        The loss is normalised by the loss tokens of the whole batch, so any number of microbatches gives the same
        gradient (up to float rounding).
        """
        M = self.cfg.microbatches
        total = _loss_tokens(batch)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if M == 1:
            (loss, sums), grads = grad_fn(params, batch, total)
            return loss, sums, grads

        def split(x_BT):
            # Microbatch m takes rows m, m + M, ...: every data shard contributes to every microbatch.
            B, T = x_BT.shape
            x_MbT = jnp.swapaxes(x_BT.reshape(B // M, M, T), 0, 1)
            return sharding.constrain(x_MbT, (None, *BATCH_AXES))

        def micro(carry, mb):
            g_acc, loss_acc, sums_acc = carry
            (loss, sums), g = grad_fn(params, mb, total)
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, jax.tree.map(jnp.add, sums_acc, sums)), None

        zero = jnp.zeros((), jnp.float32)
        micro_batches = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: self._loss(params, first, total)[1]))
        init = (jax.tree.map(jnp.zeros_like, params), zero, sums0)
        (grads, loss, sums), _ = jax.lax.scan(micro, init, micro_batches)
        return loss, sums, grads

    def _train_step(self, state, batch):
        params = state["params"]
        total = _loss_tokens(batch)
        loss, sums, grads = self.loss_and_grads(params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)

        def keep_if_finite(new, old):
            return jnp.where(finite, new, old)

        new_state = dict(
            step=state["step"] + 1,
            params=jax.tree.map(keep_if_finite, new_params, params),
            opt_state=jax.tree.map(keep_if_finite, opt_state, state["opt_state"]),
            skipped=state["skipped"] + jnp.where(finite, 0, 1).astype(jnp.int32),
        )
        metrics = dict(
            loss=loss,
            **{k: v / total for k, v in sums.items()},
            grad_norm=grad_norm,
            lr=self.schedule(state["step"]),
            tokens=total,
            finite=finite,
            skipped=new_state["skipped"],
        )
        return new_state, metrics

    def _eval_step(self, params, batch):
        nll, _ = self._sums(params, batch)
        return nll, jnp.sum(batch["loss_mask"].astype(jnp.float32))


def _loss_tokens(batch):
    """The loss tokens of a batch (at least 1, so an all-masked batch divides by 1)."""
    return jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)


def _opt_shardings(abstract_opt, param_specs: dict, mesh):
    """Shardings of the optimizer state: a leaf whose trailing dict keys name a parameter (Adam's mu and nu) is
    sharded like it; anything else (step counts) is replicated."""
    by_path = {}
    for path, spec in jax.tree_util.tree_leaves_with_path(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        by_path[tuple(k.key for k in path)] = spec

    def spec_of(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        spec = by_path.get(tuple(keys), PartitionSpec())
        if len(spec) > len(leaf.shape):
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(spec_of, abstract_opt)
