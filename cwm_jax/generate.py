"""KV caches (ring buffers for local layers), the cached forward, prefill, an on-device decode loop, and sampling.

Cache layout: global layers keep K/V of the whole context, [Lg, B, S, K, H] with slot = position; local layers keep a
ring of R = min(W, S) slots, [Ll, B, R, K, H] with slot = position % R, plus the position held in each ring slot,
[B, R] (-1 = empty), shared by all local layers since every layer writes the same positions. Position < 0 in the
input marks a padding token: it attends to nothing, is seen by nothing and is never written to the cache, so
right-padded prompts of different lengths run in one batch without touching each other.

Shapes: B batch, T new positions, S cache length (max context), R ring slots, D hidden, N query heads, K KV heads,
G = N // K, H head dim, V vocab, L layers (Lg global, Ll local), W window.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from cwm_jax import attention as attn_lib
from cwm_jax import sharding
from cwm_jax.config import CwmConfig
from cwm_jax.kernels.decode import decode_attention
from cwm_jax.model import CwmModel, rms_norm, rope_cos_sin


class KVCache(NamedTuple):
    """K/V of the global layers [Lg, B, S, K, H], ring buffers of the local layers [Ll, B, R, K, H], ring positions."""

    k_global: jax.Array
    v_global: jax.Array
    k_local: jax.Array
    v_local: jax.Array
    local_pos: jax.Array  # [B, R] int32, the position held in each ring slot, -1 = empty


def ring_slots(config: CwmConfig, max_len: int) -> int:
    """Ring slots a local layer needs for a context of `max_len`: the window, or fewer when the context is shorter."""
    return min(config.sliding_window, max_len) if config.sliding_window else 0


def kv_cache_bytes(config: CwmConfig, context: int, batch: int = 1, ring: bool = True) -> int:
    """Bytes of the KV cache of `batch` sequences of `context` tokens in the compute dtype.

    ring=True: local layers keep a ring of min(W, context) slots (plus the int32 slot positions); ring=False: every
    layer keeps all `context` positions, as a cache without ring buffers would.
    """
    per_pos = 2 * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize  # K and V
    num_global = len(config.global_layers)
    num_local = config.num_layers - num_global
    if not ring:
        return batch * config.num_layers * context * per_pos
    slots = ring_slots(config, context) if num_local else 0
    return batch * (num_global * context * per_pos + num_local * slots * per_pos + slots * 4)


def init_cache(config: CwmConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions; `dtype` defaults to the compute dtype."""
    dtype = jnp.dtype(dtype or config.dtype)
    K, H = config.num_kv_heads, config.head_dim
    num_global = len(config.global_layers)
    num_local = config.num_layers - num_global
    R = ring_slots(config, max_len) if num_local else 0
    return KVCache(
        k_global=jnp.zeros((num_global, batch, max_len, K, H), dtype),
        v_global=jnp.zeros((num_global, batch, max_len, K, H), dtype),
        k_local=jnp.zeros((num_local, batch, R, K, H), dtype),
        v_local=jnp.zeros((num_local, batch, R, K, H), dtype),
        local_pos=jnp.full((batch, R), -1, jnp.int32),
    )


