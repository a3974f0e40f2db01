"""`make demo` / `cwm-demo`: build a tiny random CWM with transformers, load it with cwm_jax, compare the logits.

Needs the test extra (torch and transformers): `pip install -e ".[test]"`. The training issue replaces this with the
real main job (train a tiny CWM, then generate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cwm-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (every 4th and the last are global)")
    parser.add_argument("--seq-len", type=int, default=96, help="tokens per sequence (window is 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import numpy as np
        import torch
        import transformers
    except ImportError as e:
        print(f"cwm-demo: needs the test extra ({e.name} is missing): pip install -e '.[test]'", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cwm_jax import hf
    from cwm_jax.config import cwm_tiny, release_layer_types

    config = cwm_tiny(
        num_layers=args.layers,
        layer_types=release_layer_types(args.layers),
        max_position_embeddings=max(4096, args.seq_len),
    )
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    hf_kwargs = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")}
    torch_model = transformers.CwmForCausalLM(transformers.CwmConfig(**hf_kwargs, initializer_range=0.1)).eval()
    ids = np.random.RandomState(args.seed).randint(0, config.vocab_size, size=(2, args.seq_len))
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder, max_shard_size="200KB")
        start = time.perf_counter()
        model = hf.load_hf(folder, block_size=32)
        load_s = time.perf_counter() - start
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    forward = nnx.jit(lambda m, t: m(t))
    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(forward(model, jnp.asarray(ids))))
    run_s = time.perf_counter() - start
    err = float(np.abs(out - ref).max())
    print(
        f"tiny CWM: {config.num_layers} layers ({len(config.global_layers)} global: {config.global_layers}), "
        f"window {config.sliding_window}, {config.num_heads} heads / {config.num_kv_heads} KV heads"
    )
    print(f"loaded from sharded safetensors in {load_s:.2f}s; jitted forward (incl. compile) {run_s:.2f}s")
    print(
        f"logits [2, {args.seq_len}, {config.vocab_size}]: max |jax - transformers| = {err:.2e} "
        f"(logit scale {np.abs(ref).max():.2f}); top-1 agreement {np.mean(out.argmax(-1) == ref.argmax(-1)):.1%}"
    )
    if err > 1e-4:
        print("cwm-demo: logits disagree beyond 1e-4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
