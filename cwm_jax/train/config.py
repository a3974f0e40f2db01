"""The run config: what `configs/*.py` return, its defaults, and every check that can run before anything compiles.

A run config is an `ml_collections.ConfigDict`. The architecture is its `model` block: `preset` ("tiny" or "cwm_32b")
plus any `CwmConfig` field as an override (`--config.model.num_layers=4`). Everything else (mesh, batch, optimizer,
data, checkpoints) is the run's. `validate` raises `ConfigError` naming the key before a mesh, a model or a compile
exists, so a misconfigured pod job fails in seconds, not after minutes of compilation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from cwm_jax import attention
from cwm_jax.config import ConfigError, CwmConfig, cwm_32b, cwm_tiny
from cwm_jax.sharding import resolve_axis_sizes

PRESETS = {"tiny": cwm_tiny, "cwm_32b": cwm_32b}
DECAYS = ("cosine", "linear", "constant")
REMATS = ("none", "dots", "full")
NONFINITE = ("skip", "stop")
MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def default_config() -> ml_collections.ConfigDict:
    """Every key a run config may set, with this project's defaults (stage configs override what they need)."""
    from cwm_jax.data import default_data_config

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "tiny"})
    # Converted checkpoint (cwm-convert hf-to-orbax) to start from; its config.json must match the model block.
    c.init_from = ""
    c.seed = 0
    c.steps = 100
    c.seq_len = 256
    # Rows per optimizer step over all processes; split into `microbatches` accumulated in one jitted step.
    c.global_batch = 8
    c.microbatches = 1
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    c.dtype = "bfloat16"  # compute; parameters and optimizer state stay float32 (master weights)
    # "xla" (blocked reference, any backend), "pallas" (this project's kernel: Mosaic on TPU, Triton on GPU) or
    # "splash" (JAX's TPU kernel). attention_block sets the "xla" blocks; the kernels use per-generation defaults.
    c.attention_impl = "xla"
    c.attention_block = 512
    c.remat = "dots"
    c.loss = ml_collections.ConfigDict(dict(chunk=1024, z_loss=0.0))
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=3e-4,
            warmup_steps=10,
            decay="cosine",
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
        )
    )
    c.nonfinite = "skip"
    c.tokenizer = "byte"
    c.data = default_data_config()
    c.eval = ml_collections.ConfigDict(dict(every=0, batches=4))
    c.eval.data = default_data_config()
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True))
    c.log_every = 10
    c.tensorboard = True
    # The TPU slice the config is sized for (cwm-plan's default topology), e.g. "v5p-512".
    c.topology = ""
    c.sample = ml_collections.ConfigDict(dict(prompt="def ", max_new_tokens=64))
    return c


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """The `get_config()` of a run config file, loaded by path (configs/ is a folder of files, not a package);
    `get_config(arg)` when `arg` is given, as `--config FILE:ARG` does on the command line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such run config file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def model_config(cfg) -> CwmConfig:
    """The architecture of a run: the preset with the `model` block's overrides, in float32 parameters."""
    block = dict(cfg.model)
    preset = block.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"model.preset is {preset!r}; expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(CwmConfig)}
    unknown = sorted(set(block) - fields)
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a CwmConfig field; fields are {sorted(fields)}")
    for key in ("layer_types", "eos_token_ids"):
        if key in block:
            block[key] = tuple(block[key])
    try:
        config = PRESETS[preset](**block)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return dataclasses.replace(config, dtype=cfg.dtype, param_dtype="float32")


def mesh_shape(cfg, device_count: int) -> dict[str, int]:
    """Mesh axis sizes with the one -1 resolved; ConfigError naming `mesh.*` if they cannot fill `device_count`."""
    sizes = {a: cfg.mesh.get(a, 1) for a in MESH_AXES}
    extra = sorted(set(cfg.mesh) - set(MESH_AXES))
    if extra:
        raise ConfigError(f"mesh.{extra[0]} is not a mesh axis; axes are {MESH_AXES}")
    try:
        return resolve_axis_sizes(sizes, device_count, prefix="mesh.")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(cfg, device_count: int) -> tuple[CwmConfig, dict[str, int]]:
    """Check the whole run config; returns (architecture, mesh sizes) or raises ConfigError naming the key."""
    model = model_config(cfg)
    mesh = mesh_shape(cfg, device_count)

    def positive(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")

    for key in ("steps", "seq_len", "global_batch", "microbatches", "attention_block", "log_every"):
        positive(key, cfg[key])
    positive("loss.chunk", cfg.loss.chunk)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    if cfg.attention_impl not in attention.IMPLS:
        raise ConfigError(
            f"attention_impl={cfg.attention_impl!r}; valid values are {', '.join(map(repr, attention.IMPLS))}"
        )
    if cfg.checkpoint.every < 0 or cfg.eval.every < 0:
        raise ConfigError("checkpoint.every and eval.every must be >= 0 (0 turns them off)")
    if model.num_heads % mesh["tensor"] or model.num_kv_heads % mesh["tensor"]:
        raise ConfigError(
            f"mesh.tensor={mesh['tensor']} must divide model.num_heads={model.num_heads} and "
            f"model.num_kv_heads={model.num_kv_heads}"
        )
    batch_shards = mesh["data"] * mesh["fsdp"]
    if cfg.global_batch % cfg.microbatches:
        raise ConfigError(f"global_batch={cfg.global_batch} is not divisible by microbatches={cfg.microbatches}")
    micro = cfg.global_batch // cfg.microbatches
    if micro % batch_shards:
        raise ConfigError(
            f"each microbatch (global_batch={cfg.global_batch} / microbatches={cfg.microbatches} = {micro} rows) "
            f"must be divisible by mesh.data x mesh.fsdp = {batch_shards}"
        )
    seq_shards = mesh["sequence"] * (2 if mesh["sequence"] > 1 else 1)
    if cfg.seq_len % seq_shards:
        raise ConfigError(
            f"seq_len={cfg.seq_len} must be divisible by {seq_shards} (2 x mesh.sequence={mesh['sequence']}: "
            "the load-balanced layout cuts the sequence into two chunks per shard)"
        )
    if cfg.seq_len > model.max_position_embeddings:
        raise ConfigError(
            f"seq_len={cfg.seq_len} exceeds model.max_position_embeddings={model.max_position_embeddings}"
        )
    if cfg.remat not in REMATS:
        raise ConfigError(f"remat is {cfg.remat!r}; expected one of {REMATS}")
    if cfg.optimizer.decay not in DECAYS:
        raise ConfigError(f"optimizer.decay is {cfg.optimizer.decay!r}; expected one of {DECAYS}")
    if cfg.nonfinite not in NONFINITE:
        raise ConfigError(f"nonfinite is {cfg.nonfinite!r}; expected one of {NONFINITE}")
    if (
        isinstance(cfg.optimizer.warmup_steps, bool)
        or not isinstance(cfg.optimizer.warmup_steps, int)
        or (cfg.optimizer.warmup_steps < 0)
    ):
        raise ConfigError(f"optimizer.warmup_steps must be an integer >= 0, got {cfg.optimizer.warmup_steps!r}")
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name at least one source (see cwm_jax.data.default_data_config)")
    return model, mesh
