"""Train-step tokens/s of cwm_jax's jitted `Trainer.step` against transformers' PyTorch CWM on this CPU.

A CWM-shaped model of about 20M parameters (hidden 384, 8 layers with the release pattern [global at 0, 4 and the
last layer 7, sliding elsewhere], 6 query / 2 KV heads, head_dim 64, SwiGLU MLP 1024, vocab 8192, sliding window 128
< T, llama3 RoPE), float32 on both sides (CPUs have no fast bf16 matmul). Both sides start from the same weights
(cwm_jax's random init, copied into transformers with `cwm_jax.hf.hf_state_dict`) and train on the same random batch
(`--batch` rows of `--seq-len` tokens, causal, no packing: segment ids and loss mask all ones) with the same step:
forward, mean token cross-entropy, backward, global-norm clipping to 1.0, AdamW (lr 1e-4, betas 0.9 / 0.95, eps 1e-8,
weight decay 0.1 on the matrices, none on the norms).

cwm_jax: `Trainer(cfg, model_config(cfg), mesh)` on one CPU device (remat "none", blocked attention with
`--attention-block`, the chunked loss with `--loss-chunk`), state donated. transformers: `CwmForCausalLM` with
attn_implementation "sdpa" (its default and the fastest on CPU), the loss computed from its logits against the same
targets (transformers' `labels=` would shift them again), `clip_grad_norm_`, `torch.optim.AdamW` (`--torch-optimizer`,
default fused), `torch.set_num_threads(--torch-threads)`.

Before timing, the first two steps' losses must agree within 1e-4 relative (the first checks the forward, the second
the gradients and the optimizer update). Then `--rounds` rounds alternate the two sides (cwm_jax, transformers,
cwm_jax, ...), `--steps` timed steps each; the medians of the per-step times give tokens/s and their ratio. The
matmul ceiling is this CPU's best float32 GEMM rate (`--gemm-size` cubed, jnp.dot jitted and torch.matmul, best of
5); each side's model FLOP/s (`flops_per_token` x tokens/s) is given as a share of the better of the two.

    python benchmarks/train_step.py [--batch 4] [--seq-len 512] [--rounds 5] [--steps 2] [--attention-block 128]
        [--loss-chunk 512] [--torch-threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from common import environment, write_json

TARGET = 1.2  # cwm_jax tokens/s over transformers tokens/s
LOSS_RTOL = 1e-4
MODEL = dict(
    preset="tiny",
    vocab_size=8192,
    hidden_size=384,
    num_layers=8,
    num_heads=6,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=1024,
    sliding_window=128,
)


def run_config(args):
    """The cwm_jax run config: the model overrides, the batch and an AdamW step with a constant learning rate."""
    import ml_collections

    from cwm_jax.train.config import default_config

    cfg = default_config()
    cfg.model = ml_collections.ConfigDict(MODEL)
    cfg.seq_len, cfg.global_batch, cfg.steps = args.seq_len, args.batch, 1000
    cfg.dtype = "float32"
    cfg.remat = args.remat
    cfg.attention_block = args.attention_block
    cfg.attention_impl = args.attention_impl
    cfg.loss.chunk = args.loss_chunk
    cfg.loss.z_loss = 0.0
    cfg.optimizer.update(dict(lr=1e-4, warmup_steps=0, decay="constant", clip_norm=1.0, weight_decay=0.1))
    return cfg


def make_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Random tokens; targets are the next tokens; one document per row; every position counts in the loss."""
    toks = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
        segment_ids=ones,
        loss_mask=ones.astype(np.float32),
    )


class JaxSide:
    """cwm_jax's train step on one CPU device; `step()` runs one step and returns its loss (blocked on)."""

    def __init__(self, cfg, batch: dict):
        import jax

        from cwm_jax.sharding import make_mesh
        from cwm_jax.train.config import model_config
        from cwm_jax.train.step import Trainer

        mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
        self.trainer = Trainer(cfg, model_config(cfg), mesh)
        self.state = self.trainer.init_state()
        self.batch = self.trainer.global_batch(batch)

    def hf_weights(self) -> dict:
        """The current parameters by transformers name (numpy, transformers layout)."""
        from cwm_jax import hf

        return dict(hf.hf_state_dict(self.trainer.model(self.state["params"])))

    def step(self) -> float:
        self.state, metrics = self.trainer.step(self.state, self.batch)
        return float(metrics["loss"])


