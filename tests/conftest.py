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


@pytest.fixture(scope="session")
def trained_trace_model(tmp_path_factory):
    """A tiny CWM trained briefly on execution traces, the traces made by `cwm-data traces`: returns a dict with
    "trained" and "untrained" (converted float32 checkpoints, the latter randomly initialised with the same
    architecture) and "held_out" (a tasks JSONL of calls the training traces did not include).

    The corpus is configs/data/trace_corpus.jsonl (7 short functions, 41 distinct calls each); the first call of each
    function is held out. `configs/tiny_traces.py` trains on the traces of the rest for its 200 steps (about two
    minutes on 2 cores).
    """
    import dataclasses
    import json
    from pathlib import Path

    from etils import epath
    from flax import nnx

    from cwm_jax import checkpoint
    from cwm_jax.data.cli import main as data_main
    from cwm_jax.model import CwmModel
    from cwm_jax.train import export, loop
    from cwm_jax.train.config import load_config_file, model_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    root = tmp_path_factory.mktemp("trace_model")
    records = [json.loads(line) for line in (configs / "data" / "trace_corpus.jsonl").read_text().splitlines()]
    (root / "train.jsonl").write_text("".join(json.dumps(dict(r, calls=r["calls"][1:])) + "\n" for r in records))
    (root / "held_out.jsonl").write_text("".join(json.dumps(dict(r, calls=r["calls"][:1])) + "\n" for r in records))
    argv = ["traces", str(root / "train.jsonl"), str(root / "traces")]
    assert data_main(argv) == 0
    cfg = load_config_file(configs / "tiny_traces.py", str(root / "traces"))
    history = loop.train(cfg, root / "run")["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses  # trained, not random
    export.export(root / "run", root / "trained", dtype="float32")
    config = dataclasses.replace(model_config(cfg), dtype="float32", param_dtype="float32")
    files = export.tokenizer_files(cfg.tokenizer, epath.Path(root))
    model = CwmModel(config, rngs=nnx.Rngs(0))
    checkpoint.save_streaming(root / "untrained", config, checkpoint.model_leaves(model), files=files)
    return dict(trained=root / "trained", untrained=root / "untrained", held_out=root / "held_out.jsonl")
