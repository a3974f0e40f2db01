"""cwm_jax.serving: serving memory of the 32B config against a hand count, of the tiny one against its real arrays,
max_context against serving_bytes, choose_bits on the issue's devices, and `cwm-plan --serve`."""

import inspect

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from cwm_jax import generate, plan, quant, serving
from cwm_jax.config import cwm_32b, cwm_tiny
from cwm_jax.model import CwmModel

GB = 10**9
# The 32B release: hidden, layers, heads, KV heads, head dim, MLP, vocab, window; 17 global layers (0, 4, ..., 60, 63).
D, L, N, K, H, F, V, W = 6144, 64, 48, 8, 128, 21504, 128256, 8192
LG, LL = 17, 47


def hand_weights(bits: int | None, group: int | None = None) -> int:
    """Bytes of the 32B weights counted from the shapes: bf16 floats, packed integers, bf16 scales."""
    matmul_in_out = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F), (F, D)]
    floats = (V * D + 2 * D * L + D) * 2  # embedding and norms
    if bits is None:
        return floats + (L * sum(i * o for i, o in matmul_in_out) + D * V) * 2
    values = (L * sum(i * o for i, o in matmul_in_out) + D * V) * bits // 8
    groups = (lambda i: 1) if group is None else (lambda i: i // group)
    scales = (L * sum(groups(i) * o for i, o in matmul_in_out) + groups(D) * V) * 2
    return floats + values + scales


def hand_kv(context: int, batch: int) -> int:
    """bf16 K and V of the global layers for every position, of the local ones for min(W, context), ring positions."""
    ring = min(W, context)
    return batch * (2 * K * H * 2 * (LG * context + LL * ring) + 4 * ring)


@pytest.mark.parametrize(
    "bits, group, context, batch",
    [(None, None, 8192, 1), (8, None, 32768, 2), (4, 128, 131072, 1), (4, 128, 4096, 3)],
)
def test_32b_components_match_a_hand_count(bits, group, context, batch):
    qc = None if bits is None else quant.QuantConfig(bits=bits, group_size=group)
    b = serving.serving_bytes(cwm_32b(), qc, context, batch)
    weights, kv = hand_weights(bits, group), hand_kv(context, batch)
    scores = batch * N * min(512, context) * context * 4  # float32 prefill scores of one chunk on a global layer
    dequant = 0 if bits is None else 2 * D * V * 2  # two bf16 copies of the head, the largest quantized weight
    activations = max(scores, dequant) + 4 * batch * V * 4
    margin = int(0.06 * weights) + GB
    assert b == {
        "weights": weights,
        "kv_cache": kv,
        "kv_copies": 2 * kv,
        "activations": activations,
        "margin": margin,
        "allowance": activations + margin,
        "total": weights + 3 * kv + activations + margin,
    }


def test_32b_weights_are_the_issues_figures():
    c = cwm_32b()
    assert serving.serving_bytes(c, None, 1)["weights"] == 2 * 32_581_097_472
    assert round(serving.serving_bytes(c, quant.parse_bits(8), 1)["weights"] / GB) == 33  # "about 34 GB"
    assert round(serving.serving_bytes(c, quant.parse_bits(4), 1)["weights"] / GB) == 18


def test_sharding_divides_weights_by_devices_and_the_cache_by_the_tensor_width():
    c, qc = cwm_32b(), quant.parse_bits(8)
    one = serving.serving_bytes(c, qc, 32768)
    for devices, tensor in [(8, 8), (16, 8), (4, 4), (6, 2)]:
        b = serving.serving_bytes(c, qc, 32768, devices=devices)
        assert b["weights"] == -(-one["weights"] // devices)
        assert b["kv_cache"] == -(-one["kv_cache"] // tensor)
        assert b["activations"] == -(-one["activations"] // tensor)
        assert b["margin"] == int(0.06 * one["weights"] / devices) + GB


def test_tiny_weights_and_cache_match_the_arrays():
    """serving_bytes' weights and cache against the bytes of a real tiny model and cache (int4 counted packed)."""
    config = cwm_tiny()
    for qc in (None, quant.QuantConfig(bits=8), quant.QuantConfig(bits=4, group_size=32, head=False)):
        model = CwmModel(config, quant_config=qc, rngs=nnx.Rngs(0))
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        arrays = sum(x.size * (4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize) // 8 for x in leaves)
        b = serving.serving_bytes(config, qc, 100, batch=2)
        assert b["weights"] == arrays, qc
        cache = generate.init_cache(config, 2, 100)
        assert b["kv_cache"] == sum(x.nbytes for x in cache)


def test_prefill_chunk_is_generates_default():
    assert serving.PREFILL_CHUNK == inspect.signature(generate.generate).parameters["prefill_chunk"].default


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_max_context_is_the_longest_that_fits(bits):
    c, qc = cwm_32b(), quant.parse_bits(bits)
    previous = 0
    for gb in (16, 24, 32, 40, 48, 64, 80, 96, 120, 160):
        n = serving.max_context(c, qc, gb * GB)
        assert n >= previous  # more memory never serves less
        previous = n
        if 0 < n < c.max_position_embeddings:
            assert serving.serving_bytes(c, qc, n)["total"] <= gb * GB
            assert serving.serving_bytes(c, qc, n + 1)["total"] > gb * GB
        elif n == 0:
            assert serving.serving_bytes(c, qc, 1)["total"] > gb * GB
    assert previous == c.max_position_embeddings  # 160 GB hold every width at the full context


def test_max_context_with_batch_and_devices():
    c, qc = cwm_32b(), quant.parse_bits(4)
    one = serving.max_context(c, qc, 40 * GB)
    assert serving.max_context(c, qc, 40 * GB, batch=4) < one
    n = serving.max_context(c, qc, 16 * GB, batch=8, devices=8)
    assert 0 < n < c.max_position_embeddings
    total = [serving.serving_bytes(c, qc, context, 8, 8)["total"] for context in (n, n + 1)]
    assert total[0] <= 16 * GB < total[1]


@pytest.mark.parametrize(
    "devices, bits",
    [
        ([80e9], 8),  # bf16 would leave ~17k tokens; int8 serves > 64k
        ([40e9], 4),  # int8 fits ~600 tokens at most
        ([32e9], 4),
        ([16e9], 0),  # int4 weights alone are 18 GB
        ([16e9] * 8, 16),  # a v5e-8, sharded
        ([95e9] * 4, 16),  # a v5p-8 (4 chips)
        ([64.1e9], 8),  # JAX's default 75% of an 80 GiB GPU
        ([32.2e9], 4),  # ... of a 40 GiB A100
    ],
)
def test_choose_bits_on_the_issues_devices(devices, bits):
    choice = serving.choose_bits([int(d) for d in devices])
    assert choice.bits == bits, choice.reason
    if bits == 0:
        assert choice.quant_config is None and choice.max_context == 0
        assert choice.reason.startswith("nothing fits") and "32 GB" in choice.reason
    else:
        assert choice.quant_config == quant.parse_bits(bits)
        assert choice.max_context == choice.contexts[bits] >= serving.MIN_CONTEXT
        assert choice.reason.startswith("bf16" if bits == 16 else f"int{bits}")
    assert set(choice.contexts) == {16, 8, 4}


def test_choose_bits_uses_the_smallest_device_and_rejects_none():
    assert serving.choose_bits([int(80e9), int(40e9)]).contexts == serving.choose_bits([int(40e9)] * 2).contexts
    with pytest.raises(ValueError):
        serving.choose_bits([])


def test_serving_bytes_rejects_a_group_that_does_not_divide():
    with pytest.raises(quant.QuantError, match="does not divide"):
        serving.serving_bytes(cwm_tiny(), quant.QuantConfig(bits=4, group_size=128), 64)


def test_cli_serve_prints_the_report(capsys):
    assert plan.main(["--serve", "--bits", "4", "--device-gb", "40", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    c, qc = cwm_32b(), quant.parse_bits(4)
    b = serving.serving_bytes(c, qc, 32768)
    assert "int4 (groups of 128, quantized head)" in out
    assert f"{b['weights'] / GB:.2f} GB" in out and f"{b['total'] / GB:.2f} GB of 40 GB" in out
    assert "FITS" in out
    for gb in (32, 40, 80):
        assert f"{gb} GB {serving.max_context(c, qc, gb * GB):,}" in out


def test_cli_serve_does_not_fit_exits_0(capsys):
    assert plan.main(["--serve", "--bits", "16", "--device-gb", "40"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_serve_tiny_model(capsys):
    assert plan.main(["--serve", "--bits", "4", "--group-size", "32", "--model", "tiny", "--context", "1024"]) == 0
    assert "cwm_tiny, int4 (groups of 32" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--serve", "--bits", "3"], "--bits=3"),
        (["--serve", "--bits", "4", "--group-size", "100"], "does not divide"),
        (["--serve", "--bits", "4", "--model", "tiny"], "does not divide"),  # 128 > the tiny widths
        (["--serve", "--bits", "16", "--group-size", "128"], "only to --bits 8 or 4"),
        (["--serve"], "needs --bits"),
        ([], "--config is required"),
        (["--bits", "8"], "only with --serve"),
        (["--serve", "--bits", "8", "--context", "200000"], "max_position_embeddings"),
        (["--serve", "--bits", "8", "--config", "configs/cwm_32b_sft.py"], "takes no --config"),
    ],
)
def test_cli_serve_bad_flags_exit_2(capsys, argv, message):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
