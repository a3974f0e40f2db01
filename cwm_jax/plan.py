"""Will a run config fit its TPU slice, and how fast might it step? Memory per chip and a roofline step time from the
config alone, before a TPU is rented; `--compile` sets XLA's own memory analysis for the topology beside them.

    cwm-plan --config configs/cwm_32b_pretrain.py [--topology v5p-512] [--config.key=value ...] [--compile]
    cwm-plan --serve --bits 16|8|4 [--group-size 128] [--context 131072] [--batch 1] [--device-gb 40] [--model tiny]

`--serve` needs no run config: the memory to serve the 32B model (or the tiny one) on one device at a context length
and bit width, against the device, and the longest context that fits on 32, 40 and 80 GB devices (`cwm_jax.serving`).

Topology names follow Cloud TPU: v4-N and v5p-N count TensorCores (two per chip: v5p-512 is 256 chips), v5e-N and
v6e-N count chips. A libtpu name with an explicit shape (`v5p:4x8x8`, `v5e:2x4`) is accepted too. `--compile` needs
libtpu (`pip install -e .[tpu]`) but no TPU: it compiles the real train step for abstract devices of the topology.

Shapes: B rows, T positions, D hidden, N query heads, K KV heads, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time

import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from cwm_jax import sharding
from cwm_jax.config import ConfigError, CwmConfig, flops_per_token, param_count
from cwm_jax.model import layer_shapes, top_shapes
from cwm_jax.train.config import MESH_AXES, validate

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, dense bf16 peak, ICI bandwidth and how Cloud TPU names count it."""

    generation: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip (Cloud TPU datasheets)
    ici_bytes_per_s: float  # all ICI links of one chip, both directions (Cloud TPU datasheets, Gbps / 8)
    cores_per_chip: int  # what the N of "v5p-N" counts: TensorCores (v4, v5p) or chips (v5e, v6e)
    torus_dims: int
    max_chips: int


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2400e9 / 8, 2, 3, 4096),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1600e9 / 8, 1, 2, 256),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 4800e9 / 8, 2, 3, 8960),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 3584e9 / 8, 1, 2, 256),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its Cloud name, chip generation, chip count and the libtpu topology name of its shape."""

    name: str
    chip: Chip
    chips: int
    libtpu_name: str


def _shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for a power-of-two chip count: 2x4 for 8 v5e chips, 4x8x8 for 256 v5p chips."""
    if dims == 3 and chips <= 4:
        return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1)}[chips]
    shape = [2, 2, 2] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        # Double the last of the smallest sides: 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 (Cloud's v4 / v5p / v5e tables).
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """A Topology from a Cloud TPU name ("v5p-512", "v5e-8") or a libtpu name ("v5p:4x8x8"); ConfigError if bad."""
    hint = "expected e.g. v5p-512, v5e-8, v4-32, v6e-256, or a libtpu shape like v5p:4x8x8"
    gen, sep, rest = name.partition(":") if ":" in name else name.partition("-")
    chip = CHIPS.get(gen)
    if chip is None or not sep or not rest:
        raise ConfigError(f"topology {name!r}: {hint} (generations: {', '.join(CHIPS)})")
    if sep == ":":
        try:
            shape = tuple(int(s) for s in rest.split("x"))
        except ValueError:
            raise ConfigError(f"topology {name!r}: the shape {rest!r} is not like 2x4 or 4x8x8; {hint}") from None
        if len(shape) != chip.torus_dims or min(shape) < 1:
            raise ConfigError(f"topology {name!r}: a {gen} shape has {chip.torus_dims} positive sides; {hint}")
        chips = math.prod(shape)
    else:
        if not rest.isdigit() or int(rest) < 1 or int(rest) % chip.cores_per_chip:
            unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
            raise ConfigError(f"topology {name!r}: N in {gen}-N counts {unit}; {hint}")
        chips = int(rest) // chip.cores_per_chip
        if chips & (chips - 1):
            raise ConfigError(
                f"topology {name!r}: {chips} chips is not a power of two; give the shape, e.g. {gen}:4x4x12"
            )
        shape = _shape(chips, chip.torus_dims)
    if chips > chip.max_chips:
        raise ConfigError(f"topology {name!r}: {chips} chips, but a {gen} slice has at most {chip.max_chips}")
    return Topology(name, chip, chips, f"{gen}:{'x'.join(map(str, shape))}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-chip memory (bytes) and a roofline step time of a run config on a topology."""

    topology: Topology
    mesh: dict[str, int]
    rows_per_chip: int  # rows of one microbatch on one chip
    positions_per_chip: int  # positions of each row on one chip (seq_len / mesh.sequence)
    params: int  # float32 master weights
    optimizer: int  # Adam mu and nu, float32, sharded like the parameters
    gradients: int  # float32; twice with microbatches (the accumulator and one microbatch's)
    activations: int  # what the scanned layer body saves for the backward, all layers, one microbatch
    temporaries: int  # one layer's backward working set, gathered weights, the loss chunk, the batch, a margin
    model_flops: float  # per step, flops_per_token x tokens (what MFU counts)
    hardware_flops: float  # per step, with the recomputation of the remat policy
    compute_s: float
    fsdp_comm_s: float  # FSDP all-gathers and reduce-scatters, data-parallel all-reduce: overlapped with compute
    tensor_comm_s: float  # tensor-parallel all-reduces of activations and context-parallel K/V gathers: exposed
    step_s: float
    tokens_per_step: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.temporaries

    @property
    def hbm(self) -> int:
        return self.topology.chip.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.topology.chips * self.topology.chip.peak_flops)


