"""CwmConfig: the architecture of a CWM decoder, its presets, and transformers' config.json in and out.

Architecture values come from a preset or from a checkpoint's config.json, never from both silently. Everything
derived from the architecture (layer types, windows, RoPE frequencies, parameter and FLOP counts) is computed here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

FULL = "full_attention"
SLIDING = "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """An architecture config that cannot describe a CWM model; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """llama3 RoPE frequency scaling (the release: factor 16, low 1, high 4, original 8192)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class CwmConfig:
    """The architecture of a CWM decoder (defaults: the released 32B model, `../shared/spec/cwm.md` section 1).

    `dtype` (compute) and `param_dtype` (storage) are numerics, not architecture: `to_hf()` writes `param_dtype` as
    the checkpoint dtype and nothing for `dtype`. Change any field with `dataclasses.replace(config, ...)`.
    """

    vocab_size: int = 128256
    hidden_size: int = 6144
    num_layers: int = 64
    num_heads: int = 48
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 21504
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: Llama3RopeScaling | None = Llama3RopeScaling()
    max_position_embeddings: int = 131072
    sliding_window: int | None = 8192
    # One of FULL / SLIDING per layer; empty means transformers' fallback (global where i % 4 == 0).
    layer_types: tuple[str, ...] = ()
    bos_token_id: int = 128000
    eos_token_ids: tuple[int, ...] = (128001, 128008, 128009)
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size must be a positive integer, got {self.intermediate_size!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}) for GQA"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] is {t!r}; expected one of {LAYER_TYPES}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is None")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.max_position_embeddings <= 0:
            raise ConfigError(f"max_position_embeddings must be positive, got {self.max_position_embeddings}")
        s = self.rope_scaling
        if s is not None and (s.factor <= 0 or s.high_freq_factor <= s.low_freq_factor or s.low_freq_factor <= 0):
            raise ConfigError(f"rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {s}")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"{key} is {getattr(self, key)!r}; expected one of {DTYPES}")

    # ---- derived quantities (one place) ----

    @property
    def num_groups(self) -> int:
        """Query heads per KV head: query head h uses KV head h // num_groups."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_global(self) -> tuple[bool, ...]:
        return tuple(t == FULL for t in self.layer_types)

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.is_global) if g)

    def window(self, layer: int) -> int | None:
        """Keys a query of `layer` sees (i - W < j <= i), or None for a causal global layer."""
        return None if self.is_global[layer] else self.sliding_window

    def rope_inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2] in float32, llama3-scaled (computed in float64, then rounded)."""
        j = np.arange(0, self.head_dim, 2, dtype=np.float64)
        inv_freq = self.rope_theta ** (-j / self.head_dim)
        s = self.rope_scaling
        if s is not None:
            low_wl = s.original_max_position_embeddings / s.low_freq_factor
            high_wl = s.original_max_position_embeddings / s.high_freq_factor
            wl = 2 * math.pi / inv_freq
            smooth = (s.original_max_position_embeddings / wl - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
            inv_freq = np.where(wl > low_wl, inv_freq / s.factor, np.where(wl < high_wl, inv_freq, mid))
        return inv_freq.astype(np.float32)

    # ---- transformers config.json ----

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **numerics) -> CwmConfig:
        """Read transformers' config.json (a folder, the file, or its dict). `numerics` sets dtype / param_dtype.

        Accepts `model_type` "cwm", and "llama" when it carries `layer_types` or `sliding_window` (an early revision
        of the release). Without `layer_types` it follows transformers' fallback: global where i % 4 == 0.
        """
        source = "config dict"
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            try:
                with open(path) as f:
                    d = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no config.json found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return _from_hf_dict(d, source, numerics)

    def to_hf(self) -> dict[str, Any]:
        """transformers' config.json for this architecture (`CwmForCausalLM`, model_type "cwm")."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["CwmForCausalLM"],
            "model_type": "cwm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """transformers' fallback when config.json has no `layer_types`: global where i % 4 == 0."""
    return tuple(FULL if i % 4 == 0 else SLIDING for i in range(num_layers))


