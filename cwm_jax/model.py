"""The CWM decoder in Flax NNX: RMSNorm, llama3 RoPE, GQA attention with local/global layers, SwiGLU, untied head.

The model knows nothing of training, data or files. Layers are stored stacked ([L, ...]) and applied with one
`lax.scan`; a per-layer flag picks the local or global attention with `lax.cond`, so compile time does not grow with
depth and any layer pattern (the 32B model's last layer is global) scans as one loop.

Shapes: B batch, T positions, D hidden, N query heads, K KV heads, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from cwm_jax import attention as attn_lib
from cwm_jax import context_parallel, quant, sharding
from cwm_jax.config import CwmConfig

# Logical axes of every parameter, per layer (the stacked tree adds "layers" in front).
LAYER_AXES = {
    "attn_norm": ("embed",),
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
}
TOP_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}

# Rematerialisation policies for the scanned layer body (the training issue picks one per run).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def layer_shapes(config: CwmConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters (the canonical per-layer tree of `cwm_jax.hf`)."""
    c = config
    D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return {
        "attn_norm": (D,),
        "q": (D, N, H),
        "k": (D, K, H),
        "v": (D, K, H),
        "o": (N, H, D),
        "mlp_norm": (D,),
        "gate": (D, F),
        "up": (D, F),
        "down": (F, D),
    }


def top_shapes(config: CwmConfig) -> dict[str, tuple[int, ...]]:
    c = config
    return {
        "embed": (c.vocab_size, c.hidden_size),
        "final_norm": (c.hidden_size,),
        "lm_head": (c.hidden_size, c.vocab_size),
    }


def rms_norm(x_BTD, weight_D, eps: float):
    """RMSNorm with fp32 statistics; normalised activations return to the input dtype before the scale (as HF)."""
    x32 = x_BTD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BTD.dtype) * y.astype(x_BTD.dtype)


def rope_cos_sin(positions_BT, inv_freq_h, dtype):
    """cos and sin [B, T, H] of the half-split layout; angles in fp32, then cast to the compute dtype."""
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h, jnp.float32)
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    return jnp.cos(angles_BTH).astype(dtype), jnp.sin(angles_BTH).astype(dtype)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """Rotate pairs (j, j + H/2): transformers' rotate_half layout."""
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]


