"""Checkpoint conversion CLIs (transformers safetensors <-> Orbax, native DCP -> Orbax).

Installed as `cwm_jax.convert`.
"""
