"""The native CWM release (a PyTorch distributed checkpoint folder) -> the canonical tree, one tensor at a time.

A release folder holds `params.json` (`{"model": {...}, "tokenizer": {...}}`), `.metadata`, `__*_*.distcp` shards and
`tokenizer.model`. Everything is checked from `params.json` and `.metadata` before any tensor is read
(`read_params_json`, `scan_dcp`); `iter_dcp_tensors` then reads one tensor at a time with
`torch.distributed.checkpoint` in a single process, so host memory stays near the largest tensor.

Facts taken from the public `facebookresearch/cwm` code (commit 7930e02), not from the gated release itself:

- `params.json["model"]` holds the fields of `TransformerArgs` (`cwm/model/transformer.py`); the native loader
  (`cwm/fastgen/utils/loading.py`) merges it over the dataclass defaults, so a field left out means its default. We
  do the same, except that `dim`, `n_layers`, `n_heads` and `vocab_size` are required: a release without them is
  broken, not a default-sized model. Fields read: `dim`, `n_layers`, `n_heads`, `n_kv_heads` (None: `n_heads`),
  `head_dim` (None: `dim // n_heads`), `vocab_size`, `ffn_exp` (4), `ffn_dim_multiplier` (None), `multiple_of` (256),
  `norm_eps` (1e-5), `rope_theta` (10000), `pos_embed_impl` ("rope" or "scaled_rope"), `scaled_rope`
  (`scale_factor` 8, `old_context_len` 8192, `low_freq_factor` 1, `high_freq_factor` 4), `max_seq_len` (1024),
  `window_attn` (None: every layer global; else `window_pattern` 6, `local_window`, `global_window` None,
  `global_last_layer` True). `qkv_biases`, `qk_norm`, `weight_tying`, `q_lora_rank` and `kv_lora_rank` must be off.
  Unknown fields are ignored. The MLP width follows the native `FeedForward`: `int(2 * ffn_exp * dim / 3)`, times
  `ffn_dim_multiplier` (truncated), rounded up to `multiple_of` (the 32B model: 4, 1.3125, 256 -> 21504; those three
  values are this reading's guess, the shape check on `w1` catches a wrong one).
- Layer i is global when `i % window_pattern == 0`, or it is the last layer and `global_last_layer` is set; local
  layers see `local_window` keys (flash-attention `window_left = local_window - 1`). Global layers here are plain
  causal, so a `global_window` below `max_seq_len` is refused rather than silently dropped.
- Tensor keys: the native `Checkpointer` saves `{"model": DCPModelWrapper(model)}`, which DCP flattens to
  `model.<module name>` (e.g. `model.layers.0.attention.wq.weight`). A folder whose keys carry no `model.` prefix
  (plain module names) is read too; one folder uses one form, and any other entry is an error.
- q and k rows are in the interleaved RoPE layout (pairs 2j, 2j+1); they are permuted to the half-split layout of
  transformers and this project (`rope_rows_to_half_split`). Everything else maps one to one (spec section 2).

`.metadata` is a pickle, as in every DCP checkpoint: read only folders you trust.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator

import numpy as np

from cwm_jax.config import DTYPES, FULL, SLIDING, ConfigError, CwmConfig, Llama3RopeScaling
from cwm_jax.hf import CheckpointError, and_more, from_hf_tensor, hf_layout

# canonical name -> native module name (spec section 2).
NATIVE_TOP = {"embed": "tok_embeddings.weight", "final_norm": "norm.weight", "lm_head": "output.weight"}
NATIVE_LAYER = {
    "attn_norm": "attention_norm.weight",
    "q": "attention.wq.weight",
    "k": "attention.wk.weight",
    "v": "attention.wv.weight",
    "o": "attention.wo.weight",
    "mlp_norm": "ffn_norm.weight",
    "gate": "feed_forward.w1.weight",
    "up": "feed_forward.w3.weight",
    "down": "feed_forward.w2.weight",
}
KEY_PREFIX = "model."
_REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size")
_MUST_BE_OFF = ("qkv_biases", "qk_norm", "weight_tying", "q_lora_rank", "kv_lora_rank")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class DcpTensor:
    """One tensor of a native checkpoint, as `.metadata` describes it (nothing read yet)."""

    key: str  # key in .metadata, e.g. "model.layers.3.attention.wq.weight"
    path: tuple[str, ...]  # canonical path, e.g. ("layers", "3", "q")
    shape: tuple[int, ...]  # canonical shape
    stored_shape: tuple[int, ...]  # native shape ([out, in] for a Linear)
    n_in: int
    rope_heads: int  # heads whose rows go interleaved -> half-split; 0 for tensors without RoPE
    dtype: str  # numpy dtype name of the stored tensor
    nbytes: int


def native_layout(config: CwmConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], int, int]]:
    """Every native module name -> (canonical path, native shape, canonical shape, input dims, RoPE heads)."""
    rope_heads = {"q": config.num_heads, "k": config.num_kv_heads}
    out = {}
    for path, stored_shape, shape, n_in in hf_layout(config).values():
        if path[0] == "layers":
            name = f"layers.{path[1]}.{NATIVE_LAYER[path[2]]}"
        else:
            name = NATIVE_TOP[path[0]]
        out[name] = (path, stored_shape, shape, n_in, rope_heads.get(path[-1], 0))
    return out


def rope_rows_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a native q/k weight [n_heads * head_dim, d_in] from interleaved to half-split RoPE order (a copy).

    Within each head, native rows (2j, 2j+1) become rows (j, j + head_dim / 2).
    """
    rows, d_in = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(rows, d_in)