class TorchSide:
    """transformers' CwmForCausalLM with the same weights and the same step; `step()` returns the loss."""

    def __init__(self, model_config, weights: dict, batch: dict, optimizer: str):
        import torch
        import transformers

        hf_config = transformers.CwmConfig.from_dict(model_config.to_hf())
        hf_config._attn_implementation = "sdpa"
        self.model = transformers.CwmForCausalLM(hf_config).train()
        missing, unexpected = self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        assert not missing and not unexpected, (missing, unexpected)
        decay = [p for n, p in self.model.named_parameters() if not n.endswith("norm.weight")]
        no_decay = [p for n, p in self.model.named_parameters() if n.endswith("norm.weight")]
        groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]
        kwargs = {"fused": True} if optimizer == "fused" else {"foreach": optimizer == "foreach"}
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **kwargs)
        self.inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64)).reshape(-1)
        self.vocab = model_config.vocab_size

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        logits = self.model(input_ids=self.inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, self.vocab).float(), self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def gemm_flops(n: int, repeats: int = 5) -> dict:
    """Best float32 [n, n] x [n, n] FLOP/s of a jitted jnp.dot and of torch.matmul."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    x = jax.device_put(a)
    dot(x, x).block_until_ready()
    t = torch.from_numpy(a)
    torch.matmul(t, t)
    best = {"jax": float("inf"), "torch": float("inf")}
    for _ in range(repeats):
        start = time.perf_counter()
        dot(x, x).block_until_ready()
        best["jax"] = min(best["jax"], time.perf_counter() - start)
        start = time.perf_counter()
        torch.matmul(t, t)
        best["torch"] = min(best["torch"], time.perf_counter() - start)
    return {k: 2 * n**3 / s for k, s in best.items()}


def measure(args) -> dict:
    """Check that both sides compute the same step, then time them interleaved; returns the numbers."""
    import torch

    from cwm_jax.config import flops_per_token, param_count
    from cwm_jax.train.config import model_config

    torch.set_num_threads(args.torch_threads)
    cfg = run_config(args)
    config = model_config(cfg)
    batch = make_batch(config.vocab_size, args.batch, args.seq_len)
    jax_side = JaxSide(cfg, batch)
    torch_side = TorchSide(config, jax_side.hf_weights(), batch, args.torch_optimizer)

    start = time.perf_counter()
    jax_losses = [jax_side.step()]
    jax_first_s = time.perf_counter() - start
    start = time.perf_counter()
    torch_losses = [torch_side.step()]
    torch_first_s = time.perf_counter() - start
    jax_losses.append(jax_side.step())
    torch_losses.append(torch_side.step())
    rel = [abs(a - b) / abs(b) for a, b in zip(jax_losses, torch_losses, strict=True)]
    print(
        f"losses (cwm_jax / transformers): step 1 {jax_losses[0]:.6f} / {torch_losses[0]:.6f}, "
        f"step 2 {jax_losses[1]:.6f} / {torch_losses[1]:.6f}; relative differences {rel[0]:.1e}, {rel[1]:.1e}"
    )
    if max(rel) > LOSS_RTOL:
        raise AssertionError(
            f"losses differ by more than {LOSS_RTOL:g} relative: {rel}; the two steps are not the same"
        )

    times = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for name, side in (("jax", jax_side), ("torch", torch_side)):
            for _ in range(args.steps):
                start = time.perf_counter()
                side.step()
                times[name].append(time.perf_counter() - start)
    gemm = gemm_flops(args.gemm_size)
    ceiling = max(gemm.values())
    tokens = args.batch * args.seq_len
    flops_token = flops_per_token(config, args.seq_len)
    sides = {}
    for name in times:
        median = statistics.median(times[name])
        sides[name] = {
            "median_s": median,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "tok_s": tokens / median,
            "model_flop_s": flops_token * tokens / median,
            "share_of_ceiling": flops_token * tokens / median / ceiling,
            "times_s": times[name],
        }
    return {
        "params": param_count(config),
        "flops_per_token": flops_token,
        "ratio": sides["torch"]["median_s"] / sides["jax"]["median_s"],
        # Fastest steps, closest to an idle machine: on a loaded host eager PyTorch slows far more than XLA.
        "best_step_ratio": sides["torch"]["min_s"] / sides["jax"]["min_s"],
        "jax": {**sides["jax"], "first_step_s": jax_first_s},
        "torch": {**sides["torch"], "first_step_s": torch_first_s, "version": torch.__version__},
        "losses": {"jax": jax_losses, "torch": torch_losses, "relative_difference": rel},
        "gemm_flop_s": gemm,
        "ceiling_flop_s": ceiling,
        "torch_threads": torch.get_num_threads(),
    }


def breakdown(args) -> dict:
    """Seconds (best of 5, after a compile) of the pieces of cwm_jax's step: the model's forward to the hidden states,
    the gradients of the whole loss, the loss head alone (forward + backward), one attention call's forward + backward
    for a global and for a local layer at the step's shapes, and the whole step, then the whole step again with
    attention replaced by the identity (what attention costs)."""
    import jax

    from cwm_jax import attention
    from cwm_jax.train.config import model_config
    from cwm_jax.train.step import chunked_cross_entropy

    cfg = run_config(args)
    batch = make_batch(model_config(cfg).vocab_size, args.batch, args.seq_len)

    def best(fn, *xs):
        jax.block_until_ready(fn(*xs))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append(time.perf_counter() - start)
        return min(times)

    side = JaxSide(cfg, batch)
    trainer, params, b = side.trainer, side.state["params"], side.batch

    def hidden(p, b):
        return trainer.model(p)(b["inputs"], b["positions"], b["segment_ids"], return_hidden=True)

    def head(h, w):
        return chunked_cross_entropy(h, w, b["targets"], b["loss_mask"], cfg.loss.chunk)[0]

    out = {
        "forward_s": best(jax.jit(hidden), params, b),
        "loss_and_grads_s": best(jax.jit(trainer.loss_and_grads), params, b),
        "loss_head_s": best(jax.jit(jax.grad(head, argnums=(0, 1))), jax.jit(hidden)(params, b), params["lm_head"]),
        **{
            f"attention_{kind}_layer_s": best(_attention_grad(cfg, window), *_attention_inputs(cfg, b["segment_ids"]))
            for kind, window in (("global", None), ("local", model_config(cfg).sliding_window))
        },
        "step_s": best(lambda: side.step()),
    }
    original = attention.attention
    attention.attention = lambda q_BTNH, k, v, **kw: q_BTNH  # the model calls it through the module
    try:
        out["step_without_attention_s"] = best(JaxSide(cfg, batch).step)  # traced (and timed) with the identity
    finally:
        attention.attention = original
    return out


def _attention_inputs(cfg, segment_ids_BT):
    """Random q [B, T, N, H], k and v [B, T, K, H] of the run's model and batch, and its segment ids."""
    import jax.numpy as jnp

    from cwm_jax.train.config import model_config

    c = model_config(cfg)
    rng = np.random.default_rng(1)
    B, T = segment_ids_BT.shape
    q = jnp.asarray(rng.standard_normal((B, T, c.num_heads, c.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, c.num_kv_heads, c.head_dim)), jnp.float32) for _ in "kv")
    return q, k, v, segment_ids_BT