def _shards(n: int, axis_size: int) -> int:
    """n split over a mesh axis, or whole when the axis does not divide it (the sharding rules then replicate)."""
    return n // axis_size if n % axis_size == 0 else n


def param_bytes_per_chip(model: CwmConfig, mesh: dict[str, int], itemsize: int = 4) -> dict[str, int]:
    """Bytes of one chip's shard of each parameter (the canonical tree: `embed`, `lm_head`, `final_norm` and the
    stacked `layers.*`, keyed by their last name) under the project's sharding rules on a mesh of these sizes."""
    from cwm_jax.train.step import param_axes

    abstract_mesh = AbstractMesh(
        tuple(mesh[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )
    axes = param_axes(model)
    shapes = {**top_shapes(model), **{k: (model.num_layers, *s) for k, s in layer_shapes(model).items()}}
    out = {}
    for name, shape in shapes.items():
        spec = sharding.logical_to_spec(axes["layers"].get(name) or axes[name], shape, abstract_mesh)
        split = math.prod(math.prod(mesh[a] for a in ((p,) if isinstance(p, str) else p)) for p in spec if p)
        out[name] = math.prod(shape) // split * itemsize
    return out


def _layer_bytes_per_token(model: CwmConfig, tensor: int, compute_itemsize: int) -> dict[str, int]:
    """Bytes per token of one layer that the backward needs, per remat policy (the scanned body of model.py).

    What JAX saves (`jax.ad_checkpoint.print_saved_residuals`; tests/test_plan.py checks it): "full" only the layer
    input (the scan carry). "dots" (checkpoint_dots_with_no_batch_dims) also the projections the backward reads: q, k,
    v, the attention output projection, gate and up; the blocked attention's einsums carry a batch dimension, so
    attention is recomputed. "none" keeps everything: both normed inputs and the float32 copies inside RMSNorm, q, k,
    v, RoPE'd q, the attention output and its float32 logsumexp, the SwiGLU intermediates, the segment ids (plus the
    compute-dtype copy of the layer's weights, counted in `estimate`). Head and MLP widths are split over `tensor`;
    D-wide activations are replicated over it (`act_embed` is None).
    """
    c = model
    D = c.hidden_size
    NH = _shards(c.num_heads, tensor) * c.head_dim
    KH = _shards(c.num_kv_heads, tensor) * c.head_dim
    F = _shards(c.intermediate_size, tensor)
    none_f32 = 2 * D + _shards(c.num_heads, tensor) + 4  # RMSNorm inputs and statistics, attention logsumexp
    return {
        "full": D * compute_itemsize,
        "dots": (2 * D + NH + 2 * KH + 2 * F) * compute_itemsize,
        "none": (7 * D + 3 * NH + 2 * KH + 6 * F) * compute_itemsize + none_f32 * 4 + 4,
    }


# XLA's own temporaries beyond what is counted (fusion outputs, collective buffers, layout copies): a share of the
# counted activations and temporaries, measured on compiled steps (BENCHMARKS.md, "Training: 32B configs ...").
MARGIN = 0.1
# The largest compiled / estimated peak measured so far (131072-token context parallelism, BENCHMARKS.md): a plan
# within this factor of the HBM is reported as close.
CLOSE_FACTOR = 1.2


def estimate(cfg, topology: str | Topology | None = None) -> Plan:
    """Per-chip memory and roofline step time of run config `cfg` on `topology` (default: `cfg.topology`).

    Raises ConfigError (from `cwm_jax.train.config.validate`, or for a bad topology name).
    """
    topo = _topology(cfg, topology)
    model, mesh = validate(cfg, device_count=topo.chips)
    chip = topo.chip
    cdt = jnp.dtype(cfg.dtype).itemsize
    M = cfg.microbatches
    rows = cfg.global_batch // M // (mesh["data"] * mesh["fsdp"])
    positions = cfg.seq_len // mesh["sequence"]
    tokens = rows * positions
    tp = mesh["tensor"]
    L, D, V = model.num_layers, model.hidden_size, model.vocab_size

    params = sum(param_bytes_per_chip(model, mesh).values())
    optimizer = 2 * params
    gradients = params * (2 if M > 1 else 1)
    per_token = _layer_bytes_per_token(model, tp, cdt)
    activations = L * tokens * per_token[cfg.remat]
    if cfg.remat == "none":
        activations += params // 4 * cdt  # each layer's weights cast to the compute dtype, sharded like them

    # One layer's backward: its recomputed forward and the cotangents, about one "none" layer once XLA has fused
    # the elementwise work (measured: BENCHMARKS.md).
    layer_work = tokens * per_token["none"]
    # One layer's weights gathered over fsdp and its float32 gradient before the reduce-scatter.
    gathered_f32 = param_bytes_per_chip(model, {**mesh, "fsdp": 1})
    gathered = 2 * sum(v for k, v in gathered_f32.items() if k in layer_shapes(model)) // L
    # Loss: a chunk's float32 logits [B, c, V] (logits, probabilities, their cotangent), the head gathered over fsdp
    # in the compute dtype with its float32 gradient, the embedding table gathered over fsdp with its gradient.
    n_chunks = -(-cfg.seq_len // min(cfg.loss.chunk, cfg.seq_len))
    chunk_positions = -(-cfg.seq_len // n_chunks) // mesh["sequence"] or 1
    Vt = _shards(V, tp)
    loss = 3 * rows * chunk_positions * Vt * 4 + D * Vt * (cdt + 4) + 2 * Vt * D * 4
    hidden = tokens * D * (cdt + 4) * 2  # final hidden states and their cotangent, the embedding output
    batch = 5 * (cfg.global_batch // (mesh["data"] * mesh["fsdp"])) * positions * 4
    counted = activations + layer_work + gathered + loss + hidden
    temporaries = layer_work + gathered + loss + hidden + batch + int(MARGIN * counted)

    # Roofline. Model FLOPs are what MFU counts; the hardware also redoes what the remat policy dropped: the whole
    # forward for "full", the attention forward (its einsums have a batch dimension) for "dots".
    per_token_flops = flops_per_token(model, cfg.seq_len)
    forward = flops_per_token(model, cfg.seq_len, training=False)
    attention_forward = forward - 2 * _matmul_params(model)
    recompute = {"none": 0.0, "dots": attention_forward, "full": forward}[cfg.remat]
    step_tokens = cfg.global_batch * cfg.seq_len
    model_flops = per_token_flops * step_tokens
    hardware_flops = (per_token_flops + recompute) * step_tokens
    compute_s = hardware_flops / (topo.chips * chip.peak_flops)

    bw = chip.ici_bytes_per_s
    fsdp, data, seq = mesh["fsdp"], mesh["data"], mesh["sequence"]
    bf16_shard = sum(gathered_f32.values()) // 2  # one chip's weights after the gather, in bf16
    # Per microbatch: all-gather the weights for the forward, again for the backward, reduce-scatter the gradients.
    fsdp_bytes = M * 3 * bf16_shard * (fsdp - 1) / fsdp
    dp_bytes = 2 * (params // 2) * (data - 1) / data  # all-reduce of bf16 gradients across data replicas, once
    # Per layer and microbatch, tensor parallelism all-reduces two [B, T, D] activations in the forward and two in the
    # backward (plus two more when the forward is recomputed); each moves 2 (tp - 1) / tp of the tensor per chip.
    act = tokens * D * cdt
    tp_passes = 4 + (2 if cfg.remat == "full" else 0)
    tp_bytes = M * L * tp_passes * act * 2 * (tp - 1) / tp
    # Context parallelism gathers each layer's K and V over `sequence` (forward, recompute) and reduce-scatters their
    # gradients.
    kv = rows * cfg.seq_len * 2 * _shards(model.num_kv_heads, tp) * model.head_dim * cdt
    cp_bytes = M * L * (3 if cfg.remat != "none" else 2) * kv * (seq - 1) / seq
    fsdp_comm_s = (fsdp_bytes + dp_bytes) / bw
    tensor_comm_s = (tp_bytes + cp_bytes) / bw
    # FSDP collectives of the scanned layers overlap with the previous layer's compute (XLA's async collectives),
    # so they cost only what they exceed it by: the max. Activation all-reduces and K/V gathers sit between a matmul
    # and the next one that needs their result, so they add.
    step_s = max(compute_s, fsdp_comm_s) + tensor_comm_s
    return Plan(
        topology=topo,
        mesh=mesh,
        rows_per_chip=rows,
        positions_per_chip=positions,
        params=params,
        optimizer=optimizer,
        gradients=gradients,
        activations=activations,
        temporaries=temporaries,
        model_flops=model_flops,
        hardware_flops=hardware_flops,
        compute_s=compute_s,
        fsdp_comm_s=fsdp_comm_s,
        tensor_comm_s=tensor_comm_s,
        step_s=step_s,
        tokens_per_step=step_tokens,
    )


def _matmul_params(model: CwmConfig) -> int:
    """Parameters that enter a matmul per token (everything but the embedding table and the norms)."""
    c = model
    return param_count(c) - c.vocab_size * c.hidden_size - c.hidden_size * (2 * c.num_layers + 1)


def _topology(cfg, topology) -> Topology:
    if isinstance(topology, Topology):
        return topology
    name = topology or cfg.get("topology", "")
    if not name:
        raise ConfigError("no topology: set the config's `topology` (e.g. 'v5p-512') or pass --topology")
    return parse_topology(name)


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def compile_for_topology(cfg, topology: str | Topology | None = None) -> dict:
    """Compile the run's train step ahead of time for abstract devices of `topology` (needs libtpu, not a TPU).

    Returns the compiler's per-chip memory analysis in bytes (argument, output, temp, generated_code, alias, and
    peak = argument + output + temp - alias) and compile_s (lowering plus compilation, seconds).
    """
    from jax.experimental import topologies

    from cwm_jax.train.config import model_config
    from cwm_jax.train.step import Trainer

    if not has_libtpu():
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install -e .[tpu]")
    topo = _topology(cfg, topology)
    _, mesh_sizes = validate(cfg, device_count=topo.chips)
    # Abstract devices hold no TPU: let a second process (a test, another compile) load libtpu beside this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name).devices
    if len(devices) != topo.chips:
        # libtpu describes v4 slices one device per TensorCore; train on one device per chip (megacore).
        devices = [d for d in devices if getattr(d, "core_on_chip", 0) == 0]
    mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
    start = time.perf_counter()
    trainer = Trainer(cfg, model_config(cfg), mesh)
    compiled = trainer.lower().compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    out = dict(
        argument=mem.argument_size_in_bytes,
        output=mem.output_size_in_bytes,
        temp=mem.temp_size_in_bytes,
        generated_code=mem.generated_code_size_in_bytes,
        alias=mem.alias_size_in_bytes,
    )
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    out["compile_s"] = seconds
    return out


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def format_plan(plan: Plan, cfg) -> str:
    """The human-readable report of a Plan (what `cwm-plan` prints)."""
    t = plan.topology
    mesh = " x ".join(f"{a}={v}" for a, v in plan.mesh.items())
    lines = [
        f"{t.name} ({t.libtpu_name}): {t.chips} chips of {t.chip.generation}, {_gib(t.chip.hbm_bytes).strip()} HBM "
        f"each; mesh {mesh}",
        f"batch {cfg.global_batch} x {cfg.seq_len} tokens in {cfg.microbatches} microbatch(es); per chip "
        f"{plan.rows_per_chip} row(s) x {plan.positions_per_chip} positions; remat {cfg.remat!r}, dtype {cfg.dtype}",
        "memory per chip:",
        f"  params (float32 master)       {_gib(plan.params)}",
        f"  optimizer (Adam mu, nu fp32)  {_gib(plan.optimizer)}",
        f"  gradients (float32)           {_gib(plan.gradients)}",
        f"  activations (saved, {cfg.remat:>4})   {_gib(plan.activations)}",
        f"  temporaries (+{MARGIN:.0%} margin)     {_gib(plan.temporaries)}",
        f"  total                         {_gib(plan.total)} of {_gib(plan.hbm).strip()} ({plan.total / plan.hbm:.0%})",
    ]
    if plan.fits:
        lines.append(f"FITS: {_gib(plan.hbm - plan.total).strip()} to spare per chip")
        if plan.total * CLOSE_FACTOR > plan.hbm:
            lines.append(
                f"  close: compiled steps have needed up to {CLOSE_FACTOR}x this estimate (BENCHMARKS.md); "
                "confirm with --compile before renting the slice"
            )
    else:
        lines.append(
            f"DOES NOT FIT: needs {_gib(plan.total - plan.hbm).strip()} more per chip; try remat='full', more "
            "microbatches, a larger mesh.fsdp or mesh.tensor, or a bigger slice"
        )
    lines += [
        "roofline step time:",
        f"  FLOPs per step  {plan.model_flops:.3e} model, {plan.hardware_flops:.3e} with recomputation",
        f"  compute         {plan.compute_s:8.3f} s  ({t.chips} x {t.chip.peak_flops:.3g} FLOP/s)",
        f"  fsdp/data comm  {plan.fsdp_comm_s:8.3f} s  (overlaps compute: the max of the two counts)",
        f"  tensor/seq comm {plan.tensor_comm_s:8.3f} s  (exposed: added)",
        f"  step            {plan.step_s:8.3f} s, {plan.tokens_per_step / plan.step_s:,.0f} tokens/s, "
        f"MFU {plan.mfu:.1%}",
    ]
    if cfg.get("steps"):
        lines.append(f"  {cfg.steps} steps: {cfg.steps * plan.step_s / 86400:.2f} days")
    return "\n".join(lines)


def format_compiled(mem: dict, plan: Plan) -> str:
    """XLA's memory analysis per chip beside the estimate."""
    verdict = "fits" if mem["peak"] <= plan.hbm else "DOES NOT FIT"
    return "\n".join(
        [
            f"compiled for {plan.topology.libtpu_name} in {mem['compile_s']:.1f} s; XLA memory analysis per chip:",
            f"  arguments       {_gib(mem['argument'])}   (estimate: params + optimizer {_gib(plan.params * 3)})",
            f"  outputs         {_gib(mem['output'])}",
            f"  aliased         {_gib(mem['alias'])}   (donated state)",
            f"  temporaries     {_gib(mem['temp'])}   (estimate: gradients + activations + temporaries "
            f"{_gib(plan.gradients + plan.activations + plan.temporaries)})",
            f"  generated code  {_gib(mem['generated_code'])}",
            f"  peak (arguments + outputs + temporaries - aliased) {_gib(mem['peak'])} vs estimate "
            f"{_gib(plan.total)} ({mem['peak'] / plan.total:.2f}x); compiled {verdict} in {_gib(plan.hbm).strip()}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """cwm-plan: print the plan of `--config` on its topology; 2 for a config error, 0 otherwise (fits or not)."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else ["cwm-plan", *argv])
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Run config file (configs/*.py).", flag_values=fv, sys_argv=argv
    )
    topology_flag = flags.DEFINE_string(
        "topology", None, "TPU slice, e.g. v5p-512, v5e-8, v5p:4x8x8 (default: the config's topology)", flag_values=fv
    )
    compile_flag = flags.DEFINE_bool(
        "compile", False, "Also compile the train step for the topology (needs libtpu)", flag_values=fv
    )
    serve_flags = _define_serve_flags(fv)
    try:
        fv(argv)
        if serve_flags["serve"].value:
            if config_flag.value is not None or topology_flag.value or compile_flag.value:
                raise ConfigError("--serve plans serving and takes no --config, --topology or --compile")
            report = _serve_report(**{name: f.value for name, f in serve_flags.items() if name != "serve"})
            print(report, flush=True)
            return 0
        given = [name for name, f in serve_flags.items() if f.present]
        if given:
            raise ConfigError(f"--{serve_flags[given[0]].name} applies only with --serve")
        if config_flag.value is None:
            raise ConfigError(
                "--config is required, e.g. --config configs/cwm_32b_pretrain.py (or --serve --bits 8|4|16 to size "
                "serving)"
            )
        cfg = config_flag.value
        plan = estimate(cfg, topology_flag.value)
    except (flags.Error, ConfigError) as e:
        print(f"cwm-plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg), flush=True)
    if compile_flag.value:
        if not has_libtpu():
            print(
                "cwm-plan: --compile needs libtpu to compile for TPU topologies: pip install -e .[tpu]", file=sys.stderr
            )
            return 2
        print(f"compiling the train step for {plan.topology.libtpu_name} ...", flush=True)
        try:
            mem = compile_for_topology(cfg, plan.topology)
        except NotImplementedError as e:  # jax.make_mesh: mesh axes that are no product of the torus's sides
            print(f"cwm-plan: mesh {plan.mesh} on {plan.topology.libtpu_name}: {e}", file=sys.stderr)
            return 2
        print(format_compiled(mem, plan))
    return 0


def _define_serve_flags(fv) -> dict:
    from absl import flags

    return {
        "serve": flags.DEFINE_bool(
            "serve", False, "Size serving (no --config): memory and longest context", flag_values=fv
        ),
        "bits": flags.DEFINE_enum("bits", None, ["16", "8", "4"], "Weight width to serve at (--serve)", flag_values=fv),
        "group_size": flags.DEFINE_integer(
            "group-size",
            None,
            "Input-dim group of one scale (--serve; default 128 for int4, per channel for int8)",
            flag_values=fv,
        ),
        "context": flags.DEFINE_integer(
            "context",
            None,
            "Tokens per sequence, prompt and reply (--serve; default: the model's 131072)",
            flag_values=fv,
        ),
        "batch": flags.DEFINE_integer("batch", 1, "Sequences served at once (--serve)", flag_values=fv),
        "device_gb": flags.DEFINE_float(
            "device-gb", 40.0, "Memory of the device in GB of 1e9 bytes (--serve)", flag_values=fv
        ),
        "model": flags.DEFINE_enum(
            "model", "32b", ["32b", "tiny"], "cwm_32b() or cwm_tiny() (--serve)", flag_values=fv
        ),
    }


def _serve_report(bits, group_size, context, batch, device_gb, model) -> str:
    """`cwm-plan --serve`: ConfigError (QuantError) for bad flags, else the report of `serving.format_report`."""
    from cwm_jax import quant, serving
    from cwm_jax.config import cwm_32b, cwm_tiny

    if bits is None:
        raise ConfigError("--serve needs --bits 16, 8 or 4")
    config = cwm_32b() if model == "32b" else cwm_tiny()
    context = config.max_position_embeddings if context is None else context
    if context < 1 or batch < 1 or device_gb <= 0:
        raise ConfigError(f"--context, --batch and --device-gb must be positive, got {context}, {batch}, {device_gb}")
    if context > config.max_position_embeddings:
        raise ConfigError(
            f"--context {context} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if bits == "16":
        if group_size is not None:
            raise ConfigError("--group-size applies only to --bits 8 or 4")
        qc = None
    else:
        default = quant.parse_bits(bits)
        qc = quant.QuantConfig(bits=int(bits), group_size=default.group_size if group_size is None else group_size)
        quant.check_config(config, qc)
    return serving.format_report(config, qc, context, batch, int(device_gb * serving.GB), f"cwm_{model}")


if __name__ == "__main__":
    sys.exit(main())
