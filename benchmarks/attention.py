"""Attention kernels: speed against cuDNN on a GPU, and the (query block, KV block) pairs each one visits.

GPU (`jax.default_backend() == "gpu"`): times the forward and forward+backward (jit, block_until_ready, one compile
call and one warm call untimed, then the median of `--repeats` calls, fewer when they would overrun `--budget-s`, and
one once the run is 4 minutes old) of our Triton kernel (`cwm_jax.kernels.flash_gpu.flash_attention`), cuDNN
(`jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`, full causal and with
`local_window_size=(W - 1, 0)`) and the blocked XLA reference (`cwm_jax.attention.attention(impl="xla")`), each
local (window W) and global (causal), at T in {8192, 32768}, W = 8192, B = 1, 48 query / 8 KV heads, head dim 128,
bf16. Before timing, each output (and each gradient) is checked against the XLA reference's: the max abs error must
stay under a bf16 tolerance (below). Prints the ratios first (cuDNN seconds / our seconds, so > 1 means ours is faster;
target 0.8x, reported, not gating), then the timing table. Sized to finish in about 5 minutes on one H100.

FLOP convention: only visible work counts. A pass is credited with (visible (query, key) pairs) x 4 x H x N x B
flops for the forward (QK^T and PV: 2 flops per multiply-add each) and 3.5 times that for forward+backward (the
backward's 5 matmuls, QK^T recomputation not counted, are 2.5 forwards). Visible pairs: T(T+1)/2 causal,
W(W+1)/2 + (T - W)W with a window W < T. Masked entries, padding and block granularity are not credited, so a kernel
that computes masked scores gets no TFLOP/s for them.

CPU (no GPU): prints the block-visit table for T in {8192, 32768, 131072}, W = 8192 and blocks {128, 256, 512}
(block_q = block_k): our forward / dQ / dK/dV pairs (`kernels/schedule.py`), splash attention's non-empty blocks and
grid steps after its grid shrinking (`kernels/splash.splash_visits`, from splash's own mask processing, whose host
time is shown too: it grows with (T / block)^2 and takes minutes at T = 131072), the dense grid nq x nk and the
closed form T/B (W/B + 1) - (W/B)(W/B + 1)/2. `--smoke` runs the GPU timing path tiny on the CPU (T 256, W 64,
4 / 2 heads of 64, our kernel in interpret mode, `jax.nn.dot_product_attention(implementation="xla")` standing in for
cuDNN, 1 repeat) so CI exercises that code.

    python benchmarks/attention.py [--seq-lens T ...] [--window W] [--repeats 5] [--budget-s 2] [--block-q Q]
        [--block-k C] [--table] [--blocks 128 256 512] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import statistics
import sys
import time
import traceback

from common import environment, write_json

TARGET = 0.8  # cuDNN seconds / our seconds: ours at 80% of cuDNN's speed or better
GPU_SEQ_LENS = (8192, 32768)
TABLE_SEQ_LENS = (8192, 32768, 131072)
TABLE_BLOCKS = (128, 256, 512)
WINDOW = 8192
PASSES = ("forward", "forward+backward")
# bf16 tolerances relative to the largest reference magnitude m: a bf16 ulp at m is at most m * 2**-7, so these allow
# 2 ulps of the output (both sides round P to bf16 for PV, in different block orders) and 4 of the gradients (dK and
# dV sum over every visible query of G heads, with bf16-rounded dS and P that differ between implementations).
RELATIVE_TOLERANCE = {"o": 2.0**-6, "dq": 2.0**-5, "dk": 2.0**-5, "dv": 2.0**-5}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One timing run: shapes, the stand-ins a CPU smoke run uses, and how long to time."""

    seq_lens: tuple[int, ...]
    window: int
    B: int = 1
    N: int = 48
    K: int = 8
    H: int = 128
    dtype: str = "bfloat16"
    block_q: int | None = None  # None: flash_attention's default
    block_k: int | None = None
    interpret: bool = False
    cudnn_impl: str = "cudnn"  # "xla" in the smoke run: jax.nn.dot_product_attention's XLA path stands in
    repeats: int = 5
    budget_s: float = 2.0
    deadline_s: float = 240.0  # past this, each measurement makes a single timed call (5 minutes on one H100)


def visible_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs with key <= query and, with a window, query - key < W."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def credited_flops(setup: Setup, T: int, window: int | None, pass_: str) -> float:
    """The docstring's convention: visible pairs x 4 H N B forward, x 3.5 for forward+backward."""
    forward = 4.0 * visible_pairs(T, window) * setup.H * setup.N * setup.B
    return forward * (3.5 if pass_ == "forward+backward" else 1.0)