def _attention_grad(cfg, window):
    """jit of the gradients (q, k, v) of sum(attention(q, k, v)) as the model calls it (impl, block, segments)."""
    import jax

    from cwm_jax import attention

    def loss(q, k, v, seg):
        o = attention.attention(
            q, k, v, window=window, segment_ids_BT=seg, impl=cfg.attention_impl,
            block_q=cfg.attention_block, block_k=cfg.attention_block,
        )  # fmt: skip
        return o.sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> int:
    """Measure, print the ratio and the table; optionally write JSON. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two sides")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    parser.add_argument("--attention-block", type=int, default=128, help="cwm_jax blocked attention's block size")
    parser.add_argument("--attention-impl", default="xla", choices=("xla", "dense"), help="cwm_jax attention")
    parser.add_argument("--loss-chunk", type=int, default=512, help="cwm_jax loss positions per chunk")
    parser.add_argument("--remat", default="none", choices=("none", "dots", "full"), help="cwm_jax remat policy")
    parser.add_argument("--torch-optimizer", default="fused", choices=("fused", "foreach", "for-loop"))
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: the CPU count")
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n x n GEMM for the ceiling")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    parser.add_argument("--breakdown", action="store_true", help="only time the pieces of cwm_jax's step")
    args = parser.parse_args(argv)
    sizes = (args.batch, args.seq_len, args.rounds, args.steps, args.attention_block, args.loss_chunk)
    if min(sizes) < 1 or args.torch_threads < 1 or args.gemm_size < 1:
        print(
            "error: want positive --batch, --seq-len, --rounds, --steps, --attention-block, --loss-chunk, "
            "--torch-threads, --gemm-size",
            file=sys.stderr,
        )
        return 2

    if args.breakdown:
        for name, seconds in breakdown(args).items():
            print(f"{name:26s} {seconds:.3f}")
        return 0
    r = measure(args)
    met = r["ratio"] >= TARGET
    print(
        f"ratio cwm_jax / transformers tokens/s (medians): {r['ratio']:.2f}x "
        f"(target {TARGET}x: {'met' if met else 'missed'}); "
        f"fastest step / fastest step {r['best_step_ratio']:.2f}x"
    )
    print(
        f"\n{r['params'] / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens, float32, "
        f"{r['flops_per_token'] / 1e6:.0f} MFLOP/token; torch threads {r['torch_threads']}; "
        f"GEMM {args.gemm_size}^3: jnp.dot {r['gemm_flop_s']['jax'] / 1e9:.0f} GFLOP/s, "
        f"torch.matmul {r['gemm_flop_s']['torch'] / 1e9:.0f} GFLOP/s"
    )
    print(
        "\n| side | tokens/s | median step s | min s | max s | model GFLOP/s | share of GEMM ceiling | first step s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, label in (("jax", "cwm_jax"), ("torch", "transformers")):
        s = r[name]
        print(
            f"| {label} | {s['tok_s']:.0f} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['max_s']:.3f} "
            f"| {s['model_flop_s'] / 1e9:.1f} | {s['share_of_ceiling']:.1%} | {s['first_step_s']:.2f} |"
        )

    if args.json:
        result = {
            "benchmark": "train_step",
            "batch": args.batch,
            "seq_len": args.seq_len,
            "rounds": args.rounds,
            "steps": args.steps,
            "attention_block": args.attention_block,
            "loss_chunk": args.loss_chunk,
            "remat": args.remat,
            "torch_optimizer": args.torch_optimizer,
            "model": MODEL,
            **environment(),
            **r,
            "target": TARGET,
            "target_met": met,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