def read_params_json(src) -> CwmConfig:
    """The architecture of a native release folder, from its `params.json` (field names: the module docstring).

    `param_dtype` (and the compute `dtype`) is the stored dtype of the embedding in `.metadata`, or "bfloat16" when
    the folder has no `.metadata`. Raises CheckpointError naming params.json and the key.
    """
    path = os.path.join(os.fspath(src), "params.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; a native CWM folder has params.json next to .metadata") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    m = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: no 'model' object (expected {{'model': {{...}}, 'tokenizer': {{...}}}})")
    missing = [k for k in _REQUIRED if m.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: missing required key 'model.{missing[0]}' (native TransformerArgs field)")
    for key in _REQUIRED:
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] <= 0:
            raise CheckpointError(f"{path}: 'model.{key}' must be a positive integer, got {m[key]!r}")
    if not isinstance(m.get("window_attn") or {}, dict) or not isinstance(m.get("scaled_rope") or {}, dict):
        raise CheckpointError(f"{path}: 'model.window_attn' and 'model.scaled_rope' must be objects or null")
    for key in _MUST_BE_OFF:
        if m.get(key):
            raise CheckpointError(f"{path}: 'model.{key}' = {m[key]!r} is not part of the CWM architecture")

    n_layers, n_heads, dim = m["n_layers"], m["n_heads"], m["dim"]
    max_seq_len = m.get("max_seq_len", 1024)
    try:
        layer_types, sliding_window = _layer_types(m.get("window_attn"), n_layers, max_seq_len)
        config = CwmConfig(
            vocab_size=m["vocab_size"],
            hidden_size=dim,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=m.get("n_kv_heads") or n_heads,
            head_dim=m.get("head_dim") or dim // n_heads,
            intermediate_size=_ffn_width(m),
            rms_norm_eps=float(m.get("norm_eps", 1e-5)),
            rope_theta=float(m.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(m),
            max_position_embeddings=max_seq_len,
            sliding_window=sliding_window,
            layer_types=layer_types,
        )
    except (ConfigError, TypeError, ValueError) as e:  # ConfigError names the field; the others a bad value
        raise CheckpointError(f"{path}: {e}") from None
    param_dtype = _stored_dtype(src)
    return dataclasses.replace(config, dtype=param_dtype, param_dtype=param_dtype)


def _ffn_width(m: dict) -> int:
    # The native FeedForward's arithmetic, float division and truncation included.
    hidden = int(2 * (m.get("ffn_exp", 4) * m["dim"]) / 3)
    if m.get("ffn_dim_multiplier") is not None:
        hidden = int(m["ffn_dim_multiplier"] * hidden)
    multiple_of = m.get("multiple_of", 256)
    if not isinstance(multiple_of, int) or multiple_of <= 0:
        raise ConfigError(f"'model.multiple_of' must be a positive integer, got {multiple_of!r}")
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _rope_scaling(m: dict) -> Llama3RopeScaling | None:
    impl = m.get("pos_embed_impl", "rope")
    if impl == "rope":
        return None
    if impl != "scaled_rope":
        raise ConfigError(f"'model.pos_embed_impl' is {impl!r}; expected 'rope' or 'scaled_rope'")
    s = m.get("scaled_rope") or {}
    return Llama3RopeScaling(
        factor=float(s.get("scale_factor", 8)),
        low_freq_factor=float(s.get("low_freq_factor", 1)),
        high_freq_factor=float(s.get("high_freq_factor", 4)),
        original_max_position_embeddings=int(s.get("old_context_len", 8192)),
    )


def _layer_types(window: dict | None, n_layers: int, max_seq_len: int) -> tuple[tuple[str, ...], int | None]:
    if window is None:
        return (FULL,) * n_layers, None
    pattern = window.get("window_pattern", 6)
    if not isinstance(pattern, int) or pattern <= 0:
        raise ConfigError(f"'model.window_attn.window_pattern' must be a positive integer, got {pattern!r}")
    last = window.get("global_last_layer", True)
    types = tuple(FULL if (last and i == n_layers - 1) or i % pattern == 0 else SLIDING for i in range(n_layers))
    local = window.get("local_window")
    if SLIDING in types and local is None:
        raise ConfigError("'model.window_attn.local_window' is missing but some layers are local")
    global_window = window.get("global_window")
    if global_window is not None and global_window < max_seq_len:
        raise ConfigError(
            f"'model.window_attn.global_window' = {global_window} < max_seq_len {max_seq_len}: windowed global "
            "layers are not supported (global layers here are plain causal)"
        )
    return types, (None if SLIDING not in types else local)


def _read_metadata(src):
    path = os.path.join(os.fspath(src), ".metadata")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found; a native CWM folder is a PyTorch distributed checkpoint")
    try:
        from torch.distributed.checkpoint import FileSystemReader
    except ImportError:
        raise CheckpointError(
            f"{path}: reading a distributed checkpoint needs torch (the CPU build is enough)"
        ) from None
    try:
        return FileSystemReader(os.fspath(src)).read_metadata()
    except Exception as e:  # a truncated or foreign pickle raises anything
        raise CheckpointError(f"{path}: cannot read DCP metadata ({e!r})") from None


def _dtype_name(torch_dtype) -> str | None:
    name = str(torch_dtype).removeprefix("torch.")
    return name if name in _FLOAT_DTYPES else None


def _stored_dtype(src) -> str:
    if not os.path.exists(os.path.join(os.fspath(src), ".metadata")):
        return "bfloat16"
    entries = _read_metadata(src).state_dict_metadata
    for key in (KEY_PREFIX + NATIVE_TOP["embed"], NATIVE_TOP["embed"]):
        properties = getattr(entries.get(key), "properties", None)
        if properties is not None and _dtype_name(properties.dtype) in DTYPES:
            return _dtype_name(properties.dtype)
    return "bfloat16"


def scan_dcp(src, config: CwmConfig) -> list[DcpTensor]:
    """Check a native checkpoint folder against `config` from `.metadata` alone.

    Every tensor must be present, expected and of the shape params.json implies. Keys are `model.<name>` or plain
    `<name>` (module docstring). Raises CheckpointError naming the file and key; returns tensors in layout order.
    """
    path = os.path.join(os.fspath(src), ".metadata")
    entries = _read_metadata(src).state_dict_metadata
    prefix = KEY_PREFIX if any(k.startswith(KEY_PREFIX) for k in entries) else ""
    layout = {prefix + name: value for name, value in native_layout(config).items()}
    missing = [key for key in layout if key not in entries]
    if missing:
        more = and_more(missing)
        raise CheckpointError(f"{path}: tensor {missing[0]!r}{more} missing from the checkpoint")
    unexpected = sorted(set(entries) - set(layout))
    if unexpected:
        more = and_more(unexpected)
        raise CheckpointError(f"{path}: unexpected entry {unexpected[0]!r}{more} for this params.json")
    tensors = []
    for key, (key_path, stored_shape, shape, n_in, rope_heads) in layout.items():
        entry = entries[key]
        if not hasattr(entry, "size") or not hasattr(entry, "properties"):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({type(entry).__name__})")
        if tuple(entry.size) != stored_shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(entry.size)}, params.json implies {stored_shape}"
            )
        dtype = _dtype_name(entry.properties.dtype)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} is {entry.properties.dtype}; expected a float dtype")
        nbytes = math.prod(stored_shape) * _numpy_dtype(dtype).itemsize
        tensors.append(DcpTensor(key, key_path, shape, stored_shape, n_in, rope_heads, dtype, nbytes))
    return tensors


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def iter_dcp_tensors(src, tensors: list[DcpTensor]) -> Iterator[tuple[DcpTensor, np.ndarray]]:
    """Read tensors one at a time, each in the canonical layout (numpy, stored dtype; bf16 as ml_dtypes.bfloat16).

    q and k rows are permuted to half-split RoPE order when `rope_heads` is set. Raises CheckpointError naming the
    folder and key when a read fails.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    src = os.fspath(src)
    for t in tensors:
        buffer = torch.empty(t.stored_shape, dtype=getattr(torch, t.dtype))
        try:
            with warnings.catch_warnings():
                # no_dist is the intent here; DCP warns about it on every call.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({t.key: buffer}, storage_reader=dcp.FileSystemReader(src), no_dist=True)
        except Exception as e:  # DCP wraps read errors in CheckpointException with per-rank tracebacks
            reason = [line for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
            raise CheckpointError(f"{src}: cannot read tensor {t.key!r} ({reason[0].strip()})") from None
        if buffer.dtype == torch.bfloat16:
            # Reinterpret the bits: numpy has no bf16, and a float32 round trip would double the memory.
            array = buffer.view(torch.int16).numpy().view(_numpy_dtype("bfloat16"))
        else:
            array = buffer.numpy()
        if t.rope_heads:
            array = rope_rows_to_half_split(array, t.rope_heads)
        yield t, from_hf_tensor(array, t.shape, t.n_in)
