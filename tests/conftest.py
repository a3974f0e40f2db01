"""Shared fixtures. Eight host CPU devices for the sharding tests (must be set before JAX initialises)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def make_hf_model(tmp_path, *, shard_size="20KB", seed=0, **overrides):
    """A tiny random transformers CWM saved with sharded safetensors and an index; returns (folder, torch model)."""
    import torch
    import transformers

    fields = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=8,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        bos_token_id=1,
        eos_token_id=[2],
        pad_token_id=0,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    config = transformers.CwmConfig(**fields)
    model = transformers.CwmForCausalLM(config).eval()
    # transformers initialises norms to ones; random norms make the parity test see their mapping too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size=shard_size)
    return str(folder), model


@pytest.fixture
def hf_model_factory(tmp_path):
    return lambda **kw: make_hf_model(tmp_path, **kw)


@pytest.fixture(scope="session")
def trained_tiny_checkpoint(tmp_path_factory):
    """A tiny CWM trained briefly by the project's own loop, as a converted bfloat16 checkpoint; returns its folder.

    `configs/tiny_quant.py` (4 layers, width 64, MLP 192, head_dim 16, byte tokenizer; input widths a group size of
    32 divides): 300 steps of 8 x 128 tokens of the stdlib files its TRAIN_FILES names, about 40 s on 2 CPU cores.
    `cwm_jax.train.export` (`cwm-convert train-to-orbax`) writes the float32 master weights as bfloat16, the
    release's dtype, with the byte tokenizer, so `load_tokenizer(folder)` finds it. Held-out text for tests: the
    stdlib's "[t-z]*.py".
    """
    from pathlib import Path

    from cwm_jax.train import export, loop
    from cwm_jax.train.config import load_config_file

    cfg = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "tiny_quant.py")
    root = tmp_path_factory.mktemp("trained_tiny")
    history = loop.train(cfg, root / "run")["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == cfg.steps
    # Clearly trained, not random: the last 20 steps' mean loss far below the first step's (about ln 512 = 6.2).
    assert sum(losses[-20:]) / 20 < 0.45 * losses[0], losses
    dst = root / "bf16"
    export.export(root / "run", dst, dtype="bfloat16")
    return dst