class CwmModel(nnx.Module):
    """The CWM decoder. Parameters: `embed` [V, D], `layers.*` stacked [L, ...], `final_norm` [D], `lm_head` [D, V].

    Each `nnx.Param` carries its logical axes in the `logical_axes` metadata (`cwm_jax.sharding` maps them to a mesh).
    """

    def __init__(
        self,
        config: CwmConfig,
        *,
        rngs: nnx.Rngs,
        attention_impl: str = "xla",
        block_size: int = 512,
        remat: str = "none",
        sequence_layout: str = "natural",
        quant_config: quant.QuantConfig | None = None,
    ):
        """sequence_layout: order of the tokens along T under a mesh whose `sequence` axis has size n > 1 (context
        parallelism, `cwm_jax.context_parallel`): "natural", or "zigzag" when the caller has permuted tokens,
        positions and segment ids with `context_parallel.to_zigzag`. Without such a mesh it must be "natural".
        quant_config: weight-only quantization (`cwm_jax.quant`): the named weights are integer parameters with a
        `<name>_scale` beside them (zeros and ones here; `cwm_jax.load` fills them from a quantized checkpoint).
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat is {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        context_parallel.check_layout(sequence_layout)
        self.config = config
        self.attention_impl = attention_impl
        self.block_size = block_size
        self.remat = remat
        self.sequence_layout = sequence_layout
        self.quant_config = quant_config
        if quant_config is not None:
            quant.check_config(config, quant_config)
        pdtype = jnp.dtype(config.param_dtype)
        normal = jax.nn.initializers.normal(0.02)
        L = config.num_layers

        def param(shape, axes, init):
            return nnx.Param(init(rngs.params(), shape, pdtype), logical_axes=axes)

        def ones(key, shape, dtype):
            return jnp.ones(shape, dtype)

        qc = quant_config
        qnames = () if qc is None else qc.names

        def qparams(name, shape, axes, layers=()):
            """Integer weight and its scale for a quantized `name` (canonical `shape`, maybe stacked)."""
            scale = (*layers, *quant.scale_shape(shape, quant.N_IN[name], qc))
            scale_axes = (*(("layers",) if layers else ()), *quant.SCALE_AXES[name])
            return (
                nnx.Param(
                    jnp.zeros((*layers, *shape), qc.qtype), logical_axes=(*(("layers",) if layers else ()), *axes)
                ),
                nnx.Param(jnp.ones(scale, qc.scale_dtype), logical_axes=scale_axes),
            )

        shapes = top_shapes(config)
        self.embed = param(shapes["embed"], TOP_AXES["embed"], normal)
        self.final_norm = param(shapes["final_norm"], TOP_AXES["final_norm"], ones)
        if "lm_head" in qnames:
            self.lm_head, self.lm_head_scale = qparams("lm_head", shapes["lm_head"], TOP_AXES["lm_head"])
        else:
            self.lm_head = param(shapes["lm_head"], TOP_AXES["lm_head"], normal)
        layers = {}
        for name, shape in layer_shapes(config).items():
            if name in qnames:
                layers[name], layers[f"{name}_scale"] = qparams(name, shape, LAYER_AXES[name], (L,))
            else:
                init = ones if name.endswith("norm") else normal
                layers[name] = param((L, *shape), ("layers", *LAYER_AXES[name]), init)
        self.layers = nnx.Dict(layers)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, return_hidden: bool = False):
        """Token ids [B, T] -> fp32 logits [B, T, V], or the final (normed) hidden states [B, T, D] on request.

        positions [B, T] default to 0..T-1 (RoPE only; masking is by index); segment_ids [B, T] restrict attention
        to tokens of the same segment (packed documents). With sequence_layout="zigzag" every input, the default
        positions and the output are in zigzag order.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        B, T = tokens_BT.shape
        n = context_parallel.sequence_axis_size()
        context_parallel.check_layout(self.sequence_layout, n)
        if positions_BT is None:
            pos_T = jnp.arange(T, dtype=jnp.int32)
            if self.sequence_layout == "zigzag":
                pos_T = context_parallel.to_zigzag(pos_T, n, axis=0)
            positions_BT = jnp.broadcast_to(pos_T, (B, T))
        x_BTD = self.embed_tokens(tokens_BT)
        cos_BTH, sin_BTH = rope_cos_sin(positions_BT, c.rope_inv_freq(), dtype)
        is_global_L = jnp.asarray(c.is_global)
        layer_params = self.layer_params()

        def body(x_BTD, xs):
            params, is_global = xs
            return self._block(params, is_global, x_BTD, cos_BTH, sin_BTH, segment_ids_BT), None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x_BTD, _ = jax.lax.scan(body, x_BTD, (layer_params, is_global_L))
        h_BTD = rms_norm(x_BTD, self.final_norm[...], c.rms_norm_eps)
        if return_hidden:
            return h_BTD
        return self.logits(h_BTD)

    def embed_tokens(self, tokens_BT):
        """Token ids [B, T] -> input activations [B, T, D] in the compute dtype."""
        # Gather the table's embed dim first: a lookup into an fsdp-sharded table makes XLA replicate [B, T, D].
        embed_VD = sharding.constrain(self.embed[...], ("vocab", None))
        x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(jnp.dtype(self.config.dtype))
        return sharding.constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

    def layer_params(self) -> dict:
        """The stacked layer parameters for the layer scan: arrays, and a `quant.QWeight` per quantized weight."""
        params = {name: p[...] for name, p in self.layers.items() if not name.endswith("_scale")}
        if self.quant_config is not None:
            for name in quant.LAYER_WEIGHTS:
                params[name] = quant.QWeight(params[name], self.layers[f"{name}_scale"][...])
        return params

    def logits(self, h_BTD):
        """fp32 logits from final hidden states (callers may pass a chunk of positions, e.g. only the last one)."""
        if self.quant_config is not None and self.quant_config.head:
            B, T, D = h_BTD.shape
            w = quant.QWeight(self.lm_head[...], self.lm_head_scale[...])
            logits_BTV = quant.matmul(h_BTD.reshape(B * T, D), w, 1, jnp.float32).reshape(B, T, -1)
        else:
            w_DV = self.lm_head[...].astype(h_BTD.dtype)
            logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV, preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BTV, ("act_batch", "act_length", "act_vocab"))

    def _attend(self, q_BTNH, k_BTKH, v_BTKH, is_global, segment_ids_BT):
        c = self.config
        n = context_parallel.sequence_axis_size()
        # Context parallelism when T is sharded over `sequence`, always with the blocked kernel (the dense oracle's
        # T x T scores are what it avoids); a natural-order T that the axis does not divide stays replicated along T
        # (as `sharding.constrain` leaves it), so GSPMD runs the plain kernel.
        if n > 1 and (self.sequence_layout == "zigzag" or q_BTNH.shape[1] % n == 0):
            attend = functools.partial(context_parallel.context_parallel_attention, layout=self.sequence_layout)
        else:
            attend = functools.partial(attn_lib.attention, impl=self.attention_impl)

        def run(window):
            return attend(
                q_BTNH,
                k_BTKH,
                v_BTKH,
                window=window,
                segment_ids_BT=segment_ids_BT,
                block_q=self.block_size,
                block_k=self.block_size,
            )

        if all(c.is_global):
            return run(None)
        if not any(c.is_global):
            return run(c.sliding_window)
        if attend.func is attn_lib.attention and self.attention_impl == "xla":
            # The blocked loops take the window as a run-time value: one path for both kinds of layer (on CPU the
            # lax.cond of the two cost 0.17 s of a 2.0 s train step, BENCHMARKS.md).
            return run(jnp.where(is_global, attn_lib.GLOBAL_WINDOW, c.sliding_window).astype(jnp.int32))
        # Both branches are compiled once, inside the single scanned layer body.
        return jax.lax.cond(is_global, lambda: run(None), lambda: run(c.sliding_window))

    def _block(self, p, is_global, x_BTD, cos_BTH, sin_BTH, segment_ids_BT):
        q_BTNH, k_BTKH, v_BTKH = self.block_qkv(p, x_BTD, cos_BTH, sin_BTH)
        o_BTNH = self._attend(q_BTNH, k_BTKH, v_BTKH, is_global, segment_ids_BT)
        return self.block_out(p, x_BTD, o_BTNH)

    def block_qkv(self, p, x_BTD, cos_BTH, sin_BTH):
        """First half of a layer: one layer's params `p` and input -> RoPE'd q [B, T, N, H], k and v [B, T, K, H]."""
        c = self.config
        B, T, D = x_BTD.shape
        h_BTD = rms_norm(x_BTD, p["attn_norm"], c.rms_norm_eps)
        q_BTNH = _matmul(h_BTD, p["q"], 1).reshape(B, T, c.num_heads, c.head_dim)
        k_BTKH = _matmul(h_BTD, p["k"], 1).reshape(B, T, c.num_kv_heads, c.head_dim)
        v_BTKH = _matmul(h_BTD, p["v"], 1).reshape(B, T, c.num_kv_heads, c.head_dim)
        q_BTNH = sharding.constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
        q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
        return q_BTNH, k_BTKH, v_BTKH

    def block_out(self, p, x_BTD, o_BTNH):
        """Second half of a layer: attention output [B, T, N, H] -> residual, MLP -> the layer's output [B, T, D]."""
        c = self.config
        x_BTD = x_BTD + _matmul(o_BTNH, p["o"], 2)
        x_BTD = sharding.constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
        h_BTD = rms_norm(x_BTD, p["mlp_norm"], c.rms_norm_eps)
        a_BTF = jax.nn.silu(_matmul(h_BTD, p["gate"], 1)) * _matmul(h_BTD, p["up"], 1)
        a_BTF = sharding.constrain(a_BTF, ("act_batch", "act_length", "act_mlp"))
        x_BTD = x_BTD + _matmul(a_BTF, p["down"], 1)
        return sharding.constrain(x_BTD, ("act_batch", "act_length", "act_embed"))


def _matmul(x, w, n_in: int):
    """x [B, T, *in] @ w [*in, *out] -> [B, T, prod(out)] in x's dtype, as one 2-D matmul over B * T rows.

    The same contraction as an einsum over (B, T), but XLA's CPU backend runs the 2-D form's backward (weight
    gradients contract over the B * T rows) faster (BENCHMARKS.md, training step); on TPU the reshapes are free.
    """
    B, T = x.shape[:2]
    if isinstance(w, quant.QWeight):
        k = math.prod(w.qvalue.shape[:n_in])
        return quant.matmul(x.reshape(B * T, k), w, n_in).reshape(B, T, -1)
    k = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(B * T, k), w.reshape(k, -1).astype(x.dtype))
    return y.reshape(B, T, -1)