def release_layer_types(num_layers: int) -> tuple[str, ...]:
    """The native release's rule: global where i % 4 == 0, and the last layer (`global_last_layer`)."""
    types = list(default_layer_types(num_layers))
    types[-1] = FULL
    return tuple(types)


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_UNSUPPORTED_TRUE = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def _from_hf_dict(d: dict[str, Any], source: str, numerics: dict[str, Any]) -> CwmConfig:
    model_type = d.get("model_type")
    if model_type == "llama":
        if "layer_types" not in d and "sliding_window" not in d:
            raise ConfigError(
                f"{source}: model_type 'llama' without layer_types or sliding_window is a plain Llama, not CWM"
            )
    elif model_type != "cwm":
        raise ConfigError(f"{source}: model_type is {model_type!r}; expected 'cwm' (or 'llama' for early revisions)")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    for key in _UNSUPPORTED_TRUE:
        if d.get(key):
            raise ConfigError(f"{source}: {key}=true is not part of the CWM architecture")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act is {d['hidden_act']!r}; CWM uses 'silu'")
    num_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
    rope = d.get("rope_parameters") or {}
    if not rope:
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
        rope.setdefault("rope_type", rope.get("type", "default"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        try:
            scaling = Llama3RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: rope parameters of type llama3 miss {e.args[0]!r}") from None
    elif rope_type == "default":
        scaling = None
    else:
        raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported; expected 'llama3' or 'default'")
    eos = d.get("eos_token_id", [128001, 128008, 128009])
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    window = d.get("sliding_window", 8192)
    try:
        return CwmConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            sliding_window=None if window is None else int(window),
            layer_types=tuple(d.get("layer_types") or ()),
            bos_token_id=d.get("bos_token_id", 128000),
            eos_token_ids=tuple(eos),
            pad_token_id=d.get("pad_token_id"),
            **numerics,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def cwm_32b(**overrides) -> CwmConfig:
    """The released 32B model, computing and storing in bf16.

    17 global layers (0, 4, ..., 60, 63): the native code's rule with `global_last_layer`, and what a public mirror of
    the release config lists. transformers' fallback (no `layer_types`) would make 63 local; below 8192 tokens the
    two are the same model. A checkpoint's own config.json (`CwmConfig.from_hf`) always wins over this preset.
    """
    fields = dict(layer_types=release_layer_types(64), dtype="bfloat16", param_dtype="bfloat16")
    return CwmConfig(**{**fields, **overrides})


def cwm_tiny(**overrides) -> CwmConfig:
    """A tiny CWM for tests, demos and CPU runs: the 32B layer pattern (last layer global) at toy width."""
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=4096,
        sliding_window=16,
        rope_scaling=Llama3RopeScaling(original_max_position_embeddings=64),
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    fields.update(overrides)
    fields.setdefault("layer_types", release_layer_types(fields["num_layers"]))
    return CwmConfig(**fields)


def param_count(config: CwmConfig) -> int:
    """Number of parameters (cwm_32b: 32,581,097,472)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = attn + mlp + 2 * c.hidden_size
    return c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size


def flops_per_token(config: CwmConfig, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token of a sequence of `seq_len` (for MFU): matmuls plus attention, training = 3x forward.

    Attention counts the keys each query actually sees on average: (T + 1) / 2 on a global layer, and for a local
    layer the window capped by the causal prefix. The embedding lookup costs no FLOPs; the head does.
    """
    c = config
    matmul_params = param_count(c) - c.vocab_size * c.hidden_size - c.hidden_size * (2 * c.num_layers + 1)
    t = seq_len
    keys = 0.0
    for g in c.is_global:
        if g or c.sliding_window >= t:
            keys += (t + 1) / 2
        else:
            w = c.sliding_window
            keys += (w * (w + 1) / 2 + (t - w) * w) / t
    # QK^T and PV: 2 matmuls of 2 * N * H FLOPs per visible key.
    forward = 2 * matmul_params + 4 * c.num_heads * c.head_dim * keys
    return 3 * forward if training else forward
