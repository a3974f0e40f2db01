"""The training loop behind `train.py`: mesh, state (fresh, converted or resumed), data, steps, metrics, checkpoints.

Checkpoints are an Orbax CheckpointManager in `WORKDIR/checkpoints`: each step holds the train state, every
process's data iterator position (Grain's handler) and the run config. Saves are asynchronous; a step folder appears
only when complete, so a run killed at any moment resumes from the latest complete step, bit-identically (same
parameters, same data order). SIGTERM (a TPU maintenance event) saves the current step before the process exits.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cwm_jax import sharding
from cwm_jax.config import ConfigError, flops_per_token
from cwm_jax.data import make_iterator
from cwm_jax.tokenizer import load_tokenizer
from cwm_jax.train.config import model_config, validate
from cwm_jax.train.step import Trainer

log = logging.getLogger("cwm_jax.train")

# Dense bf16 peak FLOP/s of the GPUs (NVIDIA datasheets); TPU generations come from `cwm_jax.plan.CHIPS`.
GPU_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
# `device.device_kind` of each TPU generation.
TPU_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5p": "v5p",
    "TPU v5": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss with nonfinite="stop", a checkpoint that does not fit the config)."""


def skip_absent_accelerators() -> None:
    """Use the CPU without probing for accelerators when this host has none (call before JAX starts a backend).

    With libtpu installed (the `tpu` extra; `make test` installs it to compile for TPU topologies), JAX probes for a
    TPU at start-up and prints pages of warnings on a host without one. An explicit JAX_PLATFORMS always wins.
    """
    if os.environ.get("JAX_PLATFORMS"):
        return
    if not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
        jax.config.update("jax_platforms", "cpu")


def peak_flops(device) -> float | None:
    """The device's peak bf16 FLOP/s, or None when unknown (e.g. a CPU)."""
    from cwm_jax.plan import CHIPS

    kind = getattr(device, "device_kind", "")
    peaks = {**GPU_PEAK_FLOPS, **{k: CHIPS[g].peak_flops for k, g in TPU_KINDS.items()}}
    for prefix in sorted(peaks, key=len, reverse=True):
        if kind.startswith(prefix):
            return peaks[prefix]
    return None


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (all processes agree before they save and stop)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


class _Metrics:
    """Console lines on process 0 and TensorBoard scalars in `WORKDIR/tensorboard`."""

    def __init__(self, workdir: epath.Path, enabled: bool):
        self.writer = None
        if enabled and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: dict, prefix: str = "train"):
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _manager(workdir: epath.Path, cfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(cfg.checkpoint.every), 1),
        max_to_keep=int(cfg.checkpoint.keep),
        enable_async_checkpointing=bool(cfg.checkpoint.async_save),
        create=True,
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _save(manager, step: int, state, data_it, cfg, *, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_it),
        config=ocp.args.JsonSave(json.loads(cfg.to_json_best_effort())),
    )
    return manager.save(step, args=args, force=force)


def _restore(manager, step: int, trainer: Trainer, data_it):
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state()),
        data=grain.checkpoint.CheckpointRestore(data_it),
    )
    try:
        return manager.restore(step, args=args).state
    except (ValueError, KeyError) as e:
        raise TrainingError(
            f"checkpoint step {step} in {manager.directory} does not fit this run config ({e}); use another "
            "--workdir, or the config it was written with"
        ) from None


def _initial_params(cfg, trainer: Trainer):
    """Parameters from `init_from`: a converted checkpoint (`cwm-convert hf-to-orbax`) or a training workdir of an
    earlier stage (its latest step); either way the architecture must match the run config's model block."""
    from cwm_jax import checkpoint, hf
    from cwm_jax.train import export

    if export.is_train_workdir(cfg.init_from):
        stored = model_config(export.run_config_of(cfg.init_from))
        export.check_same_architecture(stored, trainer.model_config, cfg.init_from)
        return export.restore_params(cfg.init_from, trainer.param_shardings)
    export.check_same_architecture(checkpoint.read_config(cfg.init_from), trainer.model_config, cfg.init_from)
    model = checkpoint.load(cfg.init_from, mesh=trainer.mesh, dtype="float32")
    return hf.model_params(model)


