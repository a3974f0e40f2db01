"""Pallas attention kernels (TPU Mosaic and GPU Triton); installed as `cwm_jax.kernels`."""
