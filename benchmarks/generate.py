"""Decode speed of cwm_jax `generate` against transformers' `generate` on the same tiny CWM, and the 32B KV cache size.

Builds a tiny random transformers CWM (hidden 64, 4 layers [full, sliding, sliding, full], 4 heads / 2 KV heads,
head_dim 16, MLP 128, vocab 512, window 16, fp32) whose only eos id lies outside the vocab (never produced), so both
sides produce exactly `--new-tokens` tokens (asserted), loads it with `cwm_jax.hf.load_hf`, and times greedy
generation from `--prompt-len`-token prompts at each batch size: the wall clock of a whole `generate` call (prefill +
decode), best of `--repeats` after one untimed warm-up call (for cwm_jax, the warm-up pays the compile; its time is
reported separately). transformers runs `model.generate(do_sample=False)` with its default dynamic KV cache and
`torch.set_num_threads(os.cpu_count())` (`--torch-threads`).
Also prints the KV cache bytes of the 32B config (`cwm_32b()`, bf16, batch 1) with and without ring buffers.

    python benchmarks/generate.py [--batch 1 8] [--new-tokens 256] [--prompt-len 32] [--repeats 3] [--torch-threads N]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from common import environment, write_json

TARGET = 3.0  # cwm_jax tokens/s over transformers tokens/s
CONTEXTS = (8192, 32768, 131072)


def make_hf_model(folder: str, seed: int = 0):
    """The tiny random transformers CWM, saved to `folder`, with an unreachable eos id; returns the torch model."""
    import torch
    import transformers

    config = transformers.CwmConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        bos_token_id=1,
        eos_token_id=[512],  # outside the vocab, never produced: both sides run to max_new_tokens
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.CwmForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def hf_generate(torch_model, prompts_BT: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' greedy generate with its default KV cache; returns the new tokens [B, new_tokens]."""
    import torch

    input_ids = torch.from_numpy(prompts_BT)
    with torch.inference_mode():
        out = torch_model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[:, prompts_BT.shape[1] :].numpy()


def best_of(repeats: int, fn, *args) -> tuple[float, float, object]:
    """(seconds of the first, warm-up call; best seconds of `repeats` more calls; the last call's result)."""
    start = time.perf_counter()
    out = fn(*args)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return first, best, out


def measure(batches, new_tokens: int, prompt_len: int, repeats: int, torch_threads: int) -> tuple[list[dict], dict]:
    """One row per batch size with both sides' best seconds, tokens/s, the jax warm-up time and token agreement."""
    import torch

    from cwm_jax.generate import generate
    from cwm_jax.hf import load_hf

    torch.set_num_threads(torch_threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch_model = make_hf_model(folder)
        model = load_hf(folder)
    assert min(model.config.eos_token_ids) >= model.config.vocab_size, model.config.eos_token_ids
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts_BT = rng.integers(3, model.config.vocab_size, (batch, prompt_len), dtype=np.int64)
        prompts = prompts_BT.tolist()
        first_jax, best_jax, out_jax = best_of(repeats, generate, model, prompts, new_tokens)
        first_hf, best_hf, out_hf = best_of(repeats, hf_generate, torch_model, prompts_BT, new_tokens)
        out_jax = np.asarray(out_jax)
        assert out_jax.shape == (batch, new_tokens), f"cwm_jax produced {out_jax.shape}"
        assert out_hf.shape == (batch, new_tokens), f"transformers produced {out_hf.shape}"
        tokens = batch * new_tokens
        rows.append(
            {
                "batch": batch,
                "jax_s": best_jax,
                "hf_s": best_hf,
                "jax_tok_s": tokens / best_jax,
                "hf_tok_s": tokens / best_hf,
                "ratio": best_hf / best_jax,
                "jax_first_call_s": first_jax,
                "jax_compile_s": first_jax - best_jax,
                "hf_first_call_s": first_hf,
                "same_tokens": float(np.mean(out_jax == out_hf)),
                "same_first_token": float(np.mean(out_jax[:, 0] == out_hf[:, 0])),
            }
        )
    env = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return rows, env


def kv_rows() -> list[dict]:
    """KV cache GB of the 32B config (bf16, batch 1) at each context, with and without ring buffers."""
    from cwm_jax.config import cwm_32b
    from cwm_jax.generate import kv_cache_bytes

    config = cwm_32b()
    rows = []
    for context in CONTEXTS:
        ring = kv_cache_bytes(config, context, ring=True)
        full = kv_cache_bytes(config, context, ring=False)
        rows.append({"context": context, "ring_gb": ring / 1e9, "no_ring_gb": full / 1e9, "ratio": ring / full})
    return rows


def main(argv=None) -> int:
    """Measure, print the ratios and the tables; optionally write JSON. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the best is kept")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: the CPU count")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1 or args.torch_threads < 1:
        print("error: want positive --batch, --new-tokens, --prompt-len, --repeats, --torch-threads", file=sys.stderr)
        return 2

    rows, env = measure(args.batch, args.new_tokens, args.prompt_len, args.repeats, args.torch_threads)
    ratios = ", ".join(f"batch {r['batch']} {r['ratio']:.2f}x" for r in rows)
    met = all(r["ratio"] >= TARGET for r in rows)
    print(f"ratio cwm_jax / transformers tokens/s: {ratios} (target {TARGET:.0f}x: {'met' if met else 'missed'})")
    print(
        f"\n{args.new_tokens} new tokens, {args.prompt_len}-token prompts, greedy; torch threads {env['torch_threads']}"
    )
    print(
        "\n| batch | cwm_jax / transformers | cwm_jax tok/s | transformers tok/s | cwm_jax s | transformers s "
        "| cwm_jax first call s | cwm_jax compile s | same tokens |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['ratio']:.2f} | {r['jax_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['jax_s']:.3f} "
            f"| {r['hf_s']:.3f} | {r['jax_first_call_s']:.2f} | {r['jax_compile_s']:.2f} | {r['same_tokens']:.1%} |"
        )
    kv = kv_rows()
    print("\nKV cache of cwm_32b() (bf16, batch 1)\n")
    print("| context | ring / no ring | with ring GB | without ring GB |\n|---:|---:|---:|---:|")
    for r in kv:
        print(f"| {r['context']} | {r['ratio']:.2f} | {r['ring_gb']:.2f} | {r['no_ring_gb']:.2f} |")

    if args.json:
        result = {
            "benchmark": "generate",
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "repeats": args.repeats,
            **environment(),
            **env,
            "target": TARGET,
            "target_met": met,
            "rows": rows,
            "kv_cache_32b": kv,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