def implementations(setup: Setup):
    """(impl, kind, window, fn(q, k, v) -> o) for each timed attention, XLA reference first (the others check on it)."""
    import jax

    from cwm_jax.attention import attention
    from cwm_jax.kernels.flash_gpu import flash_attention

    W = setup.window
    blocks = {k: v for k, v in (("block_q", setup.block_q), ("block_k", setup.block_k)) if v is not None}
    ours = functools.partial(flash_attention, interpret=setup.interpret, **blocks)
    cudnn = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=setup.cudnn_impl)
    return [
        ("xla", "local", W, functools.partial(attention, window=W, impl="xla")),
        ("xla", "global", None, functools.partial(attention, impl="xla")),
        ("ours", "local", W, functools.partial(ours, window=W)),
        ("ours", "global", None, ours),
        ("cudnn", "local", W, functools.partial(cudnn, local_window_size=(W - 1, 0))),
        ("cudnn", "global", None, cudnn),
    ]


def jitted(fn, pass_: str):
    """jit of the forward (q, k, v) -> (o,) or of forward+backward (q, k, v, do) -> (o, dq, dk, dv)."""
    import jax

    if pass_ == "forward":
        return jax.jit(lambda q, k, v, do: (fn(q, k, v),))

    def forward_backward(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(forward_backward)


def measure(fn, args, repeats: int, budget_s: float):
    """(first-call seconds (compile + run), median seconds, timed calls, outputs): one warm call untimed, then up to
    `repeats` timed calls, fewer when the warm call says they would overrun `budget_s` (at least 1)."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm_s = time.perf_counter() - start
    runs = max(1, min(repeats, int(budget_s / max(warm_s, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first_s, statistics.median(times), runs, out


def check(outputs, reference) -> dict:
    """Max abs error of each output against the reference's, its tolerance, and the worst error / tolerance."""
    import jax.numpy as jnp

    errors, tolerances = {}, {}
    for name, x, ref in zip(("o", "dq", "dk", "dv"), outputs, reference, strict=False):
        ref32 = ref.astype(jnp.float32)
        errors[name] = float(jnp.max(jnp.abs(x.astype(jnp.float32) - ref32)))
        tolerances[name] = RELATIVE_TOLERANCE[name] * max(float(jnp.max(jnp.abs(ref32))), 1e-30)
    worst = max(errors[n] / tolerances[n] for n in errors)
    return {"max_abs_err": errors, "tolerance": tolerances, "err_over_tol": worst, "ok": bool(worst < 1.0)}


def inputs(setup: Setup, T: int, seed: int = 0):
    """Random q [B, T, N, H], k, v [B, T, K, H] and a cotangent do, unit normal, in the setup's dtype."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(setup.dtype)
    keys = jax.random.split(jax.random.key(seed), 4)
    q_shape, kv_shape = (setup.B, T, setup.N, setup.H), (setup.B, T, setup.K, setup.H)
    shapes = (q_shape, kv_shape, kv_shape, q_shape)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k, shape in zip(keys, shapes, strict=True))


def time_all(setup: Setup) -> list[dict]:
    """One row per (T, impl, kind, pass): seconds, credited TFLOP/s and the check against the XLA reference.

    A failure (a cuDNN build without sliding windows, a kernel that does not compile) becomes the row's "error" and
    the run goes on, so one run on a borrowed GPU reports everything that works.
    """
    rows = []
    start = time.perf_counter()
    for T in setup.seq_lens:
        args = inputs(setup, T)
        references = {}  # (window, pass) -> the XLA reference's outputs
        for impl, kind, window, fn in implementations(setup):
            for pass_ in PASSES:
                row = {"T": T, "window": window, "impl": impl, "kind": kind, "pass": pass_}
                print(f"timing T={T} {impl} {kind} {pass_}", file=sys.stderr, flush=True)
                late = time.perf_counter() - start > setup.deadline_s
                repeats = 1 if late else setup.repeats
                try:
                    first_s, seconds, runs, out = measure(jitted(fn, pass_), args, repeats, setup.budget_s)
                except Exception as e:  # noqa: BLE001 - reported in the row; the other implementations still run
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    rows.append(row)
                    continue
                row.update(seconds=seconds, first_call_s=first_s, runs=runs)
                row["tflops"] = credited_flops(setup, T, window, pass_) / seconds / 1e12
                if impl == "xla":
                    references[(window, pass_)] = out
                elif (window, pass_) in references:
                    row.update(check(out, references[(window, pass_)]))
                rows.append(row)
                del out
        del args, references
    return rows


def find(rows, T, impl, kind, pass_):
    for r in rows:
        if (r["T"], r["impl"], r["kind"], r["pass"]) == (T, impl, kind, pass_) and "seconds" in r:
            return r
    return None


def ratios(rows, seq_lens) -> list[dict]:
    """cuDNN seconds / our seconds for local vs causal, local vs sliding window and global vs causal."""
    out = []
    for T in seq_lens:
        for pass_ in PASSES:
            pairs = {
                "local_vs_cudnn_causal": (("ours", "local"), ("cudnn", "global")),
                "local_vs_cudnn_window": (("ours", "local"), ("cudnn", "local")),
                "global_vs_cudnn_causal": (("ours", "global"), ("cudnn", "global")),
            }
            entry = {"T": T, "pass": pass_}
            for name, (a, b) in pairs.items():
                ours, theirs = find(rows, T, *a, pass_), find(rows, T, *b, pass_)
                entry[name] = theirs["seconds"] / ours["seconds"] if ours and theirs else None
            out.append(entry)
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_timing(setup: Setup, rows, ratio_rows) -> bool:
    """Ratios first, then the table; returns whether every checked output was within tolerance."""
    stand_in = "" if setup.cudnn_impl == "cudnn" else f' ("cuDNN" is implementation="{setup.cudnn_impl}" here)'
    print(f"cuDNN seconds / our seconds (target {TARGET}x, not gating){stand_in}:")
    for r in ratio_rows:
        print(
            f"  T {r['T']} {r['pass']}: local vs cuDNN causal {_fmt(r['local_vs_cudnn_causal'], '.2f')}x, "
            f"local vs cuDNN window {_fmt(r['local_vs_cudnn_window'], '.2f')}x, "
            f"global vs cuDNN causal {_fmt(r['global_vs_cudnn_causal'], '.2f')}x"
        )
    failed = [r for r in rows if r.get("ok") is False]
    errors = [r for r in rows if "error" in r]
    for r in failed:
        print(f"CHECK FAILED: T {r['T']} {r['impl']} {r['kind']} {r['pass']}: {r['max_abs_err']} > {r['tolerance']}")
    for r in errors:
        print(f"ERROR: T {r['T']} {r['impl']} {r['kind']} {r['pass']}: {r['error'].splitlines()[0][:300]}")
    print(
        f"\nB {setup.B}, {setup.N} query / {setup.K} KV heads, head dim {setup.H}, {setup.dtype}, W {setup.window}; "
        "TFLOP/s credit visible pairs only (see the docstring); check: max abs error / bf16 tolerance vs XLA"
    )
    print("\n| T | impl | kind | pass | ms | TFLOP/s | first call s | runs | check |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['T']} | {r['impl']} | {r['kind']} | {r['pass']} | error | | | | |")
            continue
        verdict = "reference" if r["impl"] == "xla" else _fmt(r.get("err_over_tol"), ".3f")
        print(
            f"| {r['T']} | {r['impl']} | {r['kind']} | {r['pass']} | {r['seconds'] * 1e3:.2f} | {r['tflops']:.1f} "
            f"| {r['first_call_s']:.2f} | {r['runs']} | {verdict} |"
        )
    return not failed


def our_pairs(T: int, window: int | None, block_q: int, block_k: int) -> dict:
    """Our TPU kernel's visited pairs per pass at its block plan (`flash_tpu.visit_counts`)."""
    from cwm_jax.kernels import flash_tpu

    c = flash_tpu.visit_counts(T, window, block_q, block_k)
    return {"forward": c.forward, "dq": c.dq, "dkv": c.dkv, "grid": c.grid, "padded_len": c.padded_len}


def visit_rows(seq_lens, window: int, blocks) -> list[dict]:
    """One row per (T, block): our pairs, splash's pairs and grid steps, the dense grid and the closed form."""
    from cwm_jax.kernels import schedule
    from cwm_jax.kernels.splash import splash_visits

    rows = []
    for T in seq_lens:
        for block in blocks:
            print(f"counting T={T} block={block}", file=sys.stderr, flush=True)
            ours = our_pairs(T, window, block, block)
            start = time.perf_counter()
            splash = splash_visits(T, window, block, block)
            splash_s = time.perf_counter() - start
            try:
                closed = schedule.closed_form_pairs(T, window, block)
            except ValueError:  # the closed form needs the block to divide T and W
                closed = None
            rows.append(
                {
                    "T": T,
                    "window": window,
                    "block": block,
                    "grid": ours["grid"],
                    "forward": ours["forward"],
                    "dq": ours["dq"],
                    "dkv": ours["dkv"],
                    "closed_form": closed,
                    "splash_forward": splash["forward"],
                    "splash_grid": splash["grid"],
                    "splash_dkv": splash["dkv"],
                    "splash_dkv_grid": splash["dkv_grid"],
                    "splash_mask_s": splash_s,
                }
            )
    return rows


def print_visits(rows) -> None:
    print(
        "\nBlock pairs per head (block_q = block_k): ours = visited pairs of each pass; splash = non-empty blocks "
        "and the grid steps it iterates after shrinking; mask s = splash's host-side mask processing"
    )
    print(
        "\n| T | W | block | dense grid | ours fwd | ours dQ | ours dK/dV | closed form | ours / dense "
        "| splash fwd | splash grid | splash dK/dV | splash dK/dV grid | splash mask s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['T']} | {r['window']} | {r['block']} | {r['grid']} | {r['forward']} | {r['dq']} | {r['dkv']} "
            f"| {_fmt(r['closed_form'], 'd')} | {r['forward'] / r['grid']:.3f} | {r['splash_forward']} "
            f"| {r['splash_grid']} | {r['splash_dkv']} | {r['splash_dkv_grid']} | {r['splash_mask_s']:.1f} |"
        )


def default_blocks() -> tuple[int | None, int | None]:
    """flash_attention's own default block sizes, for the JSON; (None, None) where its signature does not say."""
    from cwm_jax.kernels.flash_gpu import flash_attention

    try:
        params = inspect.signature(flash_attention).parameters
        return params["block_q"].default, params["block_k"].default
    except (ValueError, TypeError, KeyError):
        return None, None


def main(argv=None) -> int:
    """Time on a GPU (or --smoke), else print the block-visit table; optionally write JSON. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", help="default: 8192 32768 (GPU), 8192 32768 131072 (table)")
    parser.add_argument("--window", type=int, help=f"default: {WINDOW} (64 with --smoke)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement; the median is kept")
    parser.add_argument("--budget-s", type=float, default=2.0, help="seconds of timed calls per measurement")
    parser.add_argument("--block-q", type=int, help="our kernel's query block (default: flash_attention's)")
    parser.add_argument("--block-k", type=int, help="our kernel's KV block (default: flash_attention's)")
    parser.add_argument("--table", action="store_true", help="print the block-visit table even on a GPU")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(TABLE_BLOCKS), help="table block sizes")
    parser.add_argument("--smoke", action="store_true", help="the timing path, tiny, on the CPU (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    optional = (args.window, args.block_q, args.block_k)
    numbers = [*(args.seq_lens or []), args.repeats, *args.blocks, *(x for x in optional if x is not None)]
    if min(numbers) < 1 or args.budget_s <= 0:
        names = "--seq-lens, --window, --repeats, --budget-s, --blocks, --block-q, --block-k"
        print(f"error: want positive {names}", file=sys.stderr)
        return 2

    import jax

    result = {"benchmark": "attention", **environment()}
    if not args.smoke and (args.table or jax.default_backend() != "gpu"):
        rows = visit_rows(tuple(args.seq_lens or TABLE_SEQ_LENS), args.window or WINDOW, tuple(args.blocks))
        print_visits(rows)
        result.update(mode="table", visits=rows)
        ok = True
    else:
        if args.smoke:
            setup = Setup(
                seq_lens=tuple(args.seq_lens or (256,)),
                window=args.window or 64,
                N=4,
                K=2,
                H=64,
                block_q=args.block_q or 64,
                block_k=args.block_k or 64,
                interpret=True,
                cudnn_impl="xla",
                repeats=1,
                budget_s=args.budget_s,
            )
        else:
            q_default, k_default = default_blocks()
            setup = Setup(
                seq_lens=tuple(args.seq_lens or GPU_SEQ_LENS),
                window=args.window or WINDOW,
                block_q=args.block_q or q_default,
                block_k=args.block_k or k_default,
                repeats=args.repeats,
                budget_s=args.budget_s,
            )
        rows = time_all(setup)
        ratio_rows = ratios(rows, setup.seq_lens)
        ok = print_timing(setup, rows, ratio_rows)
        result.update(mode="smoke" if args.smoke else "gpu", setup=dataclasses.asdict(setup), target=TARGET)
        result.update(ratios=ratio_rows, rows=rows, checks_ok=ok)
    if args.json:
        write_json(args.json, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
