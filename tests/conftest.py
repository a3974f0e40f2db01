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
