"""`make demo` / `cwm-demo`: check the decoder against transformers, then train a tiny CWM on this CPU and sample it.

1. parity: a tiny random CWM built by transformers, loaded by cwm_jax: the logits agree (max difference printed).
2. training: `configs/tiny_pretrain.py` on the Python standard library's own source (every machine has it), the loss
   falling step by step, an Orbax checkpoint in the workdir, and a sample from the trained model.
The parity step needs the test extra (torch, transformers): `pip install -e ".[test]"`; `--skip-parity` skips it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

MARKER = ".cwm-demo"


def _tiny_pretrain_config():
    path = Path(__file__).resolve().parents[1] / "configs" / "tiny_pretrain.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run cwm-demo from a checkout of the cwm-jax repository")
    from cwm_jax.train.config import load_config_file

    return load_config_file(path)


def train_demo(workdir: Path, steps: int | None) -> int:
    """Train the tiny config in `workdir` (a previous demo run there is replaced); print the loss curve's ends."""
    from cwm_jax.train.loop import setup_logging, train

    if workdir.exists():
        if not (workdir / MARKER).exists():
            print(f"cwm-demo: {workdir} exists and is not a demo workdir; pass another --workdir", file=sys.stderr)
            return 2
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()
    cfg = _tiny_pretrain_config()
    if steps is not None:
        cfg.steps = steps
        cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, steps)
    print(f"training configs/tiny_pretrain.py for {cfg.steps} steps in {workdir} (checkpoints, TensorBoard events)")
    setup_logging()
    start = time.perf_counter()
    history = train(cfg, workdir)["history"]
    first, last = history[0], history[-1]
    print(
        f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']} in "
        f"{time.perf_counter() - start:.0f}s; checkpoint: {workdir / 'checkpoints' / str(last['step'])}"
    )
    return 0 if last["loss"] < first["loss"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cwm-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where the demo run trains")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--skip-parity", action="store_true", help="skip the transformers logit check")
    parser.add_argument("--skip-training", action="store_true", help="only the transformers logit check")
    parser.add_argument("--layers", type=int, default=8, help="parity model layers (every 4th and the last global)")
    parser.add_argument("--seq-len", type=int, default=96, help="parity tokens per sequence (window is 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from cwm_jax.train.loop import skip_absent_accelerators

    skip_absent_accelerators()
    if not args.skip_parity:
        status = parity(args)
        if status:
            return status
    return 0 if args.skip_training else train_demo(args.workdir, args.steps)


def parity(args) -> int:
    """The logits of a tiny random transformers CWM and of the same weights loaded by cwm_jax agree within 1e-4."""
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
