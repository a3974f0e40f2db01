"""Quality of int8 / int4 weight-only quantization on a tiny CWM trained by the project's own loop (issue 7).

The model: `configs/tiny_quant.py`, 300 steps on the stdlib files "[a-s]*.py" (the `trained_tiny_checkpoint` fixture,
exported as bfloat16). It is quantized here leaf by leaf (`quant.quantize` + `checkpoint.save_streaming(...,
quant_config=)`, the path of `cwm-convert quantize`), every checkpoint is loaded with `cwm_jax.load` in float32 compute,
so the bf16 model and the quantized ones differ only by the quantization of the weights. Held-out text: the stdlib
files "[t-z]*.py", which the model never saw, teacher-forced; KL divergence and perplexity are computed from the logits
in float64 numpy, independently of the model code.

Measured with the fixed seed (64 rows x 128 tokens; head quantized too, the default):
    int8 per channel:  KL(bf16 || int8) = 2.5e-5 nats/token, perplexity ratio 1.0006, top-1 agreement 99.6%
    int4 groups of 32: KL(bf16 || int4) = 3.9e-3 nats/token, perplexity ratio 1.0033, top-1 agreement 89.0%
    bf16 perplexity 19.1 per byte; greedy, 32 new tokens: int8 matches bf16 on 8 of 8 prompts (int4: 7 of 8).
Both bounds of the issue hold with margin: int8 within 1% (0.06%), int4 at group 32 within 5% (0.33%).
A 300-step byte model's greedy continuations are repetitive ("the the the", runs of spaces), so matching 32 greedy
tokens is a weak check by itself; the top-1 agreement over all 8,128 teacher-forced positions is the sharper one.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cwm_jax
from cwm_jax import checkpoint, quant
from cwm_jax.data.sources import stdlib_files
from cwm_jax.generate import generate
from cwm_jax.tokenizer import load_tokenizer
from cwm_jax.train.config import load_config_file

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_quant.py"  # what trained_tiny_checkpoint trains
HELD_OUT_FILES = "[t-z]*.py"
ROWS, SEQ = 64, 128  # the training context is 128 tokens
PROMPTS, PROMPT_LEN, NEW = 8, 32, 32
SCHEMES = {"int8": quant.QuantConfig(bits=8), "int4": quant.QuantConfig(bits=4, group_size=32)}


def _quantize_checkpoint(src, dst, qc: quant.QuantConfig) -> None:
    """A quantized copy of the converted checkpoint `src` at `dst`, one leaf at a time."""

    files = [f for f in src.iterdir() if f.is_file() and f.name != checkpoint.CONFIG_FILE]
    leaves = quant.quantize_leaves(checkpoint.iter_leaves(src), qc)
    checkpoint.save_streaming(dst, checkpoint.read_config(src), leaves, files=files, quant_config=qc)


def _held_out_rows(tokenizer) -> np.ndarray:
    """[ROWS, SEQ] token ids: up to 3 consecutive windows from the start of each held-out file (BOS first)."""
    config = load_config_file(CONFIG)
    trained = set(stdlib_files(config.data.sources[0].path))
    files = stdlib_files(HELD_OUT_FILES)
    assert files and not trained.intersection(files), "the held-out files overlap the training files"
    rows = []
    for f in files:
        ids = tokenizer.encode(Path(f).read_bytes().decode("utf-8", errors="replace"), bos=True)
        rows += [ids[i * SEQ : (i + 1) * SEQ] for i in range(min(3, len(ids) // SEQ))]
    assert len(rows) >= ROWS
    return np.array(rows[:ROWS], np.int32)


@pytest.fixture(scope="module")
def quantized(trained_tiny_checkpoint, tmp_path_factory):
    """{"bf16": the trained checkpoint, "int8": ..., "int4": ...} folders."""
    root = tmp_path_factory.mktemp("quant_quality")
    folders = {"bf16": trained_tiny_checkpoint}
    for name, qc in SCHEMES.items():
        folders[name] = root / name
        _quantize_checkpoint(trained_tiny_checkpoint, folders[name], qc)
    return folders


@pytest.fixture(scope="module")
def models(quantized):
    return {name: cwm_jax.load(folder, dtype="float32") for name, folder in quantized.items()}


@pytest.fixture(scope="module")
def held_out(trained_tiny_checkpoint):
    return _held_out_rows(load_tokenizer(trained_tiny_checkpoint))


@pytest.fixture(scope="module")
def log_probs(models, held_out):
    """Float64 next-token log-probabilities [ROWS, SEQ - 1, V] of each model, teacher-forced on the held-out rows."""
    forward = nnx.jit(lambda m, t: m(t))
    out = {}
    for name, model in models.items():
        logits = np.asarray(jax.device_get(forward(model, jnp.asarray(held_out))), np.float64)[:, :-1]
        logits -= logits.max(-1, keepdims=True)
        out[name] = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return out


def _nll(lp, rows) -> float:
    return float(-np.take_along_axis(lp, rows[:, 1:, None], -1).mean())


def _kl(lp_p, lp_q) -> float:
    """Mean over positions of KL(p || q) in nats."""
    return float((np.exp(lp_p) * (lp_p - lp_q)).sum(-1).mean())


def test_quantized_checkpoints_load_as_integer_weights(quantized, models):
    for name, qc in SCHEMES.items():
        assert quant.read(quantized[name]) == qc
        model = models[name]
        assert model.quant_config == qc
        params = model.layer_params()
        assert params["q"].qvalue.dtype == qc.qtype and params["down"].qvalue.dtype == qc.qtype
    assert quant.read(quantized["bf16"]) is None and models["bf16"].quant_config is None


def test_model_is_trained_not_random(log_probs, held_out):
    # A random model scores about ln 512 = 6.2 nats per byte; this one about 2.95 (perplexity 19) on unseen files.
    assert _nll(log_probs["bf16"], held_out) < 3.5


@pytest.mark.parametrize("name, bound", [("int8", 1.01), ("int4", 1.05)])
def test_perplexity_within_bound_of_bf16(log_probs, held_out, name, bound):
    # Measured: int8 1.0006, int4 (groups of 32) 1.0033; the issue asks for 1% and 5%.
    ratio = np.exp(_nll(log_probs[name], held_out) - _nll(log_probs["bf16"], held_out))
    assert 1 / bound <= ratio <= bound, f"{name} perplexity ratio {ratio:.4f}"


def test_kl_divergence_orders_int8_below_int4(log_probs):
    # Measured: int8 2.5e-5, int4 3.9e-3 nats per token. Nonzero: the quantized models are not the bf16 one.
    kl8, kl4 = _kl(log_probs["bf16"], log_probs["int8"]), _kl(log_probs["bf16"], log_probs["int4"])
    assert 0 < kl8 < 1e-3 and kl8 < kl4 < 2e-2, (kl8, kl4)
    # Teacher-forced greedy choices: measured 99.6% (int8) and 89.0% (int4) of positions agree with bf16.
    top1 = {n: np.mean(log_probs[n].argmax(-1) == log_probs["bf16"].argmax(-1)) for n in SCHEMES}
    assert top1["int8"] >= 0.99 and top1["int4"] >= 0.8, top1


def test_int8_greedy_generation_matches_bf16(models, held_out):
    # 32-token prompts from 8 different held-out files; no stop ids, so every sequence runs NEW tokens.
    prompts = [row[:PROMPT_LEN].tolist() for row in held_out[:: ROWS // PROMPTS][:PROMPTS]]
    reference = generate(models["bf16"], prompts, NEW, stop_ids=())
    int8 = generate(models["int8"], prompts, NEW, stop_ids=())
    assert all(len(r) == NEW for r in reference)
    matches = sum(a == b for a, b in zip(reference, int8, strict=True))
    # Measured: 8 of 8 prompts; the issue asks for most.
    assert matches >= 6, f"int8 greedy matches bf16 on {matches} of {PROMPTS} prompts"
