"""Accelerator memory to serve a CWM at a context length and bit width, the longest context that fits, and which bit
width a device can serve the 32B model at (what the notebook picks and `cwm-plan --serve` prints).

The count is per device, for `cwm_jax.generate.generate` (what `Generator` and `cwm-generate` run) with B sequences
of S tokens (prompt plus new tokens; the cache is allocated for S):

- weights: `quant.weight_bytes` (the float parameters in `config.param_dtype`; int8 / int4 values and their scales);
- KV cache: `generate.kv_cache_bytes` (ring buffers of W slots for the local layers, the compute dtype), held
  CACHE_COPIES times at the peak: `generate` keeps the empty cache while `prefill` writes a new one, and the prefill's
  chunk scan carries a third (neither function donates its cache; `decode`'s while loop copies its input likewise);
- activations: the larger of the prefill's attention scores (float32 [B, N, C, S] of a global layer, C = the
  prefill chunk: the dense attention path materializes them) and the dequantized weights XLA may build for a
  quantized matmul, plus the [B, V] float32 logits and the sampler's copies of them;
- margin: what else XLA keeps (fusion outputs, layout copies, compiled code), a share of the weights plus a constant.

Calibration: XLA's memory analysis (arguments + outputs + temporaries) of `prefill` (a prompt of nearly S tokens,
chunks of 512) and of `decode`, for the 32B model compiled ahead of time for one TPU chip on a CPU host (libtpu, no
TPU; jax 0.10.2), in GB of 1e9 bytes:

    width  S       B  step     compiled peak  serving_bytes total
    bf16   8192    1  prefill  76.82          77.32
    bf16   8192    1  decode   69.61          77.32
    bf16   32768   1  prefill  82.78          84.87
    int8   8192    1  prefill  41.83          45.98
    int8   32768   1  prefill  49.27          51.18
    int8   32768   1  decode   41.27          51.18
    int8   131072  1  prefill  72.43          81.38
    int8   16384   4  prefill  65.47          75.45
    int4   16384   1  prefill  26.62          31.36    (int4 on a v6e chip, the rest on a v5p chip)
    int4   16384   1  decode   26.56          31.36

The estimate is never below the compiler's peak; it is loosest at long contexts, where XLA does not keep all of one
layer's scores at once. Sharded over n devices (the notebook's mesh: tensor = gcd(n, KV heads), fsdp the rest), the
weights and their margin divide by n and the cache and activations by the tensor width, which splits KV heads.

Which width: the widest that serves at least LONG_CONTEXT tokens, else the one that serves the most if that is at
least MIN_CONTEXT tokens, else none (`choose_bits`). int8 is to cost under 1% of perplexity and int4 under 5% (the
issue's bounds, tests/test_quant_quality.py), while an agent's coding session runs to tens of thousands of tokens:
context comes first up to LONG_CONTEXT, precision after it. For the 32B model that gives bf16 on a v5e-8 (8 x 16 GB,
sharded), int8 on one 80 GB device (bf16 would leave it about 17k tokens), int4 on one 40 or 32 GB device (int8 fits
there, if at all, for about 1k tokens) and nothing on one 16 GB chip (the int4 weights alone are 18 GB). The same
choices hold for the memory JAX can use on such GPUs by default, 75% of the card: 64 GB of an 80 GiB H100 or A100
gives int8 (75k tokens), 32 GB of a 40 GiB A100 int4 (20k tokens).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from cwm_jax import quant
from cwm_jax.config import CwmConfig, cwm_32b
from cwm_jax.generate import kv_cache_bytes

GB = 10**9
# generate()'s default prefill_chunk (tests check they agree): prompts are prefilled this many positions at a time.
PREFILL_CHUNK = 512
# Caches alive at the prefill peak: the empty one generate() passes in, the one prefill returns, the scan's carry.
CACHE_COPIES = 3
# A quantized matmul XLA does not fuse builds its weight in the compute dtype: on TPU the int4 head twice in decode
# (the first token's sampling and the loop's), else one layer's int4 gate and up together; int8 was fused there, but
# is counted the same, since the GPU compiler's choice was not measured.
HEAD_DEQUANT_COPIES = 2
# Float32 [B, V] logits and the sampler's copies of them (top-p sorts values and ids).
LOGITS_COPIES = 4
# XLA's buffers beyond those counted above in the compiled prefills of the module docstring's table grow with the
# weights: up to 4.4 GB with bf16 weights (65 GB), 1.2 GB with int8 (33 GB); 6% of the weights plus 1 GB covers each.
MARGIN_SHARE = 0.06
MARGIN_BYTES = GB
# choose_bits: the context a width must serve to be chosen for its precision, and the least worth serving at all.
LONG_CONTEXT = 65536
MIN_CONTEXT = 8192
WIDTHS = (16, 8, 4)


class Choice(NamedTuple):
    """What `choose_bits` picked: bits 16, 8 or 4 (0: nothing fits), its QuantConfig (None for bf16 and for nothing),
    the longest context it serves, the longest context of every width ({16: ..., 8: ..., 4: ...}) and why."""

    bits: int
    quant_config: quant.QuantConfig | None
    max_context: int
    contexts: dict[int, int]
    reason: str


def _shards(config: CwmConfig, devices: int) -> tuple[int, int]:
    """(devices the weights split over, devices the cache and activations split over: the tensor width)."""
    if devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices}")
    return devices, math.gcd(devices, config.num_kv_heads)


def serving_bytes(
    config: CwmConfig,
    qc: quant.QuantConfig | None,
    context: int,
    batch: int = 1,
    devices: int = 1,
    prefill_chunk: int = PREFILL_CHUNK,
) -> dict[str, int]:
    """Bytes per device to serve `batch` sequences of `context` tokens with weights quantized by `qc` (None: float)
    on `devices` devices: {"weights", "kv_cache" (one cache), "kv_copies" (the other CACHE_COPIES - 1),
    "activations", "margin", "allowance" (activations + margin), "total"}. Raises QuantError when `qc`'s group size
    does not divide a quantized weight."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    if qc is not None:
        quant.check_config(config, qc)
    n, tensor = _shards(config, devices)
    c = config
    item = jnp.dtype(c.dtype).itemsize
    weights = quant.weight_bytes(c, qc, c.param_dtype)["total"]
    kv = kv_cache_bytes(c, context, batch)
    chunk = min(prefill_chunk, context)
    scores = batch * c.num_heads * chunk * context * 4
    dequant = 0
    if qc is not None:
        head = HEAD_DEQUANT_COPIES * c.hidden_size * c.vocab_size if qc.head else 0
        dequant = max(head, 2 * c.hidden_size * c.intermediate_size) * item
    activations = max(scores, dequant) + LOGITS_COPIES * batch * c.vocab_size * 4
    out = {
        "weights": -(-weights // n),
        "kv_cache": -(-kv // tensor),
        "kv_copies": (CACHE_COPIES - 1) * -(-kv // tensor),
        "activations": -(-activations // tensor),
        "margin": int(MARGIN_SHARE * weights / n) + MARGIN_BYTES,
    }
    out["allowance"] = out["activations"] + out["margin"]
    out["total"] = out["weights"] + out["kv_cache"] + out["kv_copies"] + out["allowance"]
    return out


def max_context(
    config: CwmConfig, qc: quant.QuantConfig | None, hbm_bytes: int, batch: int = 1, devices: int = 1
) -> int:
    """The longest context (at most `config.max_position_embeddings`) whose `serving_bytes` total fits in
    `hbm_bytes` per device, exact (bisection: the total grows with the context); 0 when not even one token fits."""

    def fits(context: int) -> bool:
        return serving_bytes(config, qc, context, batch, devices)["total"] <= hbm_bytes

    lo, hi = 0, config.max_position_embeddings
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _name(bits: int) -> str:
    return "bf16" if bits == 16 else f"int{bits}"


def choose_bits(device_bytes: list[int], config: CwmConfig | None = None, batch: int = 1) -> Choice:
    """The bit width to serve `config` (default: the 32B release) at on these devices (the memory each can use, e.g.
    `memory_stats()["bytes_limit"]`, which on a GPU is JAX's preallocated share; the smallest counts), sharded over
    all of them: the widest that serves
    LONG_CONTEXT tokens, else the one that serves the most if at least MIN_CONTEXT, else none (bits 0). Widths are
    bf16, int8 per output channel and int4 in groups of 128 (`quant.parse_bits`), each with a quantized head."""
    if not device_bytes or min(device_bytes) <= 0:
        raise ValueError(f"device_bytes must list the memory of at least one device, got {device_bytes!r}")
    config = config or cwm_32b()
    n, hbm = len(device_bytes), min(device_bytes)
    contexts = {bits: max_context(config, quant.parse_bits(bits), hbm, batch, n) for bits in WIDTHS}
    where = f"{n} device{'s' if n > 1 else ''} of {hbm / GB:.1f} GB"
    served = ", ".join(f"{_name(b)} {contexts[b]:,}" for b in WIDTHS)
    long_enough = [b for b in WIDTHS if contexts[b] >= min(LONG_CONTEXT, config.max_position_embeddings)]
    if long_enough:
        bits = long_enough[0]
        wider = [_name(b) for b in WIDTHS if b > bits]
        why = f"; {' and '.join(wider)} serve{'s' if len(wider) == 1 else ''} fewer" if wider else ""
        reason = (
            f"{_name(bits)}: the widest weights that serve at least {LONG_CONTEXT:,} tokens on {where}{why} "
            f"(longest context per width: {served} tokens)"
        )
    else:
        bits = max(WIDTHS, key=lambda b: (contexts[b], b))
        if contexts[bits] < MIN_CONTEXT:
            int4 = serving_bytes(config, quant.parse_bits(4), MIN_CONTEXT, batch, n)["total"]
            return Choice(
                0,
                None,
                0,
                contexts,
                f"nothing fits: serving {MIN_CONTEXT:,} tokens with int4 weights takes {int4 / GB:.1f} GB per device, "
                f"more than the {hbm / GB:.1f} GB of {'each of these devices' if n > 1 else 'this device'} (longest "
                f"context per width: {served} tokens); use a 32 GB or larger accelerator, or several chips (e.g. a "
                "TPU v5e-8)",
            )
        reason = (
            f"{_name(bits)}: no width serves {LONG_CONTEXT:,} tokens on {where}; {_name(bits)} serves the most "
            f"(longest context per width: {served} tokens)"
        )
    return Choice(bits, quant.parse_bits(bits), contexts[bits], contexts, reason)


DEVICE_SIZES_GB = (32, 40, 80)


def format_report(
    config: CwmConfig, qc: quant.QuantConfig | None, context: int, batch: int, device_bytes: int, name: str = ""
) -> str:
    """The report of `cwm-plan --serve`: serving_bytes on one device of `device_bytes` against it, whether it fits,
    and the longest context that fits on devices of DEVICE_SIZES_GB."""
    b = serving_bytes(config, qc, context, batch)

    def size(n: int) -> str:
        return f"{n / GB:8.2f} GB" if n >= GB // 10 else f"{n / 10**6:8.2f} MB"

    width = "bf16" if qc is None else qc.describe()
    lines = [
        f"{name or 'model'}, {width} weights, {batch} x {context:,} tokens, on one {device_bytes / GB:g} GB device:",
        f"  weights                  {size(b['weights'])}",
        f"  KV cache (ring buffers)  {size(b['kv_cache'])}",
        f"  {CACHE_COPIES - 1} more KV caches         {size(b['kv_copies'])}   "
        f"(generate holds {CACHE_COPIES} at the prefill peak)",
        f"  activations              {size(b['activations'])}   (prefill attention scores or dequantized "
        "weights, logits)",
        f"  margin                   {size(b['margin'])}   ({MARGIN_SHARE:.0%} of the weights + "
        f"{MARGIN_BYTES / GB:g} GB)",
        f"  total                    {size(b['total'])} of {device_bytes / GB:g} GB ({b['total'] / device_bytes:.0%})",
    ]
    longest = max_context(config, qc, device_bytes, batch)
    if b["total"] <= device_bytes:
        lines.append(f"FITS: {(device_bytes - b['total']) / GB:.2f} GB to spare; up to {longest:,} tokens fit")
    else:
        fit = f"up to {longest:,} tokens fit" if longest else "not even one token fits"
        lines.append(f"DOES NOT FIT: needs {(b['total'] - device_bytes) / GB:.2f} GB more; {fit} on this device")
    sizes = " | ".join(f"{gb} GB {max_context(config, qc, gb * GB, batch):,}" for gb in DEVICE_SIZES_GB)
    lines.append(f"longest context on one device (batch {batch}): {sizes} tokens")
    return "\n".join(lines)


__all__ = [
    "Choice",
    "LONG_CONTEXT",
    "MIN_CONTEXT",
    "choose_bits",
    "format_report",
    "max_context",
    "serving_bytes",
]