def train(cfg, workdir, *, max_steps: int | None = None) -> dict:
    """Run (or resume) the training described by run config `cfg` in `workdir`; returns the final state.

    `max_steps` stops after that many steps of this invocation (tests use it to interrupt a run). A config with an
    `rl` block runs GRPO (`cwm_jax.rl.grpo.train_grpo`) instead of supervised training.
    """
    if "rl" in cfg:
        from cwm_jax.rl.grpo import train_grpo

        return train_grpo(cfg, workdir, max_steps=max_steps)
    workdir = epath.Path(workdir)  # a local folder or gs://... (Orbax and etils write both)
    if "://" not in str(workdir):
        workdir = workdir.absolute()  # Orbax wants absolute paths
    model_config, mesh_sizes = validate(cfg, jax.device_count())
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model_config.vocab_size}"
        )
    mesh = sharding.make_mesh(**mesh_sizes)
    trainer = Trainer(cfg, model_config, mesh)
    data_it = make_iterator(
        cfg.data,
        tokenizer,
        seq_len=cfg.seq_len,
        batch_size=cfg.global_batch,
        seed=cfg.seed,
        rows=trainer.local_rows(),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    manager = _manager(workdir, cfg)
    latest = manager.latest_step()
    if latest is not None:
        state = _restore(manager, latest, trainer, data_it)
        log.info("resumed from %s step %d", manager.directory, latest)
    else:
        state = trainer.init_state(_initial_params(cfg, trainer) if cfg.init_from else None)
    start = int(state["step"])
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log.info(
        "model %s: %.1fM params; mesh %s on %d devices (%d processes); %d rows x %d tokens per step",
        cfg.model.preset,
        n_params / 1e6,
        mesh_sizes,
        jax.device_count(),
        jax.process_count(),
        cfg.global_batch,
        cfg.seq_len,
    )

    metrics_out = _Metrics(workdir, cfg.tensorboard)
    flops = flops_per_token(model_config, cfg.seq_len)
    peak = peak_flops(jax.devices()[0])
    tokens_per_step = cfg.global_batch * cfg.seq_len
    end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    history = []
    with _Preemption() as preemption:
        t0, last_logged = time.perf_counter(), start
        for step in range(start, end):
            state, metrics = trainer.step(state, trainer.global_batch(next(data_it)))
            done = step + 1
            if cfg.nonfinite == "stop" and not bool(metrics["finite"]):
                raise TrainingError(
                    f"non-finite loss or gradient at step {done} (nonfinite='stop'); the update was not applied and "
                    f"the last checkpoint is intact"
                )
            if done % cfg.log_every == 0 or done == end:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t0
                m["tokens_per_s"] = (done - last_logged) * tokens_per_step / max(elapsed, 1e-9)
                m["mfu"] = m["tokens_per_s"] * flops / (peak * jax.device_count()) if peak else None
                history.append({"step": done, **m})
                metrics_out.write(done, m)
                mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
                log.info(
                    "step %d/%d loss %.4f grad_norm %.3f lr %.2e tokens/s %s mfu %s skipped %d",
                    done,
                    cfg.steps,
                    m["loss"],
                    m["grad_norm"],
                    m["lr"],
                    f"{m['tokens_per_s']:,.0f}",
                    mfu,
                    int(m["skipped"]),
                )
                t0, last_logged = time.perf_counter(), done
            if cfg.eval.every and done % cfg.eval.every == 0:
                eval_loss = _evaluate(cfg, trainer, tokenizer, state["params"], done, metrics_out)
                history.append({"step": done, "eval_loss": eval_loss})
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                _save(manager, done, state, data_it, cfg)
            if (done % cfg.log_every == 0) and preemption.agreed():
                log.warning("SIGTERM: saving step %d before exiting", done)
                _save(manager, done, state, data_it, cfg, force=True)
                break
        else:
            if end == cfg.steps and cfg.checkpoint.every and manager.latest_step() != end:
                _save(manager, end, state, data_it, cfg, force=True)
    manager.wait_until_finished()
    manager.close()
    metrics_out.close()
    append_history(workdir, history)
    if int(state["step"]) == cfg.steps and cfg.sample.max_new_tokens > 0:
        text = sample(trainer, state["params"], tokenizer, cfg.sample.prompt, cfg.sample.max_new_tokens)
        log.info("sample at step %d (temperature 0.8):\n%s", cfg.steps, text)
    state["history"] = history
    return state


def append_history(workdir: epath.Path, history: list[dict]) -> None:
    """Append a run's logged steps to `WORKDIR/metrics.jsonl` (process 0 only)."""
    if jax.process_index() == 0:
        with (workdir / "metrics.jsonl").open("a") as f:
            f.write("".join(json.dumps(h) + "\n" for h in history))


def _evaluate(cfg, trainer: Trainer, tokenizer, params, step: int, metrics_out: _Metrics) -> float:
    it = make_iterator(
        cfg.eval.data,
        tokenizer,
        seq_len=cfg.seq_len,
        batch_size=cfg.global_batch,
        seed=cfg.seed + 1,
        rows=trainer.local_rows(),
        num_epochs=1,
        shuffle=False,
    )
    nll = tokens = 0.0
    for _, local in zip(range(cfg.eval.batches), it, strict=False):
        n, t = jax.device_get(trainer.eval_loss(params, trainer.global_batch(local)))
        nll, tokens = nll + float(n), tokens + float(t)
    loss = nll / max(tokens, 1.0)
    log.info("eval step %d loss %.4f (%d tokens)", step, loss, tokens)
    metrics_out.write(step, {"loss": loss, "tokens": tokens}, prefix="eval")
    return loss


def sample(trainer: Trainer, params, tokenizer, prompt: str, max_new_tokens: int, *, temperature=0.8, seed=0) -> str:
    """Text the model writes after `prompt` (for the end-of-run sample and the demo)."""
    from cwm_jax.generator import Generator

    with jax.set_mesh(trainer.mesh):
        generator = Generator(trainer.model(params), tokenizer)
        return prompt + generator.complete(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=None, seed=seed
        )


def setup_logging() -> None:
    """The training log on stderr (time and message), without the libraries' chatter below warnings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
