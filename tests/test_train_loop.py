"""The training loop end to end: train.py, checkpoints, exact resume after SIGKILL, two processes = one process."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cwm_jax.train import loop
from cwm_jax.train.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8

RUN_CONFIG = f"""
import ml_collections
from cwm_jax.data import source_config
from cwm_jax.train.config import default_config


def get_config():
    c = default_config()
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
        sliding_window=16, bos_token_id=256, eos_token_ids=(257,)))
    c.seq_len, c.global_batch, c.steps = 64, 8, {STEPS}
    c.dtype, c.remat = "float32", "none"
    c.loss.chunk = 32
    c.optimizer.warmup_steps = 2
    c.data.sources = [source_config(name="stdlib", kind="stdlib", path="a*.py")]
    c.checkpoint.every, c.log_every = 2, 1
    c.eval.every, c.eval.batches = 4, 2
    c.eval.data.sources = [source_config(name="held_out", kind="stdlib", path="b*.py")]
    c.tensorboard = False
    c.sample.max_new_tokens = 0
    return c
"""

# Runs the loop in a child process that SIGKILLs itself: right after the async save of step K is started ("save"),
# or right after step K is computed, between saves ("step").
DRIVER = """
import os, signal, sys
from cwm_jax.train import loop
from cwm_jax.train.config import load_config_file

workdir, mode, at = sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "save":
    original_save = loop._save
    def _save(manager, step, *args, **kwargs):
        out = original_save(manager, step, *args, **kwargs)
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    loop._save = _save
elif mode == "step":
    original_step = loop.Trainer.step
    def step(self, state, batch):
        out = original_step(self, state, batch)
        if int(out[0]["step"]) == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    loop.Trainer.step = step
loop.train(load_config_file(sys.argv[1]), workdir)
"""


def _final_params(workdir: Path, step: int = STEPS) -> dict:
    """The params of the run's latest checkpoint (which must be `step`) as numpy arrays, whatever mesh wrote them."""
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        assert manager.latest_step() == step
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["params"]


def _child_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_loop")


@pytest.fixture(scope="module")
def config_file(run_dir):
    path = run_dir / "run_config.py"
    path.write_text(RUN_CONFIG)
    return path


@pytest.fixture(scope="module")
def reference_run(run_dir, config_file):
    """The uninterrupted run, in this process (8 CPU devices, fsdp=8): (per-step losses, final params)."""
    workdir = run_dir / "reference"
    state = loop.train(load_config_file(config_file), workdir)
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    return np.array(losses), _final_params(workdir)


def test_metrics_and_checkpoints_of_a_run(reference_run, run_dir):
    workdir = run_dir / "reference"
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, STEPS + 1))
    assert all(m["tokens_per_s"] > 0 and m["skipped"] == 0 for m in train_lines)
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8]
    # Held-out text (other stdlib modules): the eval loss falls with training and stays near the training loss.
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] < 2 * train_lines[0]["loss"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6, 8]  # every 2 steps, keep 3
    assert json.loads((workdir / "checkpoints/8/config/metadata").read_text())["steps"] == STEPS


def test_resume_after_sigkill_is_bit_identical(reference_run, run_dir, config_file):
    _, reference = reference_run
    workdir = run_dir / "killed"
    driver = run_dir / "driver.py"
    driver.write_text(DRIVER)

    def run(mode, at):
        cmd = [sys.executable, str(driver), str(config_file), str(workdir), mode, str(at)]
        return subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=600)

    # Killed while the async save of step 4 is being written: step 4 must not count as complete.
    proc = run("save", 4)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        assert manager.latest_step() in (2, 4)
    # Killed after step 7, between saves (the async save of step 6 may or may not have finished).
    proc = run("step", 7)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        assert manager.latest_step() in (4, 6)
    proc = run("none", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Only the finishing run writes metrics (the killed ones never reach the end): it started after step 4 or 6.
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] in (5, 7)
    resumed = _final_params(workdir)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "mesh",
    [
        [],  # fsdp=8: each process holds its own 4 rows
        # sequence=8: every row is split over the devices of both processes, so both read every row
        ["--config.mesh.fsdp=1", "--config.mesh.sequence=8"],
    ],
    ids=["fsdp", "sequence"],
)
def test_two_processes_match_one_process(reference_run, run_dir, config_file, mesh):
    losses_1, params_1 = reference_run
    workdir = run_dir / f"two_processes_{len(mesh)}"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train.py"),
                f"--config={config_file}",
                f"--workdir={workdir}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
                *mesh,
            ],
            env=_child_env(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([m["loss"] for m in lines if "loss" in m], losses_1, rtol=1e-5)
    params_2 = _final_params(workdir)
    for a, b in zip(jax.tree.leaves(params_2), jax.tree.leaves(params_1), strict=True):
        # Same tolerance argument as tests/test_train.py: Adam turns relative gradient noise e into about lr * e.
        np.testing.assert_allclose(a, b, atol=STEPS * 1e-2 * 3e-4, rtol=0)


def test_train_py_reports_config_errors(config_file, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--config={config_file}",
            f"--workdir={tmp_path}",
            "--config.mesh.tensor=3",
        ],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: mesh.fsdp=-1 cannot fill 8 devices")
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_the_current_step_and_exits(config_file, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--config={config_file}",
            f"--workdir={tmp_path}",
            "--config.steps=10000",
            "--config.checkpoint.every=1000",
        ],
        env=_child_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " step 2/10000 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    lines.append(rest)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute()) as manager:
        saved = manager.latest_step()
    assert saved is not None and 2 <= saved < 1000  # the step it stopped at, not a scheduled save
    assert f"SIGTERM: saving step {saved}" in "".join(lines)


def test_export_to_a_converted_checkpoint_and_init_from_a_workdir(reference_run, run_dir, config_file, tmp_path):
    from cwm_jax import checkpoint, hf
    from cwm_jax.convert.cli import main as convert_main
    from cwm_jax.sharding import make_mesh
    from cwm_jax.tokenizer import ByteTokenizer, load_tokenizer
    from cwm_jax.train.config import model_config
    from cwm_jax.train.step import Trainer

    _, final = reference_run
    workdir = run_dir / "reference"
    assert convert_main(["train-to-orbax", str(workdir), str(tmp_path / "export"), "--quiet"]) == 0
    assert isinstance(load_tokenizer(tmp_path / "export"), ByteTokenizer)
    exported = hf.model_params(checkpoint.load(tmp_path / "export"))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert convert_main(["train-to-orbax", str(workdir), str(tmp_path / "export")]) == 2  # exists, no --overwrite
    assert convert_main(["train-to-orbax", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2

    cfg = load_config_file(config_file)
    cfg.init_from = str(workdir)
    trainer = Trainer(cfg, model_config(cfg), make_mesh(fsdp=4, tensor=2))
    params = loop._initial_params(cfg, trainer)
    assert params["layers"]["q"].sharding == trainer.param_shardings["layers"]["q"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
