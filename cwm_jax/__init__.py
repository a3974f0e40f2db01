"""cwm-jax: Meta's CWM (Code World Model) in JAX / Flax NNX."""

from cwm_jax.config import ConfigError, CwmConfig, cwm_32b, cwm_tiny, flops_per_token, param_count
from cwm_jax.hf import load_hf
from cwm_jax.model import CwmModel

__all__ = [
    "ConfigError",
    "CwmConfig",
    "CwmModel",
    "cwm_32b",
    "cwm_tiny",
    "flops_per_token",
    "load",
    "load_hf",
    "param_count",
]


def __getattr__(name):
    # `cwm_jax.load` (restore a converted checkpoint) imports Orbax only when first used.
    if name == "load":
        from cwm_jax.checkpoint import load

        return load
    raise AttributeError(f"module 'cwm_jax' has no attribute {name!r}")
