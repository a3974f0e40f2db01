"""CwmConfig: presets, counts, transformers config.json in and out, validation errors."""

import dataclasses
import json

import pytest
import transformers

from cwm_jax.config import (
    FULL,
    SLIDING,
    ConfigError,
    CwmConfig,
    cwm_32b,
    cwm_tiny,
    default_layer_types,
    flops_per_token,
    param_count,
)


def test_32b_preset_and_param_count():
    c = cwm_32b()
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (6144, 64, 48, 8, 128)
    assert (c.intermediate_size, c.vocab_size, c.sliding_window, c.max_position_embeddings) == (
        21504,
        128256,
        8192,
        131072,
    )
    assert c.global_layers == (*range(0, 61, 4), 63)
    assert c.dtype == c.param_dtype == "bfloat16"
    assert param_count(c) == 32_581_097_472


def test_param_count_matches_transformers_module():
    cfg = cwm_tiny(num_layers=3, layer_types=(FULL, SLIDING, FULL))
    hf_model = transformers.CwmForCausalLM(transformers.CwmConfig(**_hf_kwargs(cfg)))
    assert param_count(cfg) == sum(p.numel() for p in hf_model.parameters())


def test_flops_per_token_counts_matmuls_and_visible_keys():
    c = cwm_tiny(num_layers=2, layer_types=(FULL, SLIDING), sliding_window=4)
    matmul = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    )
    head = c.hidden_size * c.vocab_size
    T = 8
    # global: keys 1..8 -> mean 4.5; local W=4: keys 1,2,3,4,4,4,4,4 -> mean 3.25.
    keys = 4.5 + 3.25
    expected = 2 * (2 * matmul + head) + 4 * c.num_heads * c.head_dim * keys
    assert flops_per_token(c, T, training=False) == pytest.approx(expected)
    assert flops_per_token(c, T) == pytest.approx(3 * expected)


def _hf_kwargs(cfg):
    return {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}


def test_to_hf_round_trips_through_transformers(tmp_path):
    cfg = cwm_32b()
    hf_cfg = transformers.CwmConfig(**_hf_kwargs(cfg))
    hf_cfg.save_pretrained(tmp_path)
    back = CwmConfig.from_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert back == cfg
    assert list(hf_cfg.layer_types) == list(cfg.layer_types)


def test_from_hf_without_layer_types_follows_transformers_fallback(tmp_path):
    hf_cfg = transformers.CwmConfig(num_hidden_layers=8)
    d = hf_cfg.to_dict()
    d.pop("layer_types")
    cfg = CwmConfig.from_hf(d)
    assert cfg.layer_types == default_layer_types(8) == tuple(transformers.CwmConfig(**_drop(d)).layer_types)
    assert cfg.global_layers == (0, 4)


def _drop(d):
    return {k: v for k, v in d.items() if k not in ("model_type", "architectures", "transformers_version")}


def test_from_hf_older_keys_and_llama_model_type():
    d = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 16,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    cfg = CwmConfig.from_hf(d)
    assert cfg.head_dim == 8 and cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0
    assert cfg.sliding_window == 16 and cfg.global_layers == (0,)
    plain_llama = {k: v for k, v in d.items() if k != "sliding_window"}
    with pytest.raises(ConfigError, match="plain Llama"):
        CwmConfig.from_hf(plain_llama)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(num_key_value_heads=3), "divisible by num_kv_heads"),
        (dict(layer_types=[FULL, "chunked_attention", SLIDING, SLIDING]), r"layer_types\[1\]"),
        (dict(layer_types=[FULL, SLIDING]), "layer_types has 2 entries"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "rope_type 'yarn'"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}), "low_freq_factor"),
    ],
)
def test_bad_config_json_names_the_key(tmp_path, change, message):
    d = cwm_tiny(num_layers=4, layer_types=default_layer_types(4)).to_hf()
    d.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message) as info:
        CwmConfig.from_hf(tmp_path)
    assert str(path) in str(info.value)


def test_missing_keys_and_unreadable_files(tmp_path):
    d = cwm_tiny().to_hf()
    del d["hidden_size"], d["vocab_size"]
    with pytest.raises(ConfigError, match="missing key.*vocab_size, hidden_size"):
        CwmConfig.from_hf(d)
    with pytest.raises(ConfigError, match="no config.json"):
        CwmConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CwmConfig.from_hf(tmp_path)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="sliding_attention layers but sliding_window is None"):
        cwm_tiny(sliding_window=None)
    with pytest.raises(ConfigError, match="dtype"):
        cwm_tiny(dtype="int8")
    cfg = dataclasses.replace(cwm_tiny(), sliding_window=None, layer_types=(FULL,) * 8)
    assert cfg.window(3) is None