def _masked_attention(q_BTNH, k_BSKH, v_BSKH, vis_BTS):
    """Dense GQA attention with an explicit visibility mask; a row that sees nothing (padding) gives zeros."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * H**-0.5
    s_BKGTS = jnp.where(vis_BTS[:, None, None], s_BKGTS, -jnp.inf)
    m_BKGT = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    # Empty rows: subtract 0 instead of -inf so exp gives 0, not NaN; then divide by 1 instead of 0.
    p_BKGTS = jnp.exp(s_BKGTS - jnp.where(m_BKGT == -jnp.inf, 0.0, m_BKGT))
    l_BKGT = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS / jnp.where(l_BKGT == 0.0, 1.0, l_BKGT)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def _decode_per_shard(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS=None, *, window=None, layer=None, interpret=False):
    """`decode_attention`, inside `jax.shard_map` under a mesh (batch over the data axes, heads over tensor, as the
    cache is laid out), so each device runs the kernel on its own shard of the cache; k, v may be layer stacks."""
    run = functools.partial(decode_attention, window=window, interpret=interpret)
    axes = attn_lib.kernel_mesh_axes(k_BSKH.shape[-4:])
    if axes is None:
        return run(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, layer=layer)
    manual, b, h = axes
    P = jax.sharding.PartitionSpec
    kv_spec = P(*(None,) * (k_BSKH.ndim - 4), b, None, h, None)
    args = [q_BTNH, k_BSKH, v_BSKH, q_pos_BT] + ([] if k_pos_BS is None else [k_pos_BS])
    specs = [P(b, None, h, None), kv_spec, kv_spec, P(b, None)] + ([] if k_pos_BS is None else [P(b, None)])
    if layer is not None:
        args, specs = args + [layer], specs + [P()]

    def body(q, k, v, qp, *rest):
        kp = rest[0] if k_pos_BS is not None else None
        return run(q, k, v, qp, kp, layer=rest[-1] if layer is not None else None)

    return jax.shard_map(body, in_specs=tuple(specs), out_specs=specs[0], axis_names=manual, check_vma=False)(*args)


def _ring_write_slots(positions_BT, R):
    """Ring slot of each new token, or R (dropped by the scatter) for padding and for tokens that a later token of
    the same chunk overwrites (only the chunk's last R positions survive, so the scatter never has duplicates)."""
    last_B = jnp.max(positions_BT, axis=1, keepdims=True)
    keep_BT = (positions_BT >= 0) & (positions_BT > last_B - R)
    return jnp.where(keep_BT, positions_BT % R, R)


# Under a mesh the cache follows the activations: batch over the data axes, KV heads over the tensor axis.
CACHE_AXES = (None, "act_batch", None, "act_kv_heads", None)


def constrain_cache(cache: KVCache) -> KVCache:
    """The cache with its sharding constrained under the current mesh (a no-op without one)."""
    stacks = [sharding.constrain(x, CACHE_AXES) for x in cache[:4]]
    return KVCache(*stacks, sharding.constrain(cache.local_pos, ("act_batch", None)))


def forward_cached(model: CwmModel, tokens_BT, positions_BT, cache: KVCache, *, return_hidden: bool = False):
    """Run T new tokens per sequence through the model at `positions_BT` against `cache`.

    tokens_BT, positions_BT: int32 [B, T]; positions of a sequence increase by one along T and continue what the cache
    holds; position < 0 marks padding. Returns (fp32 logits [B, T, V], or final hidden states [B, T, D] with
    return_hidden, and the new cache). A chunk may be longer than the window: local layers attend over the ring plus
    the chunk's own keys, then keep the chunk's last R positions.

    With `model.attention_impl == "pallas"` attention runs in the decode kernel (`cwm_jax.kernels.decode`): compiled
    on TPU, in interpret mode on the CPU (slow; for tests). On GPU the dense masked path stays (the kernel is Mosaic,
    and interpreting it there would be far slower than the dense path).
    """
    c = model.config
    dtype = jnp.dtype(c.dtype)
    cache = constrain_cache(cache)
    B, T = tokens_BT.shape
    S = cache.k_global.shape[2]
    R = cache.local_pos.shape[1]
    W = c.sliding_window
    positions_BT = positions_BT.astype(jnp.int32)
    valid_BT = positions_BT >= 0
    x_BTD = model.embed_tokens(tokens_BT)
    cos_BTH, sin_BTH = rope_cos_sin(jnp.maximum(positions_BT, 0), c.rope_inv_freq(), dtype)
    is_global = np.asarray(c.is_global)
    # Each layer's slot in its own stack (global or local); the other index is unused by that layer.
    global_idx_L = jnp.asarray(np.cumsum(is_global) - 1, jnp.int32)
    local_idx_L = jnp.asarray(np.cumsum(~is_global) - 1, jnp.int32)
    layer_params = model.layer_params()
    b_B1 = jnp.arange(B, dtype=jnp.int32)[:, None]
    q_pos_BT = jnp.where(valid_BT, positions_BT, -1)
    q_pos_BT1 = q_pos_BT[:, :, None]
    backend = jax.default_backend()
    use_kernel = model.attention_impl == "pallas" and backend != "gpu"
    kernel = functools.partial(_decode_per_shard, interpret=backend != "tpu")

    # Global: write first (slot = position), then attend over the whole cache by position.
    global_slot_BT = jnp.where(valid_BT, positions_BT, S)
    global_vis_BTS = (jnp.arange(S, dtype=jnp.int32)[None, None, :] <= q_pos_BT1) & valid_BT[:, :, None]
    # Local: keys are [ring as it was before this chunk, the chunk itself], masked by position q - W < k <= q.
    if R:
        ring_slot_BT = _ring_write_slots(positions_BT, R)
        ring_pos_BR = cache.local_pos.at[b_B1, ring_slot_BT].set(positions_BT, mode="drop")  # after this chunk
        k_pos_BS = jnp.concatenate([cache.local_pos, jnp.where(valid_BT, positions_BT, -1)], axis=1)[:, None, :]
        local_vis_BTS = (k_pos_BS >= 0) & (k_pos_BS <= q_pos_BT1) & (k_pos_BS > q_pos_BT1 - W) & valid_BT[:, :, None]

    def global_attend(q_BTNH, k_BTKH, v_BTKH, caches, gi, li):
        k_g, v_g, k_l, v_l = caches
        k_g = k_g.at[gi, b_B1, global_slot_BT].set(k_BTKH.astype(k_g.dtype), mode="drop")
        v_g = v_g.at[gi, b_B1, global_slot_BT].set(v_BTKH.astype(v_g.dtype), mode="drop")
        if use_kernel:
            # The whole stack with the layer index: the kernel reads only this layer's blocks up to each sequence's
            # last position, where slicing k_g[gi] would copy the layer's whole cache first.
            return kernel(q_BTNH, k_g, v_g, q_pos_BT, layer=gi), (k_g, v_g, k_l, v_l)
        k_BSKH, v_BSKH = k_g[gi].astype(dtype), v_g[gi].astype(dtype)
        return _masked_attention(q_BTNH, k_BSKH, v_BSKH, global_vis_BTS), (k_g, v_g, k_l, v_l)

    def local_attend(q_BTNH, k_BTKH, v_BTKH, caches, gi, li):
        k_g, v_g, k_l, v_l = caches
        if use_kernel and T == 1:
            # One new token overwrites the ring slot of position p - R, which its window (p - W, p] never sees
            # (R = W), or an empty slot (R < W: the context never exceeds R): write first, then attend over the ring
            # stack in place, with no copy of the ring into a [ring, chunk] array.
            k_l = k_l.at[li, b_B1, ring_slot_BT].set(k_BTKH.astype(k_l.dtype), mode="drop")
            v_l = v_l.at[li, b_B1, ring_slot_BT].set(v_BTKH.astype(v_l.dtype), mode="drop")
            o_BTNH = kernel(q_BTNH, k_l, v_l, q_pos_BT, ring_pos_BR, window=W, layer=li)
            return o_BTNH, (k_g, v_g, k_l, v_l)
        k_BSKH = jnp.concatenate([k_l[li].astype(dtype), k_BTKH], axis=1)
        v_BSKH = jnp.concatenate([v_l[li].astype(dtype), v_BTKH], axis=1)
        if use_kernel:
            o_BTNH = kernel(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS[:, 0], window=W)
        else:
            o_BTNH = _masked_attention(q_BTNH, k_BSKH, v_BSKH, local_vis_BTS)
        k_l = k_l.at[li, b_B1, ring_slot_BT].set(k_BTKH.astype(k_l.dtype), mode="drop")
        v_l = v_l.at[li, b_B1, ring_slot_BT].set(v_BTKH.astype(v_l.dtype), mode="drop")
        return o_BTNH, (k_g, v_g, k_l, v_l)

    def body(carry, xs):
        x_BTD, caches = carry
        p, g, gi, li = xs
        q_BTNH, k_BTKH, v_BTKH = model.block_qkv(p, x_BTD, cos_BTH, sin_BTH)
        args = (q_BTNH, k_BTKH, v_BTKH, caches, gi, li)
        if is_global.all():
            o_BTNH, caches = global_attend(*args)
        elif not is_global.any():
            o_BTNH, caches = local_attend(*args)
        else:
            o_BTNH, caches = jax.lax.cond(g, global_attend, local_attend, *args)
        return (model.block_out(p, x_BTD, o_BTNH), caches), None

    caches = (cache.k_global, cache.v_global, cache.k_local, cache.v_local)
    xs = (layer_params, jnp.asarray(is_global), global_idx_L, local_idx_L)
    (x_BTD, caches), _ = jax.lax.scan(body, (x_BTD, caches), xs)
    new_cache = constrain_cache(KVCache(*caches, ring_pos_BR if R else cache.local_pos))
    h_BTD = rms_norm(x_BTD, model.final_norm[...], c.rms_norm_eps)
    return (h_BTD if return_hidden else model.logits(h_BTD)), new_cache


def prompt_positions(lengths_B, T: int):
    """Positions 0..T-1 of right-padded prompts of `lengths_B` tokens, -1 on padding. [B] -> int32 [B, T]."""
    t_1T = jnp.arange(T, dtype=jnp.int32)[None, :]
    return jnp.where(t_1T < jnp.asarray(lengths_B, jnp.int32)[:, None], t_1T, -1)


@functools.partial(nnx.jit, static_argnames=("chunk",))
def prefill(model: CwmModel, tokens_BT, lengths_B, cache: KVCache, *, chunk: int | None = None):
    """Prompts right-padded to [B, T] with `lengths_B` real tokens into an empty cache.

    `chunk`: process the prompts `chunk` positions at a time (a `lax.scan` over chunks), so attention masks are
    [B, chunk, S] rather than [B, T, S] for long prompts; None or >= T is one pass.
    Returns (fp32 logits [B, V] at each prompt's last token, the cache); only those positions pay for the head.
    """
    B, T = tokens_BT.shape
    last_B = jnp.asarray(lengths_B, jnp.int32) - 1
    if chunk is None or chunk >= T:
        h_BTD, cache = forward_cached(model, tokens_BT, prompt_positions(lengths_B, T), cache, return_hidden=True)
        last_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
        return model.logits(last_BD[:, None])[:, 0], cache
    n = -(-T // chunk)
    tokens_BT = jnp.pad(tokens_BT, ((0, 0), (0, n * chunk - T)))
    positions_BT = prompt_positions(lengths_B, n * chunk)
    tokens_nBC, positions_nBC = (x.reshape(B, n, chunk).transpose(1, 0, 2) for x in (tokens_BT, positions_BT))

    def step(carry, xs):
        cache, last_BD = carry
        tok_BC, pos_BC = xs
        h_BCD, cache = forward_cached(model, tok_BC, pos_BC, cache, return_hidden=True)
        here_BC = pos_BC == last_B[:, None]
        last_BD = jnp.where(here_BC.any(axis=1)[:, None], jnp.sum(h_BCD * here_BC[..., None], axis=1), last_BD)
        return (cache, last_BD), None

    last_BD = jnp.zeros((B, model.config.hidden_size), jnp.dtype(model.config.dtype))
    (cache, last_BD), _ = jax.lax.scan(step, (cache, last_BD), (tokens_nBC, positions_nBC))
    return model.logits(last_BD[:, None])[:, 0], cache


def sample(logits_BV, key, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Next tokens [B] from fp32 logits [B, V]: argmax at temperature 0, else temperature / top-k / top-p sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        num_kept_B1 = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, num_kept_B1 - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# The streaming callback of the generate() call in progress. decode() compiles once with stream=True and its host
# callback (run on a runtime thread, hence no thread-local) looks the function up here, so a new callback per call
# costs no recompilation; the lock makes concurrent streaming calls take turns.
_stream: dict = {"fn": None}
_stream_lock = threading.Lock()


def _emit(i, tok_B, done_B) -> None:
    _stream["fn"](int(i), np.asarray(tok_B), np.asarray(done_B))


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "stream"))
def decode(
    model: CwmModel,
    logits_BV,
    lengths_B,
    cache: KVCache,
    key,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: tuple[int, ...] | None = None,
    stream: bool = False,
):
    """The on-device decode loop after `prefill`: sample from `logits_BV`, feed the token back, until every sequence
    produced a stop id (`stop_ids`, default the config's eos ids) or `max_new_tokens` tokens.

    Returns (tokens [B, max_new_tokens] int32, eos included, -1 after a sequence stopped; number produced [B]).
    stream: call the current `generate(on_token=...)` callback on the host after each step (an ordered io_callback,
    the loop's only host round trip).
    """
    eos = jnp.asarray((model.config.eos_token_ids if stop_ids is None else stop_ids) or (-2,), jnp.int32)
    B = logits_BV.shape[0]
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def record(i, tok_B, done_B, out_BN, count_B):
        if stream:
            io_callback(_emit, None, i, tok_B, done_B, ordered=True)
        out_BN = out_BN.at[:, i].set(jnp.where(done_B, -1, tok_B))
        count_B = count_B + (~done_B).astype(jnp.int32)
        return out_BN, count_B, done_B | jnp.isin(tok_B, eos)

    tok_B = pick(logits_BV, jax.random.fold_in(key, 0))
    out_BN, count_B, done_B = record(
        0, tok_B, jnp.zeros((B,), bool), jnp.full((B, max_new_tokens), -1, jnp.int32), jnp.zeros((B,), jnp.int32)
    )

    def cond(state):
        i, _, done_B, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        i, tok_B, done_B, cache, out_BN, count_B = state
        # A finished sequence runs as padding (position -1): it neither reads nor writes the cache.
        pos_B = jnp.where(done_B, -1, jnp.asarray(lengths_B, jnp.int32) + i - 1)
        logits_B1V, cache = forward_cached(model, tok_B[:, None], pos_B[:, None], cache)
        tok_B = pick(logits_B1V[:, 0], jax.random.fold_in(key, i))
        out_BN, count_B, done_B = record(i, tok_B, done_B, out_BN, count_B)
        return i + 1, tok_B, done_B, cache, out_BN, count_B

    state = (jnp.int32(1), tok_B, done_B, cache, out_BN, count_B)
    _, _, _, _, out_BN, count_B = jax.lax.while_loop(cond, body, state)
    return out_BN, count_B


def until_stop(new: Sequence[int], stop_ids) -> list[int]:
    """The tokens of a generated sequence before the first of `stop_ids` (all of them when none occurs)."""
    end = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
    return list(new[:end])


def generate(
    model: CwmModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids=None,
    prefill_chunk: int | None = 512,
    on_token=None,
    samples_per_prompt: int = 1,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), ending with the stop id that stopped it, if any.

    `samples_per_prompt` G > 1 returns G sequences per prompt (prompt-major: prompt p's samples at p * G ... p * G +
    G - 1): each prompt is prefilled once and its KV cache and first logits repeated G times for the decode, which
    samples each row with its own random stream (GRPO's groups).

    temperature 0 is greedy; otherwise sampling with optional top_k / top_p, reproducible for a given `seed`.
    `stop_ids` (default: the config's eos ids) end a sequence inside the decode loop. Prompts longer than
    `prefill_chunk` are prefilled that many positions at a time. `on_token(b, token)` is called on the host for
    each new token of sequence b as it is generated (streaming), in order.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = int(lengths.max())
    if T + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
            f"({model.config.max_position_embeddings}) of the model config"
        )
    tokens = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    cache = init_cache(model.config, len(prompts), T + max_new_tokens)
    logits_BV, cache = prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache, chunk=prefill_chunk)
    if samples_per_prompt > 1:
        logits_BV, cache = _repeat_rows(logits_BV, cache, samples_per_prompt)
        lengths = np.repeat(lengths, samples_per_prompt)
    with _stream_lock if on_token is not None else contextlib.nullcontext():
        if on_token is not None:
            # done_B is as it was before this step: a sequence that stopped earlier gets no more tokens.
            _stream["fn"] = lambda i, tok_B, done_B: [on_token(int(b), int(tok_B[b])) for b in np.flatnonzero(~done_B)]
        out_BN, count_B = decode(
            model,
            logits_BV,
            jnp.asarray(lengths),
            cache,
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_k=top_k,
            top_p=top_p,
            stop_ids=None if stop_ids is None else tuple(sorted(set(stop_ids))),
            stream=on_token is not None,
        )
        out_BN, count_B = np.asarray(out_BN), np.asarray(count_B)  # blocks until the loop and its callbacks finish
    return [out_BN[b, : count_B[b]].tolist() for b in range(len(lengths))]


@functools.partial(jax.jit, static_argnums=2)
def _repeat_rows(logits_BV, cache: KVCache, G: int):
    """Every row of the prefill's logits and cache G times in a row (batch axis 1 of the stacked K/V, 0 of the ring
    positions)."""
    cache = KVCache(
        *(jnp.repeat(x, G, axis=1) for x in (cache.k_global, cache.v_global, cache.k_local, cache.v_local)),
        local_pos=jnp.repeat(cache.local_pos, G, axis=0),
    )
    return jnp.repeat(logits_BV, G, axis=0), constrain_cache(cache)
